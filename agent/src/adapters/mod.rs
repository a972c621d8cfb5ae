//! Thin adapters, each named after what it talks to. They convert protocol types into the
//! core's model and make no decisions of their own.
pub mod certsd;
pub mod cgroupfs;
pub mod containerd;
pub mod containerd_write;
pub mod kernel;
pub mod kube;
pub mod procfs;
pub mod registry;

/// The message of an error and of each of its sources, on one line (sources already quoted
/// in the message are not repeated).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
