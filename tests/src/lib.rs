//! Helpers shared by the multi-process tests.
pub mod cluster;
pub mod etcd;
pub mod guest;
pub mod netns;
pub mod wire_peer;
