//! Finds out which optional test dependencies this machine has, so that a test whose dependency
//! is missing shows as *ignored* with the reason instead of passing silently.
//!
//! Each probe sets a `cfg` (`have_ort`, `have_python`, …) that the integration tests use as
//! `#[cfg_attr(not(have_ort), ignore = "…")]`. Nothing in the library or the binary depends on
//! these flags. CI (`scripts/test`) runs the tests with `--include-ignored`, so a dependency
//! that is missing there fails the test that needs it. The probes run when this file or one of
//! the watched variables changes, and when the watched folders change: after installing a
//! dependency by hand, `touch build.rs` (scripts/setup does it).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `(cfg name, what it means)`.
const FLAGS: &[&str] = &[
    "have_ort",
    "have_python",
    "have_turbojpeg",
    "have_nvrtc",
    "have_gpu",
    "have_systemd_analyze",
    "have_dpkg_deb",
    "have_openssl",
    "have_deb",
    "have_chromium",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for var in [
        "ORT_DYLIB_PATH",
        "ANOMALYCLIP_PYTHON",
        "LD_LIBRARY_PATH",
        "PATH",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    for flag in FLAGS {
        println!("cargo::rustc-check-cfg=cfg({flag})");
    }
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    // Watch the folders scripts/setup fills, when they exist (a missing path would make cargo
    // rerun this script, and rebuild the crate, on every build).
    for rel in [".deps", ".venv/bin", "target/debian"] {
        if root.join(rel).is_dir() {
            println!("cargo::rerun-if-changed={rel}");
        }
    }

    let ldconfig = Command::new("ldconfig")
        .arg("-p")
        .output()
        .or_else(|_| Command::new("/sbin/ldconfig").arg("-p").output())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let has_lib = |name: &str| ldconfig.contains(name);

    let ort = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| {
            Some(root.join(".deps/onnxruntime/lib/libonnxruntime.so")).filter(|p| p.is_file())
        });
    set("have_ort", ort.is_some());
    set(
        "have_python",
        root.join(".venv/bin/python").is_file()
            || std::env::var_os("ANOMALYCLIP_PYTHON").is_some_and(|p| !p.is_empty()),
    );
    set("have_turbojpeg", has_lib("libturbojpeg.so.0"));
    set(
        "have_nvrtc",
        root.join(".deps/nvrtc/libnvrtc.so.12").is_file() || has_lib("libnvrtc.so"),
    );
    set(
        "have_gpu",
        Path::new("/dev/nvidia0").exists() && has_lib("libcuda.so.1"),
    );
    set("have_systemd_analyze", on_path("systemd-analyze"));
    set("have_dpkg_deb", on_path("dpkg-deb"));
    set("have_openssl", on_path("openssl"));
    set("have_chromium", on_path("chromium"));
    let deb = std::fs::read_dir(root.join("target/debian"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        })
        .unwrap_or(false);
    set("have_deb", deb);
}

fn set(flag: &str, on: bool) {
    if on {
        println!("cargo::rustc-cfg={flag}");
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}
