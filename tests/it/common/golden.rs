//! The golden fixtures (`tests/fixtures/golden`, written by `engines/make_fixtures.py` with the
//! PyTorch reference) and the ONNX Runtime library the end-to-end tests need.

use std::path::PathBuf;

use serde_json::Value;

use super::fx::{bytes, f32_le, fixtures, index};

/// One image of the golden index.
#[derive(Clone, Debug)]
pub struct GoldenImage {
    pub name: String,
    pub path: PathBuf,
    pub width: usize,
    pub height: usize,
    pub mode: String,
    pub score: f32,
    pub map_max: f32,
}

/// The golden index: package size, grid, dim and the images.
pub struct Golden {
    pub size: usize,
    pub grid: usize,
    pub dim: usize,
    pub images: Vec<GoldenImage>,
}

impl Golden {
    pub fn load() -> Golden {
        let idx: Value = index("golden");
        let get = |k: &str| idx[k].as_u64().unwrap_or_else(|| panic!("index.json: {k}")) as usize;
        let images = idx["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|e| GoldenImage {
                name: e["name"].as_str().expect("name").to_string(),
                path: fixtures("golden").join(e["file"].as_str().expect("file")),
                width: e["width"].as_u64().expect("width") as usize,
                height: e["height"].as_u64().expect("height") as usize,
                mode: e["mode"].as_str().expect("mode").to_string(),
                score: e["score"].as_f64().expect("score") as f32,
                map_max: e["map_max"].as_f64().expect("map_max") as f32,
            })
            .collect();
        Golden {
            size: get("size"),
            grid: get("grid"),
            dim: get("dim"),
            images,
        }
    }

    /// `ref/<stem>.<what>.f32`.
    pub fn reference(&self, stem: &str, what: &str) -> Vec<f32> {
        f32_le(&bytes(
            &fixtures("golden")
                .join("ref")
                .join(format!("{stem}.{what}.f32")),
        ))
    }
}

/// The committed tiny package the golden fixtures were made with.
pub fn tiny_package() -> PathBuf {
    fixtures("tiny")
}

/// Where the ONNX Runtime library is: `ORT_DYLIB_PATH` (scripts/env.sh sets it), else the copy
/// `scripts/setup` unpacks into `.deps/onnxruntime/lib`.
pub fn ort_library() -> Option<PathBuf> {
    let p = match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".deps/onnxruntime/lib/libonnxruntime.so"),
    };
    p.is_file().then_some(p)
}

/// The ONNX Runtime library for the tests that run it. Those tests are marked ignored when the
/// library was missing at build time (`#[cfg_attr(not(have_ort), ignore)]`); a test that runs
/// anyway (`--include-ignored`, as CI does) fails without it.
pub fn ort_or_skip(test: &str) -> Option<PathBuf> {
    let lib = ort_library();
    // The test is marked ignored at compile time when the library is missing (`build.rs`):
    // reaching this without it is a failure, never a silent pass.
    assert!(
        lib.is_some(),
        "{test}: ONNX Runtime library not found (run scripts/setup, source scripts/env.sh)"
    );
    lib
}

/// Cosine similarity of two vectors (f64 accumulation).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Smallest per-row cosine of two `[rows, dim]` matrices.
pub fn min_row_cosine(a: &[f32], b: &[f32], dim: usize) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.chunks_exact(dim)
        .zip(b.chunks_exact(dim))
        .map(|(x, y)| cosine(x, y))
        .fold(f64::INFINITY, f64::min)
}
