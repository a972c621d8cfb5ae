//! The pure core: image and layer model, CNB metadata, the node inventory, registry
//! credentials.
//!
//! Nothing here talks to containerd, the kernel or a socket; adapters feed it bytes and records
//! and it decides. Everything here is tested directly.
pub mod autorebase;
pub mod chain;
pub mod cnb;
pub mod credentials;
pub mod inventory;
pub mod oci;
pub mod pods;
pub mod policy;
pub mod prepull;
pub mod prepulls;
pub mod pulls;
pub mod rate;
pub mod rebase;
pub mod rightsizing;
pub mod sharing;
pub mod usage;
pub mod workloads;
