//! CI check that needs no GPU: every kernel of the GPU head compiles with NVRTC to PTX for the
//! architectures we deploy on, and each entry point named in `gpu::KERNEL_NAMES` is in the PTX.
//!
//! NVRTC comes from the system toolkit or from `scripts/fetch-nvrtc` (`.deps/nvrtc/`). Without it
//! the tests show as ignored (`build.rs`); CI runs them with `--include-ignored`, so a missing
//! NVRTC fails there.

use anomalyclip_edge::gpu::{self, GpuError, Image, KERNEL_NAMES, Target};

/// Architectures checked: A100 (8.0), A10/RTX 30 (8.6), L4/RTX 40 (8.9), H100 (9.0).
const ARCHS: [(i32, i32); 4] = [(8, 0), (8, 6), (8, 9), (9, 0)];

/// True when NVRTC is usable; otherwise prints why and returns false (or panics in CI mode).
fn nvrtc_or_skip(test: &str) -> bool {
    match gpu::nvrtc_library() {
        Ok(location) => {
            let version = gpu::nvrtc_version().expect("nvrtcVersion");
            eprintln!("{test}: nvrtc {}.{} from {location}", version.0, version.1);
            true
        }
        Err(e) => panic!("{test}: NVRTC is unusable: {e}"),
    }
}

#[cfg_attr(
    not(have_nvrtc),
    ignore = "needs NVRTC: scripts/fetch-nvrtc (no GPU needed)"
)]
#[test]
fn every_kernel_compiles_to_ptx() {
    if !nvrtc_or_skip("every_kernel_compiles_to_ptx") {
        return;
    }
    for cc in ARCHS {
        let image = gpu::compile_kernels(cc, Target::Ptx)
            .unwrap_or_else(|e| panic!("compute_{}{}: {e}", cc.0, cc.1));
        let Image::Ptx(ptx) = image else {
            panic!("PTX target returned a CUBIN")
        };
        let target = format!(".target sm_{}{}", cc.0, cc.1);
        assert!(ptx.contains(&target), "PTX lacks `{target}`");
        for name in KERNEL_NAMES {
            let entry = format!(".visible .entry {name}(");
            assert!(
                ptx.contains(&entry),
                "compute_{}{}: kernel {name} missing from the PTX",
                cc.0,
                cc.1
            );
        }
        println!(
            "compute_{}{}: {} kernels, {} bytes of PTX",
            cc.0,
            cc.1,
            KERNEL_NAMES.len(),
            ptx.len()
        );
    }
}

#[cfg_attr(
    not(have_nvrtc),
    ignore = "needs NVRTC: scripts/fetch-nvrtc (no GPU needed)"
)]
#[test]
fn kernels_compile_to_cubin_for_h100() {
    if !nvrtc_or_skip("kernels_compile_to_cubin_for_h100") {
        return;
    }
    // What GpuHead::new tries first on a device: SASS for the real architecture.
    let image = gpu::compile_kernels((9, 0), Target::Cubin).expect("sm_90 cubin");
    let Image::Cubin(bytes) = image else {
        panic!("CUBIN target returned PTX")
    };
    assert!(bytes.starts_with(b"\x7fELF"), "a CUBIN is an ELF image");
    for name in KERNEL_NAMES {
        let found = bytes.windows(name.len()).any(|w| w == name.as_bytes());
        assert!(found, "kernel {name} missing from the CUBIN symbols");
    }
}

#[cfg_attr(
    not(have_nvrtc),
    ignore = "needs NVRTC: scripts/fetch-nvrtc (no GPU needed)"
)]
#[test]
fn compile_errors_carry_the_nvrtc_log() {
    if !nvrtc_or_skip("compile_errors_carry_the_nvrtc_log") {
        return;
    }
    let bad = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
    let err = gpu::sys::compile(
        bad,
        "bad.cu",
        &["--gpu-architecture=compute_80".into()],
        false,
    )
    .expect_err("must not compile");
    match err {
        GpuError::Compile { log, .. } => assert!(log.contains("undefined_name"), "log: {log}"),
        other => panic!("expected a compile error, got {other}"),
    }
}

#[test]
fn kernel_source_is_self_contained() {
    // NVRTC has no system headers unless told where they are: keep the source include-free.
    let includes = gpu::KERNEL_SOURCE
        .lines()
        .any(|l| l.trim_start().starts_with("#include"));
    assert!(!includes, "kernels.cu must not #include anything");
    for name in KERNEL_NAMES {
        let decl = format!("extern \"C\" __global__ void {name}(");
        assert!(
            gpu::KERNEL_SOURCE.contains(&decl),
            "{name} is not extern \"C\""
        );
    }
}

#[test]
fn probe_never_panics_and_explains_itself() {
    let p = gpu::probe();
    println!("probe: {p}");
    if !p.is_usable() {
        assert!(!p.problems.is_empty(), "an unusable GPU must say why");
    }
}
