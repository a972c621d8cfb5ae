//! Thin adapters, each named after what it talks to. They convert protocol types into the
//! core's model and make no decisions of their own.
pub mod cgroupfs;
pub mod containerd;
pub mod containerd_write;
pub mod kernel;
pub mod procfs;
pub mod registry;
