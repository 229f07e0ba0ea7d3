//! ONNX Runtime's CUDA execution provider on a GPU: the tiny package through the `cuda` backend
//! against the `cpu` backend (the reference), on every golden image, head on the CPU for both.
//! Needs a GPU build of the ONNX Runtime library (`ORT_DYLIB_PATH` → the `onnxruntime-gpu`
//! wheel's `libonnxruntime.so`); elsewhere it prints why and passes. Run by hand on a GPU machine
//! (see docs/measurements); CI has neither a GPU nor that library.

use std::path::{Path, PathBuf};

use anomalyclip_edge::engine::{self, Backend, EngineError, EngineOptions};
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::scorer::{ScoreError, Scorer};

fn fixture(sub: &str) -> PathBuf {
    let rel = Path::new("tests/fixtures").join(sub);
    if rel.exists() {
        rel
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(sub)
    }
}

#[test]
fn cuda_backend_matches_the_cpu_backend() {
    if !anomalyclip_edge::gpu::probe().is_usable() {
        println!("skipped: no usable GPU");
        return;
    }
    if let Err(e) = engine::init_runtime(None) {
        println!("skipped: {e}");
        return;
    }
    let tiny = fixture("tiny");
    let open = |backend| {
        Scorer::open(
            &tiny,
            HashCheck::All,
            &EngineOptions {
                backend,
                ..EngineOptions::default()
            },
        )
    };
    let mut cpu = open(Backend::Cpu).expect("cpu backend");
    let mut cuda = match open(Backend::Cuda) {
        Ok(s) => s,
        Err(ScoreError::Engine(e @ EngineError::Unavailable { .. })) => {
            println!("skipped: {e}");
            return;
        }
        Err(e) => panic!("cuda backend: {e}"),
    };
    assert_eq!(cuda.engine().info().backend, Backend::Cuda);
    let mut images: Vec<PathBuf> = std::fs::read_dir(fixture("golden/images"))
        .expect("golden images")
        .map(|e| e.expect("entry").path())
        .collect();
    images.sort();
    let (mut ws, mut wm) = (0f32, 0f32);
    for p in &images {
        let (_, a) = cpu.score_file(p).expect("cpu");
        let (_, b) = cuda.score_file(p).expect("cuda");
        let dm = a
            .map
            .iter()
            .zip(&b.map)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        ws = ws.max((a.score - b.score).abs());
        wm = wm.max(dm);
    }
    println!("PARITY kernel=cuda_ep_score case=golden max_abs={ws:e}");
    println!("PARITY kernel=cuda_ep_map case=golden max_abs={wm:e}");
    // fp32 parity targets of the spec (§7).
    assert!(ws <= 1e-4, "score |Δ| {ws}");
    assert!(wm <= 1e-4, "map |Δ| {wm}");
}

/// The whole GPU path: encoder on the CUDA execution provider with its outputs bound to device
/// memory (IoBinding), the head's CUDA kernels reading them there, against the CPU encoder + CPU
/// head.
#[test]
fn cuda_backend_with_gpu_head_matches_the_cpu_path() {
    use anomalyclip_edge::scorer::HeadChoice;
    if !anomalyclip_edge::gpu::probe().is_usable() {
        println!("skipped: no usable GPU");
        return;
    }
    if let Err(e) = engine::init_runtime(None) {
        println!("skipped: {e}");
        return;
    }
    let tiny = fixture("tiny");
    let open = |backend| {
        Scorer::open(
            &tiny,
            HashCheck::All,
            &EngineOptions {
                backend,
                ..EngineOptions::default()
            },
        )
    };
    let mut cpu = open(Backend::Cpu).expect("cpu backend");
    let mut gpu = match open(Backend::Cuda) {
        Ok(s) => s.with_head(HeadChoice::Gpu).expect("gpu head"),
        Err(ScoreError::Engine(e @ EngineError::Unavailable { .. })) => {
            println!("skipped: {e}");
            return;
        }
        Err(e) => panic!("cuda backend: {e}"),
    };
    assert_eq!(gpu.head_device(), "gpu");
    let mut images: Vec<PathBuf> = std::fs::read_dir(fixture("golden/images"))
        .expect("golden images")
        .map(|e| e.expect("entry").path())
        .collect();
    images.sort();
    // One batch through the device path, compared image by image with the CPU path.
    let s = gpu.size();
    let mut input = vec![0f32; images.len() * 3 * s * s];
    for (i, p) in images.iter().enumerate() {
        let img = anomalyclip_edge::image_io::load_image(p).expect("decode");
        gpu.prepare_image(&img, &mut input[i * 3 * s * s..(i + 1) * 3 * s * s])
            .expect("prepare");
    }
    let batch = gpu.score_batch(&input, images.len()).expect("gpu batch");
    let (mut ws, mut wm) = (0f32, 0f32);
    for (p, b) in images.iter().zip(&batch) {
        let (_, a) = cpu.score_file(p).expect("cpu");
        let dm = a
            .map
            .iter()
            .zip(&b.map)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        ws = ws.max((a.score - b.score).abs());
        wm = wm.max(dm);
    }
    println!("PARITY kernel=iobinding_gpu_head_score case=golden max_abs={ws:e}");
    println!("PARITY kernel=iobinding_gpu_head_map case=golden max_abs={wm:e}");
    assert!(ws <= 1e-4, "score |Δ| {ws}");
    assert!(wm <= 1e-4, "map |Δ| {wm}");
}
