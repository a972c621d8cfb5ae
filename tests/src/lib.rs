//! ragent's test kit: the deterministic CNB sample images, the local node (containerd with CRI,
//! a registry, Prometheus), a cluster of nodes in network namespaces behind a rate-limited
//! registry (`cluster`), registries that demand credentials (`auth`), cgroup files as ground
//! truth (`cgroups`), the Grafana dashboards as the tests read them (`dashboards`), pods through
//! CRI as kubelet makes them (`pod`), loopback endpoints with known payloads (`payload`), a
//! reader of the Prometheus text format (`promtext`) and small helpers the end-to-end tests and
//! `cargo xtask` share.
pub mod accesslog;
pub mod auth;
pub mod cgroups;
pub mod cluster;
pub mod dashboards;
pub mod expect;
pub mod fixtures;
pub mod http;
pub mod kubeapi;
pub mod node;
pub mod oneoff;
pub mod payload;
pub mod pod;
pub mod promtext;
pub mod proxy;
pub mod stub;
