//! Fixture loading shared by the integration tests (fixtures from `engines/make_head_fixtures.py`).

use std::path::{Path, PathBuf};

use serde_json::Value;

pub fn fixtures(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(sub)
}

pub fn index(sub: &str) -> Value {
    let path = fixtures(sub).join("index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("index.json parses")
}

pub fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn f32_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A float32 file named by `v` (a string) in fixture folder `sub`.
pub fn f32_file(sub: &str, v: &Value) -> Vec<f32> {
    f32_le(&bytes(&fixtures(sub).join(v.as_str().expect("file name"))))
}

/// A blob-backed fixture folder: entries are `[offset, length]` into `data.bin`.
pub struct Blob {
    pub index: Value,
    data: Vec<u8>,
}

impl Blob {
    pub fn open(sub: &str) -> Blob {
        let index = index(sub);
        let data = bytes(&fixtures(sub).join("data.bin"));
        Blob { index, data }
    }

    pub fn u8(&self, entry: &Value) -> &[u8] {
        let off = entry[0].as_u64().expect("offset") as usize;
        let len = entry[1].as_u64().expect("length") as usize;
        &self.data[off..off + len]
    }

    pub fn f32(&self, entry: &Value) -> Vec<f32> {
        f32_le(self.u8(entry))
    }
}

pub fn usize_of(v: &Value, key: &str) -> usize {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("missing {key} in {v}")) as usize
}

/// Largest absolute difference and its index.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut worst = (0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i);
        }
    }
    worst
}

/// `full[rows × cols]` picked from a `full_h × full_w` map (`w` = full width).
pub fn subgrid(full: &[f32], w: usize, rows: &Value, cols: &Value) -> Vec<f32> {
    let rows: Vec<usize> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let cols: Vec<usize> = cols
        .as_array()
        .expect("cols")
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for r in &rows {
        for c in &cols {
            out.push(full[r * w + c]);
        }
    }
    out
}

/// Writes an 8-bit RGB PNG (`px`: `w × h × 3` bytes).
pub fn write_rgb_png(path: &Path, w: u32, h: u32, px: &[u8]) {
    let f = std::fs::File::create(path).expect("create png");
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    e.set_color(png::ColorType::Rgb);
    e.set_depth(png::BitDepth::Eight);
    e.write_header()
        .expect("header")
        .write_image_data(px)
        .expect("png data");
}
