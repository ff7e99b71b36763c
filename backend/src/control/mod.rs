//! Node daemon control plane.
