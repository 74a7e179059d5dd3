//! Compiles the eBPF programs in bpf/ into skeletons with libbpf-cargo (vendored libbpf; only
//! the kernel's uapi headers are needed).

use libbpf_cargo::SkeletonBuilder;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("incoming.skel.rs");
    let arch_include =
        format!("-I/usr/include/{}-linux-gnu", std::env::var("CARGO_CFG_TARGET_ARCH").unwrap());
    SkeletonBuilder::new()
        .source("bpf/incoming.bpf.c")
        // Debian keeps asm/ in the multiarch include directory.
        .clang_args([arch_include.as_str(), "-Wall", "-Werror"])
        .build_and_generate(&out)
        .expect("cannot build bpf/incoming.bpf.c (needs clang and the kernel uapi headers)");
    println!("cargo:rerun-if-changed=bpf/incoming.bpf.c");
}
