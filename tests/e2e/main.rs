//! End-to-end tests against the real local node that `cargo xtask test` starts: containerd 1.6
//! with CRI, the registry holding the sample images, the kernel (eBPF) and Prometheus.
//!
//! One binary, run serially (`--test-threads=1`): each test relinks nothing and shares the node.
//! The node is found through `RAGENT_TEST_NODE` and the binary under test through `RAGENT_BIN`.
mod agent;
mod auth;
mod autorebase;
mod cli;
mod cluster;
mod dashboards;
mod faults;
mod images;
mod insight;
mod kernel;
mod kube;
mod pod;
mod prepull;
mod rebase;
mod rightsizing;
mod sharing;
mod store;
mod support;
mod warm;
