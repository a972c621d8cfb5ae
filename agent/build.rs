//! Builds the eBPF object (`ebpf/`, target bpfel-unknown-none) with aya-build and leaves it in
//! OUT_DIR for `include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for machines without bpf-linker, e.g. a quick
//! `cargo clippy`); the agent then runs without its eBPF programs and says so at start.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("ragent-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // An empty object: the loader reports "built without eBPF" instead of failing.
        fs::write(&object, [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let ebpf = aya_build::Package {
        name: "ragent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    // The preinstalled nightly (LLVM 22, matching bpf-linker) unless RAGENT_EBPF_TOOLCHAIN says
    // otherwise; with RUSTC_BOOTSTRAP=1 the stable toolchain works too.
    println!("cargo:rerun-if-env-changed=RAGENT_EBPF_TOOLCHAIN");
    let toolchain = env::var("RAGENT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_string());
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain)).map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             run `cargo xtask setup` (installs rust-src and bpf-linker for LLVM 22), \
             or set AYA_BUILD_SKIP=1 to build ragent without eBPF"
        )
    })
}
