//! ragent's test kit: the deterministic CNB sample images, the local node (containerd with CRI,
//! a registry, Prometheus), registries that demand credentials (`auth`) and small helpers the
//! end-to-end tests and `cargo xtask` share.
pub mod accesslog;
pub mod auth;
pub mod fixtures;
pub mod http;
pub mod node;
pub mod proxy;
