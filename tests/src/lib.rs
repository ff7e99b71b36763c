//! Helpers shared by the multi-process tests.
pub mod cluster;
pub mod cluster_fixture;
pub mod etcd;
pub mod guest;
pub mod hostile;
pub mod hugepages;
pub mod netns;
pub mod qmp;
pub mod replicas;
pub mod restart;
pub mod scenario;
pub mod verify;
pub mod wire_peer;
