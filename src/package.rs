//! Model package loader: the directory `engines/export.py` writes (see `engines/PACKAGE.md`).
//!
//! Input: a package directory. Output: a validated [`ModelPackage`] holding the parsed manifest,
//! the text constant `T = [t_n; t_a]` and the path of the ONNX file to load.
//! Failure modes: a missing directory or file, a manifest that does not parse, a format version
//! this build does not read, shapes that contradict each other, a file whose SHA-256 differs from
//! the manifest. Every error names the file and what was expected.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The only manifest format version this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// Errors while loading a model package.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("model package {0}: no such directory (export one with engines/export.py)")]
    MissingDir(PathBuf),
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
    Version { path: PathBuf, found: u32 },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
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
}

/// `[text]` of the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    pub file: String,
    pub shape: [usize; 2],
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
        let raw = std::fs::read_to_string(&manifest_path).map_err(|source| PackageError::Read {
            path: manifest_path.clone(),
            source,
        })?;
        // Read the version first so that a future format gets the version message, not a
        // list of unknown fields.
        let version = toml::from_str::<toml::Table>(&raw)
            .map_err(|e| PackageError::Manifest {
                path: manifest_path.clone(),
                message: one_line(&e.to_string()),
            })?
            .get("format_version")
            .and_then(|v| v.as_integer());
        match version {
            Some(v) if v == i64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(PackageError::Version {
                    path: manifest_path,
                    found: u32::try_from(v).unwrap_or(u32::MAX),
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
        validate(&manifest, &manifest_path)?;

        for (file, expected) in &manifest.files {
            let path = dir.join(file);
            let meta = std::fs::metadata(&path).map_err(|source| PackageError::Read {
                path: path.clone(),
                source,
            })?;
            let hash = match hashes {
                HashCheck::All => true,
                HashCheck::UpTo(limit) => meta.len() <= limit,
                HashCheck::None => false,
            };
            if hash {
                let actual = sha256_file(&path)?;
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
        let bytes = std::fs::read(&text_path).map_err(|source| PackageError::Read {
            path: text_path.clone(),
            source,
        })?;
        let [rows, dim] = manifest.text.shape;
        if bytes.len() != rows * dim * 4 {
            return Err(PackageError::Invalid {
                path: text_path,
                message: format!(
                    "expected {} bytes (float32 [{rows}, {dim}]), found {}",
                    rows * dim * 4,
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

    /// ONNX output names of the local features, in `feature_layers` order.
    pub fn local_output_names(&self) -> Vec<String> {
        self.manifest
            .model
            .feature_layers
            .iter()
            .map(|l| format!("local_{l}"))
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
    if md.patch == 0 || md.grid == 0 || md.embed_dim == 0 {
        return Err(bad(
            "model.patch, model.grid and model.embed_dim must be > 0".into(),
        ));
    }
    if md.grid * md.patch != m.input.size {
        return Err(bad(format!(
            "model.grid ({}) × model.patch ({}) must equal input.size ({})",
            md.grid, md.patch, m.input.size
        )));
    }
    if !(md.tau.is_finite() && md.tau > 0.0) {
        return Err(bad(format!("model.tau must be > 0, found {}", md.tau)));
    }
    if m.input.std.iter().any(|s| *s <= 0.0) {
        return Err(bad("input.std values must be > 0".into()));
    }
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
    if m.text.shape != [2, md.embed_dim] {
        return Err(bad(format!(
            "text.shape must be [2, {}] (model.embed_dim), found {:?}",
            md.embed_dim, m.text.shape
        )));
    }
    if !m.files.contains_key("model.onnx") {
        return Err(bad("files: missing entry for \"model.onnx\"".into()));
    }
    if !m.files.contains_key(&m.text.file) {
        return Err(bad(format!("files: missing entry for {:?}", m.text.file)));
    }
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
    for l in &md.feature_layers {
        expect(
            &format!("local_{l}"),
            vec![
                batch.clone(),
                Dim::Fixed(md.grid * md.grid),
                Dim::Fixed(md.embed_dim),
            ],
        )?;
    }
    Ok(())
}

/// SHA-256 of a file as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, PackageError> {
    let mut f = std::fs::File::open(path).map_err(|source| PackageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
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
