//! ONNX Runtime's CUDA execution provider on a GPU, against the `cpu` backend + CPU head (the
//! reference) on every golden image: the `cuda` backend with the CPU head, and the whole GPU path
//! (outputs bound to device memory with IoBinding, read there by the GPU head).
//! Needs a GPU build of the ONNX Runtime library (`ORT_DYLIB_PATH` → the `onnxruntime-gpu`
//! wheel's `libonnxruntime.so`); elsewhere it prints why and passes. Run by hand on a GPU machine
//! (see docs/measurements/cuda-ep-h100.txt); CI has neither a GPU nor that library.

use crate::support as gpu_common;

use anomalyclip_edge::engine::{Backend, EngineError};
use anomalyclip_edge::scorer::{HeadChoice, ScoreError, Scored, Scorer};
use gpu_common::{golden_images, gpu_and_runtime_ready, max_abs_diff, open_tiny};

/// The `cuda` backend; an ONNX Runtime library without the CUDA EP fails the test (a GPU
/// machine must carry the onnxruntime-gpu libraries, see scripts/gpu-check).
fn open_cuda() -> Option<Scorer> {
    match open_tiny(Backend::Cuda) {
        Ok(s) => Some(s),
        Err(ScoreError::Engine(e @ EngineError::Unavailable { .. })) => {
            panic!("the CUDA execution provider is unavailable: {e}")
        }
        Err(e) => panic!("cuda backend: {e}"),
    }
}

/// Worst score and map |Δ| of `results` against the CPU path, image by image.
fn worst_against_cpu(results: &[Scored]) -> (f32, f32) {
    let mut cpu = open_tiny(Backend::Cpu).expect("cpu backend");
    let (mut ws, mut wm) = (0f32, 0f32);
    for (p, b) in golden_images().iter().zip(results) {
        let (_, a) = cpu.score_file(p).expect("cpu");
        ws = ws.max((a.score - b.score).abs());
        wm = wm.max(max_abs_diff(&a.map, &b.map));
    }
    (ws, wm)
}

#[cfg_attr(
    not(have_gpu),
    ignore = "needs a CUDA GPU: on a GPU machine run scripts/gpu-check (--include-ignored)"
)]
#[test]
fn cuda_backend_matches_the_cpu_backend() {
    if !gpu_and_runtime_ready() {
        return;
    }
    let Some(mut cuda) = open_cuda() else { return };
    assert_eq!(cuda.engine().info().backend, Backend::Cuda);
    let results: Vec<Scored> = golden_images()
        .iter()
        .map(|p| cuda.score_file(p).expect("cuda").1)
        .collect();
    let (ws, wm) = worst_against_cpu(&results);
    println!("PARITY kernel=cuda_ep_score case=golden max_abs={ws:e}");
    println!("PARITY kernel=cuda_ep_map case=golden max_abs={wm:e}");
    // fp32 parity targets of the spec (§7).
    assert!(ws <= 1e-4, "score |Δ| {ws}");
    assert!(wm <= 1e-4, "map |Δ| {wm}");
}

#[cfg_attr(
    not(have_gpu),
    ignore = "needs a CUDA GPU: on a GPU machine run scripts/gpu-check (--include-ignored)"
)]
#[test]
fn cuda_backend_with_gpu_head_matches_the_cpu_path() {
    if !gpu_and_runtime_ready() {
        return;
    }
    let Some(cuda) = open_cuda() else { return };
    let mut gpu = cuda.with_head(HeadChoice::Gpu).expect("gpu head");
    assert_eq!(gpu.head_device(), "gpu");
    // One batch through the device path.
    let images = golden_images();
    let s = gpu.size();
    let mut input = vec![0f32; images.len() * 3 * s * s];
    for (i, p) in images.iter().enumerate() {
        let img = anomalyclip_edge::image_io::load_image(p).expect("decode");
        gpu.prepare_image(&img, &mut input[i * 3 * s * s..(i + 1) * 3 * s * s])
            .expect("prepare");
    }
    let batch = gpu.score_batch(&input, images.len()).expect("gpu batch");
    let (ws, wm) = worst_against_cpu(&batch);
    println!("PARITY kernel=iobinding_gpu_head_score case=golden max_abs={ws:e}");
    println!("PARITY kernel=iobinding_gpu_head_map case=golden max_abs={wm:e}");
    assert!(ws <= 1e-4, "score |Δ| {ws}");
    assert!(wm <= 1e-4, "map |Δ| {wm}");
}

/// A model that emits NaN (`tests/fixtures/nan_when_dark`: NaN global feature for a black image)
/// on the whole GPU path: the GPU head finds the NaN in the engine's device memory and fails that
/// image only, naming the global feature; the white image of the same batch is scored.
#[cfg_attr(
    not(have_gpu),
    ignore = "needs a CUDA GPU: on a GPU machine run scripts/gpu-check (--include-ignored)"
)]
#[test]
fn nan_in_device_memory_fails_that_image_only() {
    use anomalyclip_edge::engine::EngineOptions;
    use anomalyclip_edge::head::FrameValue;
    use anomalyclip_edge::package::HashCheck;
    if !gpu_and_runtime_ready() {
        return;
    }
    let opts = EngineOptions {
        backend: Backend::Cuda,
        ..EngineOptions::default()
    };
    let cuda = match Scorer::open(&gpu_common::fixture("nan_when_dark"), HashCheck::All, &opts) {
        Ok(s) => s,
        Err(ScoreError::Engine(e @ EngineError::Unavailable { .. })) => {
            panic!("the CUDA execution provider is unavailable: {e}")
        }
        Err(e) => panic!("cuda backend: {e}"),
    };
    let mut gpu = cuda.with_head(HeadChoice::Gpu).expect("gpu head");
    let dir = tempfile::tempdir().expect("tempdir");
    let png = |name: &str, v: u8| {
        let p = dir.path().join(name);
        image::RgbImage::from_pixel(64, 48, image::Rgb([v; 3]))
            .save(&p)
            .expect("png");
        p
    };
    let (black, white) = (png("black.png", 0), png("white.png", 255));
    let results = gpu.score_files(&[&black, &white]).expect("the batch runs");
    match &results[0] {
        Err(ScoreError::NonFinite(n)) => {
            assert_eq!((n.what, n.count), (FrameValue::GlobalFeature, 32));
        }
        other => panic!("black image: expected ScoreError::NonFinite, got {other:?}"),
    }
    let lit = results[1].as_ref().expect("white image scored");
    assert!(lit.score.is_finite() && lit.map.iter().all(|v| v.is_finite()));
    println!(
        "NONFINITE device path: black -> {}",
        results[0].as_ref().unwrap_err()
    );
}
