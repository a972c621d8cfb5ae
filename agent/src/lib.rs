//! ragent: a Kubernetes node agent for buildpack-built workloads.
//!
//! Layout: [`core`] is the pure core (no I/O); [`adapters`] talk to containerd, the kernel,
//! cgroupfs and procfs; [`agent`], [`images`], [`scan`], [`warm`] and [`autorebase`] put them together; [`metrics`] is the
//! one metric catalogue; [`config`] parses flags, env and the config file.
pub mod adapters;
pub mod agent;
pub mod autorebase;
pub mod config;
pub mod core;
pub mod crd;
pub mod flight;
pub mod images;
pub mod insight;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod peer;
pub mod prepull;
pub mod progress;
pub mod rebase;
pub mod recommend;
pub mod rightsizing;
pub mod scan;
pub mod sharing;
pub mod upstream;
pub mod warm;
