//! Command-line behaviour a user meets first: wrong sockets, wrong flags, wrong config.
use std::process::Command;

use crate::support::*;

fn one_clear_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr).into_owned();
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "one line expected, got:\n{text}"
    );
    assert!(
        !text.contains("panicked")
            && !text.contains("backtrace")
            && !text.contains("RUST_BACKTRACE"),
        "{text}"
    );
    text
}

#[test]
fn cli_unreachable_socket_says_which_socket_and_how_to_set_it() {
    let out = Command::new(ragent_bin())
        .env_remove("RAGENT_CONTAINERD")
        .args(["images", "--containerd", "/nonexistent/ragent-test.sock"])
        .output()
        .expect("ragent");
    assert!(!out.status.success());
    let line = one_clear_line(&out.stderr);
    assert!(line.contains("/nonexistent/ragent-test.sock"), "{line}");
    assert!(
        line.contains("--containerd") && line.contains("RAGENT_CONTAINERD"),
        "{line}"
    );

    // The same from the environment variable.
    let out = Command::new(ragent_bin())
        .env("RAGENT_CONTAINERD", "/nonexistent/from-env.sock")
        .args(["images", "--json"])
        .output()
        .expect("ragent");
    assert!(!out.status.success());
    assert!(one_clear_line(&out.stderr).contains("/nonexistent/from-env.sock"));
    assert!(out.stdout.is_empty(), "nothing on stdout when it fails");
}

#[test]
fn cli_bad_config_and_bad_flags_are_clear_errors() {
    let node = node();
    let cfg = node.dir().join("bad-config.toml");
    std::fs::write(&cfg, "[agent]\nmetrics_adress = \"127.0.0.1:1\"\n").expect("write");
    let out = ragent(&node, &["agent", "--config", cfg.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("bad-config.toml") && text.contains("metrics_adress"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    let out = ragent(&node, &["agent", "--metrics-addr", "nonsense"]);
    assert!(!out.status.success());
    assert!(one_clear_line(&out.stderr).contains("HOST:PORT"));

    let out = ragent(&node, &["images", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error code");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));

    // A port already taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let out = ragent(&node, &["agent", "--no-ebpf", "--metrics-addr", &addr]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let last = text.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("ragent: ") && last.contains(&addr) && last.contains("--metrics-addr"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}
