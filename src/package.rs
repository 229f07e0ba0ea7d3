//! Model package loader: the directory `engines/export.py` writes (see `engines/PACKAGE.md`).
//!
//! Input: a package directory. Output: a validated [`ModelPackage`] holding the parsed manifest,
//! the text constant `T = [t_n; t_a]` and the paths of its ONNX files, one per precision the
//! manifest lists (`precisions`; [`ModelPackage::model_path`] refuses one the package lacks).
//! Failure modes: a missing directory or file, a manifest that does not parse, a format version
//! this build does not read, shapes that contradict each other, a file whose SHA-256 differs from
//! the manifest. Every error names the file and what was expected.
//!
//! The package comes from outside, so nothing in it is trusted: every file is opened through
//! [`crate::fsio`] (regular files only, size bounded before reading: a FIFO or `/dev/zero` is
//! refused, not read); every size derived from the manifest is computed with checked arithmetic
//! and bounded ([`MAX_INPUT_SIZE`], [`MAX_EMBED_DIM`], [`MAX_LAYERS`], [`MAX_LOCAL_FEATURES`]),
//! so a hostile manifest gets a message instead of an overflow (a panic in debug builds, a
//! silently wrapped size in release builds); every number in the manifest must be finite, and
//! `model.tau` and `input.std` strictly positive and normal (a NaN, infinite, zero or denormal
//! value would turn every score into NaN or 0.5); `[files]` names must be plain relative paths
//! that stay inside the package directory, symlinks included.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::engine::config::Precision;
use crate::fsio::{self, FsioError};

/// The only manifest format version this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest `input.size` (square input edge in pixels). The real model runs at 518; 4096 is
/// already a 200 MB float input per image.
pub const MAX_INPUT_SIZE: usize = 4096;

/// Largest `model.embed_dim` (D). CLIP ViT-L/14 has 768, the largest CLIP (ViT-bigG) 1280.
pub const MAX_EMBED_DIM: usize = 16384;

/// Largest `model.layers`. ViT-L has 24 blocks, ViT-bigG 48.
pub const MAX_LAYERS: usize = 1024;

/// Largest `grid² × embed_dim`: floats in one local feature map of one image (the engine and the
/// head allocate this per feature layer). The real model: 37² × 768 ≈ 1.05 M; the bound, 2²⁶,
/// is 256 MB of float32.
pub const MAX_LOCAL_FEATURES: usize = 1 << 26;

/// How far a text row's L2 norm may be from 1. float32 rounding of a normalised 768-vector is
/// ~1e-7; fp16 storage upstream ~1e-3 at worst.
pub const TEXT_NORM_TOLERANCE: f64 = 1e-2;

/// Errors while loading a model package.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("model package {0}: no such directory (export one with engines/export.py)")]
    MissingDir(PathBuf),
    /// A package file that is not a regular file, too large, or unreadable.
    #[error(transparent)]
    File(#[from] FsioError),
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(
        "{path}: format_version {found} is not supported (this build reads {FORMAT_VERSION}); re-export the package with this release's engines/export.py"
    )]
    Version { path: PathBuf, found: i64 },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{dir}: this model package has no {wanted} model (it has {has}); choose one of those, or re-export the package with engines/export.py --{wanted}"
    )]
    MissingPrecision {
        dir: PathBuf,
        wanted: Precision,
        has: String,
    },
    #[error(
        "{path}: SHA-256 mismatch: manifest says {expected}, file has {actual} (corrupt or modified package)"
    )]
    Hash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// `[input]` of the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// `[model]` of the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: String,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub patch: usize,
    pub grid: usize,
    pub embed_dim: usize,
    pub vv_start: usize,
    pub feature_layers: Vec<usize>,
    pub tau: f32,
    /// Blocks whose local features a few-shot reference bank uses (`src/reference.rs`); empty
    /// or absent: `feature_layers`. Layers not in `feature_layers` are extra outputs that the
    /// anomaly head never reads.
    #[serde(default)]
    pub few_shot_layers: Vec<usize>,
    /// How the graph computes attention (`engines/export.py --fused-attention`); absent: plain.
    #[serde(default)]
    pub attention: Attention,
}

/// `[model] attention`: plain ONNX operators (every backend), or ONNX Runtime's fused
/// `com.microsoft.MultiHeadAttention` (CPU and CUDA execution providers; TensorRT runs those
/// nodes outside its engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    #[default]
    Plain,
    Fused,
}

/// `[text]` of the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    pub file: String,
    #[serde(deserialize_with = "two_dims")]
    pub shape: [usize; 2],
}

/// `text.shape`: exactly two dimensions (serde's fixed-size arrays would ignore extra ones).
fn two_dims<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[usize; 2], D::Error> {
    let v = Vec::<usize>::deserialize(d)?;
    <[usize; 2]>::try_from(v.as_slice()).map_err(|_| {
        serde::de::Error::custom(format!(
            "expected two dimensions [2, embed_dim], found {} ({v:?})",
            v.len()
        ))
    })
}

/// One dimension of an output shape: a fixed size or the symbolic batch dimension.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Symbolic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => write!(f, "{s:?}"),
        }
    }
}

/// A shape as the manifest writes it: `["batch", 1369, 768]`.
fn shape_str(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(Dim::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// One `[[outputs]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub shape: Vec<Dim>,
    #[serde(default)]
    pub layer: Option<usize>,
}

/// The whole `manifest.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    #[serde(default)]
    pub tiny: bool,
    /// Model files present, by precision (`"fp32"`, `"fp16"`, `"int8"`); absent in packages
    /// written before it existed: then derived from `[files]` ([`ModelPackage::precisions`]).
    #[serde(default)]
    pub precisions: Option<Vec<String>>,
    pub input: InputSpec,
    pub model: ModelSpec,
    pub text: TextSpec,
    pub outputs: Vec<OutputSpec>,
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub source: Option<toml::Table>,
}

/// Whether to verify the SHA-256 of the package files on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashCheck {
    /// Hash every file.
    All,
    /// Hash files up to this many bytes; larger ones (the full-size ONNX weights) are only
    /// checked for presence. Start-up of the real model then costs no seconds of hashing.
    UpTo(u64),
    /// Check presence only.
    None,
}

/// A loaded, validated model package.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Text constant `[2, D]`, row-major: row 0 normal, row 1 anomalous.
    pub text: Vec<f32>,
}

impl ModelPackage {
    /// Loads and validates the package in `dir`.
    pub fn load(dir: &Path, hashes: HashCheck) -> Result<Self, PackageError> {
        if !dir.is_dir() {
            return Err(PackageError::MissingDir(dir.to_path_buf()));
        }
        let manifest_path = dir.join("manifest.toml");
        let raw = fsio::read_limited_string(&manifest_path, fsio::MAX_MANIFEST, "manifest")?;
        // Read the version first so that a future format gets the version message, not a
        // list of unknown fields.
        let table = toml::from_str::<toml::Table>(&raw).map_err(|e| PackageError::Manifest {
            path: manifest_path.clone(),
            message: one_line(&e.to_string()),
        })?;
        let version = table.get("format_version").and_then(|v| v.as_integer());
        match version {
            Some(v) if v == i64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(PackageError::Version {
                    path: manifest_path,
                    found: v,
                });
            }
            None => {
                return Err(PackageError::Manifest {
                    path: manifest_path,
                    message: "missing integer field `format_version`".into(),
                });
            }
        }
        let manifest: Manifest = toml::from_str(&raw).map_err(|e| PackageError::Manifest {
            path: manifest_path.clone(),
            message: one_line(&e.to_string()),
        })?;
        // Every number, [source] included: one NaN anywhere is a broken export.
        if let Some((key, value)) = non_finite(&toml::Value::Table(table), String::new()) {
            return Err(PackageError::Invalid {
                path: manifest_path,
                message: format!("{key} is {value}: every number in the manifest must be finite"),
            });
        }
        validate(&manifest, &manifest_path)?;
        let canon_dir = dir.canonicalize().map_err(|source| PackageError::Read {
            path: dir.to_path_buf(),
            source,
        })?;

        for (file, expected) in &manifest.files {
            let path = dir.join(file);
            inside_package(&canon_dir, file, &path, &manifest_path)?;
            // Opened even when not hashed: a FIFO or a device is refused here, not read later.
            let (f, size) = fsio::open_regular(&path, fsio::MAX_PACKAGE_FILE, "package file")?;
            let hash = match hashes {
                HashCheck::All => true,
                HashCheck::UpTo(limit) => size <= limit,
                HashCheck::None => false,
            };
            if hash {
                let actual = sha256_reader(f, &path)?;
                if !actual.eq_ignore_ascii_case(expected) {
                    return Err(PackageError::Hash {
                        path,
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
        }

        let text_path = dir.join(&manifest.text.file);
        let bytes = fsio::read_limited(&text_path, fsio::MAX_TEXT_FILE, "text constant")?;
        let [rows, dim] = manifest.text.shape;
        // validate() bounded rows (2) and dim (MAX_EMBED_DIM): no overflow, and within
        // MAX_TEXT_FILE.
        let expected = rows * dim * 4;
        if bytes.len() != expected {
            return Err(PackageError::Invalid {
                path: text_path,
                message: format!(
                    "expected {expected} bytes (float32 [{rows}, {dim}]), found {}",
                    bytes.len()
                ),
            });
        }
        let text: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if text.iter().any(|v| !v.is_finite()) {
            return Err(PackageError::Invalid {
                path: text_path,
                message: "text constant holds NaN or infinite values".into(),
            });
        }
        // The exporter writes each prompt's features L2-normalised (official `test.py`); a row
        // that is not (all zeros, a foreign file) would give every image the same score.
        for (row, values) in text.chunks_exact(dim.max(1)).enumerate() {
            let norm = values
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt();
            if (norm - 1.0).abs() > TEXT_NORM_TOLERANCE {
                return Err(PackageError::Invalid {
                    path: text_path,
                    message: format!(
                        "row {row} ({}) has L2 norm {norm:.6}, expected 1 within \
                         {TEXT_NORM_TOLERANCE} (the exporter writes L2-normalised prompt features)",
                        if row == 0 { "normal" } else { "anomalous" }
                    ),
                });
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            text,
        })
    }

    /// Path of the fp32 ONNX model.
    pub fn onnx_path(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }

    /// The precisions this package has: the manifest's `precisions` (validated on load), or for
    /// a package without that list, fp32 plus each precision whose model file `[files]` lists.
    pub fn precisions(&self) -> Vec<Precision> {
        precisions_of(&self.manifest).unwrap_or_default()
    }

    /// Path of the model file for `precision`, or [`PackageError::MissingPrecision`] naming
    /// what the package has.
    pub fn model_path(&self, precision: Precision) -> Result<PathBuf, PackageError> {
        let has = self.precisions();
        if has.contains(&precision) {
            return Ok(self.dir.join(precision.model_file()));
        }
        Err(PackageError::MissingPrecision {
            dir: self.dir.clone(),
            wanted: precision,
            has: has
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Square input edge in pixels.
    pub fn input_size(&self) -> usize {
        self.manifest.input.size
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.manifest.model.grid
    }

    /// Output feature dimension D.
    pub fn dim(&self) -> usize {
        self.manifest.model.embed_dim
    }

    /// ONNX output names of the local features the engine returns: `feature_layers` (the head's,
    /// first, in order), then the `few_shot_layers` not among them ([`ModelPackage::output_layers`]).
    pub fn local_output_names(&self) -> Vec<String> {
        self.output_layers()
            .iter()
            .map(|l| format!("local_{l}"))
            .collect()
    }

    /// Blocks of the local outputs the engine returns, in order: `feature_layers`, then the
    /// `few_shot_layers` not among them.
    pub fn output_layers(&self) -> Vec<usize> {
        let m = &self.manifest.model;
        let mut v = m.feature_layers.clone();
        v.extend(
            m.few_shot_layers
                .iter()
                .filter(|l| !m.feature_layers.contains(l)),
        );
        v
    }

    /// Blocks a reference bank uses: `few_shot_layers`, or `feature_layers` when none are given.
    pub fn bank_layers(&self) -> &[usize] {
        let m = &self.manifest.model;
        if m.few_shot_layers.is_empty() {
            &m.feature_layers
        } else {
            &m.few_shot_layers
        }
    }

    /// For each of [`ModelPackage::bank_layers`], its index among the engine's local outputs.
    pub fn bank_output_indices(&self) -> Vec<usize> {
        let out = self.output_layers();
        self.bank_layers()
            .iter()
            .filter_map(|l| out.iter().position(|o| o == l))
            .collect()
    }

    /// SHA-256 of the fp32 ONNX file as recorded in the manifest (engine cache key).
    pub fn onnx_sha256(&self) -> Option<&str> {
        self.manifest.files.get("model.onnx").map(String::as_str)
    }
}

fn validate(m: &Manifest, path: &Path) -> Result<(), PackageError> {
    let bad = |message: String| PackageError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let md = &m.model;
    // Numbers first: they are f32 after parsing, so a finite TOML value such as 1e300 may have
    // become infinite, and 1e-40 denormal.
    for (i, v) in m.input.mean.iter().enumerate() {
        if !v.is_finite() {
            return Err(bad(format!(
                "input.mean[{i}] is {v}: expected a finite number"
            )));
        }
    }
    for (i, v) in m.input.std.iter().enumerate() {
        if !(v.is_normal() && *v > 0.0) {
            return Err(bad(format!(
                "input.std[{i}] is {v:e}: expected a positive normal float32 (the reference: 0.27)"
            )));
        }
    }
    if !(md.tau.is_normal() && md.tau > 0.0) {
        return Err(bad(format!(
            "model.tau is {:e}: expected a positive normal float32 (AnomalyCLIP: 0.07)",
            md.tau
        )));
    }
    if md.patch == 0 || md.grid == 0 || md.embed_dim == 0 {
        return Err(bad(
            "model.patch, model.grid and model.embed_dim must be > 0".into(),
        ));
    }
    if m.input.size == 0 || m.input.size > MAX_INPUT_SIZE {
        return Err(bad(format!(
            "input.size {} is out of range (expected 1 to {MAX_INPUT_SIZE})",
            m.input.size
        )));
    }
    if md.grid.checked_mul(md.patch) != Some(m.input.size) {
        return Err(bad(format!(
            "model.grid ({}) × model.patch ({}) must equal input.size ({})",
            md.grid, md.patch, m.input.size
        )));
    }
    if md.embed_dim > MAX_EMBED_DIM {
        return Err(bad(format!(
            "model.embed_dim {} is out of range (expected 1 to {MAX_EMBED_DIM})",
            md.embed_dim
        )));
    }
    if md.layers == 0 || md.layers > MAX_LAYERS {
        return Err(bad(format!(
            "model.layers {} is out of range (expected 1 to {MAX_LAYERS})",
            md.layers
        )));
    }
    // grid ≤ input.size ≤ MAX_INPUT_SIZE and embed_dim ≤ MAX_EMBED_DIM: these cannot overflow a
    // 64-bit usize, but checked all the same (32-bit targets).
    let patches = md.grid.checked_mul(md.grid);
    let fits = patches
        .and_then(|p| p.checked_mul(md.embed_dim))
        .is_some_and(|floats| floats <= MAX_LOCAL_FEATURES);
    let Some(patches) = patches.filter(|_| fits) else {
        return Err(bad(format!(
            "model.grid² × model.embed_dim ({}² × {}) is over the limit of {MAX_LOCAL_FEATURES} floats per feature map",
            md.grid, md.embed_dim
        )));
    };
    if md.feature_layers.is_empty() {
        return Err(bad(
            "model.feature_layers must name at least one block".into()
        ));
    }
    if let Some(l) = md
        .feature_layers
        .iter()
        .find(|l| **l == 0 || **l > md.layers)
    {
        return Err(bad(format!(
            "model.feature_layers: block {l} outside 1..={}",
            md.layers
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(l) = md.feature_layers.iter().find(|l| !seen.insert(**l)) {
        return Err(bad(format!("model.feature_layers: block {l} listed twice")));
    }
    if let Some(l) = md
        .few_shot_layers
        .iter()
        .find(|l| **l == 0 || **l > md.layers)
    {
        return Err(bad(format!(
            "model.few_shot_layers: block {l} outside 1..={}",
            md.layers
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(l) = md.few_shot_layers.iter().find(|l| !seen.insert(**l)) {
        return Err(bad(format!(
            "model.few_shot_layers: block {l} listed twice"
        )));
    }
    if m.text.shape != [2, md.embed_dim] {
        return Err(bad(format!(
            "text.shape must be [2, {}] (model.embed_dim), found {:?}",
            md.embed_dim, m.text.shape
        )));
    }
    if let Some(name) = m.files.keys().find(|f| !is_plain_relative(f)) {
        return Err(bad(format!(
            "files: {name:?} is not a plain relative path inside the package (no \"..\", no \".\", no absolute path, no empty name)"
        )));
    }
    if !m.files.contains_key("model.onnx") {
        return Err(bad("files: missing entry for \"model.onnx\"".into()));
    }
    if !m.files.contains_key(&m.text.file) {
        return Err(bad(format!("files: missing entry for {:?}", m.text.file)));
    }
    precisions_of(m).map_err(bad)?;
    let batch = Dim::Symbolic("batch".into());
    let expect = |name: &str, shape: Vec<Dim>| -> Result<(), PackageError> {
        let out = m
            .outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| bad(format!("outputs: no output named {name:?}")))?;
        if out.shape != shape {
            return Err(bad(format!(
                "outputs.{name}.shape: expected {}, found {}",
                shape_str(&shape),
                shape_str(&out.shape)
            )));
        }
        Ok(())
    };
    expect("global", vec![batch.clone(), Dim::Fixed(md.embed_dim)])?;
    for l in md.feature_layers.iter().chain(&md.few_shot_layers) {
        expect(
            &format!("local_{l}"),
            vec![batch.clone(), Dim::Fixed(patches), Dim::Fixed(md.embed_dim)],
        )?;
    }
    Ok(())
}

/// The precisions `m` has (see [`ModelPackage::precisions`]), or why its `precisions` list is
/// wrong: an unknown name, a duplicate, no fp32, or a precision whose model file `[files]` lacks.
fn precisions_of(m: &Manifest) -> Result<Vec<Precision>, String> {
    let Some(listed) = &m.precisions else {
        return Ok(Precision::ALL
            .into_iter()
            .filter(|p| m.files.contains_key(p.model_file()))
            .collect());
    };
    let mut out = Vec::with_capacity(listed.len());
    for name in listed {
        let p = Precision::parse(name).ok_or_else(|| {
            format!(
                "precisions: unknown precision {name:?} (this build knows {})",
                Precision::ALL.map(Precision::as_str).join(", ")
            )
        })?;
        if out.contains(&p) {
            return Err(format!("precisions: {name:?} listed twice"));
        }
        if !m.files.contains_key(p.model_file()) {
            return Err(format!(
                "precisions lists {name:?} but [files] has no entry for {:?}",
                p.model_file()
            ));
        }
        out.push(p);
    }
    if !out.contains(&Precision::Fp32) {
        return Err("precisions: \"fp32\" missing (every package has model.onnx)".into());
    }
    Ok(out)
}

/// A `[files]` name: relative, made of plain names only (`model.onnx`, `data/weights.bin`).
fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\0')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        // `a/./b` parses as plain names; refuse it all the same, and `a//b`, to keep one spelling.
        && name.split('/').all(|part| !part.is_empty() && part != ".")
}

/// `path` (= package dir + `name`) must resolve, symlinks followed, to a file inside the
/// package directory `canon_dir` (already canonical).
fn inside_package(
    canon_dir: &Path,
    name: &str,
    path: &Path,
    manifest_path: &Path,
) -> Result<(), PackageError> {
    let resolved = path.canonicalize().map_err(|source| PackageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if resolved.starts_with(canon_dir) && resolved != canon_dir {
        Ok(())
    } else {
        Err(PackageError::Invalid {
            path: manifest_path.to_path_buf(),
            message: format!(
                "files: {name:?} resolves to {}, outside the package directory {} (a symlink out of the package is not allowed)",
                resolved.display(),
                canon_dir.display()
            ),
        })
    }
}

/// The first non-finite float anywhere in `v`, with its dotted key (`input.mean[1]`).
fn non_finite(v: &toml::Value, key: String) -> Option<(String, f64)> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some((key, *f)),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| {
            let key = if key.is_empty() {
                k.clone()
            } else {
                format!("{key}.{k}")
            };
            non_finite(v, key)
        }),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| non_finite(v, format!("{key}[{i}]"))),
        _ => None,
    }
}

/// SHA-256 of a file as lowercase hex (regular files only, up to [`fsio::MAX_PACKAGE_FILE`]).
pub fn sha256_file(path: &Path) -> Result<String, PackageError> {
    let (f, _) = fsio::open_regular(path, fsio::MAX_PACKAGE_FILE, "package file")?;
    sha256_reader(f, path)
}

/// SHA-256 of everything `f` yields, as lowercase hex; `path` names it in errors.
fn sha256_reader(mut f: std::fs::File, path: &Path) -> Result<String, PackageError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| PackageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_names_must_be_plain_relative_paths() {
        for ok in ["model.onnx", "text.f32", "data/weights.bin", "a.b/c"] {
            assert!(is_plain_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../x",
            "a/../b",
            "/etc/passwd",
            "./x",
            "a/./b",
            "a//b",
            "a/",
            "x\0y",
        ] {
            assert!(!is_plain_relative(bad), "{bad:?}");
        }
    }

    #[test]
    fn non_finite_numbers_are_found_with_their_key() {
        let t: toml::Table =
            toml::from_str("a = 1.0\n[b]\nc = [1.0, 2.0, nan]\n[d]\ne = { f = -inf }\n").unwrap();
        let (key, v) = non_finite(&toml::Value::Table(t), String::new()).unwrap();
        assert_eq!(key, "b.c[2]");
        assert!(v.is_nan());
        let t: toml::Table = toml::from_str("[d]\ne = { f = -inf }\n").unwrap();
        let (key, v) = non_finite(&toml::Value::Table(t), String::new()).unwrap();
        assert_eq!((key.as_str(), v), ("d.e.f", f64::NEG_INFINITY));
        let t: toml::Table = toml::from_str("a = 1e300\nb = \"nan\"\n").unwrap();
        assert!(non_finite(&toml::Value::Table(t), String::new()).is_none());
    }

    #[test]
    fn attention_is_plain_when_absent_fused_when_said_and_anything_else_is_refused() {
        let raw = include_str!("../tests/fixtures/tiny/manifest.toml");
        let m: Manifest = toml::from_str(raw).unwrap();
        assert_eq!(m.model.attention, Attention::Plain);
        let fused = raw.replace("[model]\n", "[model]\nattention = \"fused\"\n");
        assert_ne!(fused, raw);
        let m: Manifest = toml::from_str(&fused).unwrap();
        assert_eq!(m.model.attention, Attention::Fused);
        let bad = raw.replace("[model]\n", "[model]\nattention = \"flash\"\n");
        let e = toml::from_str::<Manifest>(&bad).unwrap_err().to_string();
        assert!(e.contains("flash") && e.contains("fused"), "{e}");
    }

    /// The committed tiny manifest with `precisions` and `[files]` replaced.
    fn manifest_with(precisions: Option<&str>, files: &[&str]) -> Manifest {
        let raw = include_str!("../tests/fixtures/tiny/manifest.toml");
        let mut t: toml::Table = toml::from_str(raw).unwrap();
        match precisions {
            Some(list) => {
                let v: toml::Table = toml::from_str(&format!("p = {list}")).unwrap();
                t.insert("precisions".into(), v["p"].clone());
            }
            None => {
                t.remove("precisions");
            }
        }
        let mut f = toml::Table::new();
        for name in files {
            f.insert((*name).into(), toml::Value::String("00".into()));
        }
        t.insert("files".into(), toml::Value::Table(f));
        toml::from_str(&toml::to_string(&t).unwrap()).unwrap()
    }

    #[test]
    fn a_listed_precision_needs_its_model_file_and_fp32_is_required() {
        let all = [
            "model.onnx",
            "text.f32",
            "model.fp16.onnx",
            "model.int8.onnx",
        ];
        let m = manifest_with(Some(r#"["fp32", "int8"]"#), &all);
        assert_eq!(
            precisions_of(&m).unwrap(),
            vec![Precision::Fp32, Precision::Int8]
        );
        let m = manifest_with(Some(r#"["fp32", "int8"]"#), &["model.onnx", "text.f32"]);
        let e = precisions_of(&m).unwrap_err();
        assert!(
            e.contains("\"int8\"") && e.contains("model.int8.onnx"),
            "{e}"
        );
        let m = manifest_with(Some(r#"["int8"]"#), &all);
        assert!(precisions_of(&m).unwrap_err().contains("fp32"));
        let m = manifest_with(Some(r#"["fp32", "int4"]"#), &all);
        let e = precisions_of(&m).unwrap_err();
        assert!(e.contains("unknown precision \"int4\""), "{e}");
        let m = manifest_with(Some(r#"["fp32", "fp32"]"#), &all);
        assert!(precisions_of(&m).unwrap_err().contains("twice"));
    }

    #[test]
    fn a_package_without_a_precision_list_has_what_its_files_hold() {
        let m = manifest_with(None, &["model.onnx", "text.f32", "model.fp16.onnx"]);
        assert_eq!(
            precisions_of(&m).unwrap(),
            vec![Precision::Fp32, Precision::Fp16]
        );
    }

    #[test]
    fn asking_for_a_precision_the_package_lacks_names_the_package_and_what_it_has() {
        let pkg = ModelPackage {
            dir: PathBuf::from("/models/p"),
            manifest: manifest_with(
                Some(r#"["fp32", "fp16"]"#),
                &["model.onnx", "text.f32", "model.fp16.onnx"],
            ),
            text: vec![],
        };
        assert_eq!(
            pkg.model_path(Precision::Fp16).unwrap(),
            Path::new("/models/p/model.fp16.onnx")
        );
        let e = pkg.model_path(Precision::Int8).unwrap_err().to_string();
        assert_eq!(
            e,
            "/models/p: this model package has no int8 model (it has fp32, fp16); choose one of those, or re-export the package with engines/export.py --int8"
        );
    }
}
