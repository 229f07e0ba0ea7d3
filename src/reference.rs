//! Few-shot references: a memory bank of the patch features of K good images, and the
//! few-shot anomaly map and score it adds to the zero-shot head's output (training-free).
//!
//! The computation follows APRIL-GAN's few-shot mode (repository ByChelsea/VAND-APRIL-GAN,
//! commit f13b8a6): `few_shot.py` lines 15–26 keep, per feature layer, the patch tokens of the
//! K normal images concatenated into one `[K·N, D]` bank; `test.py` lines 187–201 compute, per
//! layer, the cosine similarity of every patch of the frame to every bank row, take
//! `1 − max` over the bank per patch, upsample each layer's `grid × grid` map bilinearly to the
//! input size, sum the layers and add the sum to the zero-shot map.
//!
//! Input: the package's local features (`[N, D]` per layer of `feature_layers`, the head's
//! input) of the K reference images ([`Bank::build`]), then per frame the same features and the
//! head's final map and score ([`Reference::apply`]). Output: the map plus the few-shot map, and
//! the combined image score (below). The bank is stored as a file ([`Bank::to_bytes`],
//! [`Bank::load`]) with a [`Fingerprint`] of what it was built for.
//!
//! Departures from APRIL-GAN, each a choice made for a live, per-frame system:
//! - The bank holds the package's own local features (those the head scores), not raw CLIP
//!   tokens; which layers is the package's `few_shot_layers` (exporter option
//!   `--few-shot-layers 6,12,18,24` for APRIL-GAN's four), else its `feature_layers`.
//! - Upsampling is the head's own (`align_corners=False`, [`crate::head::Bilinear`]) so that
//!   both maps are on the same pixel grid; APRIL-GAN uses `align_corners=True` (test.py 197–198).
//!   Layers are summed on the patch grid before the (linear) upsampling: exact in real arithmetic.
//! - The few-shot map is added to the head's final (smoothed) map; it is not smoothed itself.
//! - Image score: APRIL-GAN (test.py 239, 246–249) averages the zero-shot score with the
//!   maximum of the combined map min-max normalised over the whole test set of a class, which a
//!   live system cannot know. Here the combined score is `0.5 · (s + clamp(m / L, 0, 1))` with
//!   `s` the zero-shot score, `m` the maximum of the (upsampled) few-shot map and `L` the number
//!   of layers: the same equal-weight average, with the few-shot term normalised by its natural
//!   scale (`1 − cos ∈ [0, 1]` per layer for features with non-negative similarity) instead of
//!   by the test set. It stays in [0, 1].
//! - Cosine similarity follows scikit-learn's `cosine_similarity` (what APRIL-GAN calls): rows
//!   are L2-normalised and an all-zero row stays zero (similarity 0).
//!
//! Matching is one GEMM per layer, block of 128 frame patches and chunk of 1024 bank rows
//! (`matrixmultiply::sgemm`), the patch blocks in parallel on rayon's pool, then a running
//! maximum per patch; memory beyond the bank is `N × 1024` floats. The cost is
//! `2 · N · D · K · N` flops per layer (11.5 GFLOP at 518 px, D = 768, K = 4).
//!
//! Failure modes ([`ReferenceError`]): features of the wrong length or holding NaN/infinity, no
//! images, a bank file that is truncated, corrupt (CRC), over the size bound, of another format,
//! or built for another model, text constant, layer set, input size or region — each refused
//! with one line naming the file and what differs. Nothing here panics on bad input.

use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fsio;
use crate::head::Bilinear;
use crate::package::ModelPackage;

/// First bytes of a bank file.
pub const MAGIC: &[u8; 8] = b"ACEBANK1";

/// Default bound on a bank file (`max_bank_mb`).
pub const DEFAULT_MAX_BANK_MB: u64 = 256;

/// Bank rows matched per GEMM (bounds the similarity scratch to `N × CHUNK` floats).
const CHUNK: usize = 1024;

/// Frame patches per parallel task (each task multiplies its rows by the whole bank).
const ROWS: usize = 128;

/// Region key of the implicit whole-frame region.
pub const WHOLE_FRAME: &str = "frame";

/// The region key of a named region: `<name>:<first 16 hex digits of SHA-256(geometry)>`, where
/// `geometry` is the caller's canonical text of the region's rectangle and ignore polygons (e.g.
/// `format!("{rect:?}|{ignore:?}")` of the resolved pixel values): a bank built for a region is
/// refused once its crop or mask changes.
pub fn region_key(name: &str, geometry: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(geometry.as_bytes()));
    format!("{name}:{}", &digest[..16])
}

/// Why a bank could not be built, read or used.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// Input features or images are unusable.
    #[error("{0}")]
    Input(String),
    /// The bank file could not be read.
    #[error("reference bank: {0}")]
    Read(#[from] fsio::FsioError),
    /// The bank file is not a valid bank.
    #[error("reference bank {path}: {message}")]
    Corrupt { path: String, message: String },
    /// The bank was built for something else.
    #[error(
        "reference bank {path} was built for {field} {found}, this camera/model has {expected}"
    )]
    Mismatch {
        path: String,
        field: &'static str,
        found: String,
        expected: String,
    },
    /// The bank exceeds the configured size bound.
    #[error("reference bank of {bytes} bytes exceeds max_bank_mb = {max_mb}")]
    TooLarge { bytes: u64, max_mb: u64 },
}

/// What a bank was built for. Two banks are interchangeable only if every field agrees.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// SHA-256 of the package's `model.onnx` (from its manifest).
    pub model_sha256: String,
    /// SHA-256 of the package's text constant.
    pub text_sha256: String,
    /// Layers of the bank (the package's `few_shot_layers`, else its `feature_layers`), in order.
    pub layers: Vec<usize>,
    /// Model input edge in pixels.
    pub input_size: usize,
    /// Patches per side.
    pub grid: usize,
    /// Feature dimension.
    pub dim: usize,
    /// Region key: [`WHOLE_FRAME`], or a hash of the region's rectangle and ignore polygons
    /// chosen by the caller (the crop the features came from).
    pub region: String,
    /// Number of reference images.
    pub k: usize,
    /// Storage precision of the features (`"f32"`).
    pub precision: String,
}

impl Fingerprint {
    /// The fingerprint a bank for `pkg` and `region` with `k` images must have.
    pub fn for_package(pkg: &ModelPackage, region: &str, k: usize) -> Fingerprint {
        let m = &pkg.manifest;
        let file = |name: &str| m.files.get(name).cloned().unwrap_or_default();
        Fingerprint {
            model_sha256: file("model.onnx"),
            text_sha256: file(&m.text.file),
            layers: pkg.bank_layers().to_vec(),
            input_size: m.input.size,
            grid: m.model.grid,
            dim: m.model.embed_dim,
            region: region.to_string(),
            k,
            precision: "f32".into(),
        }
    }

    fn tokens(&self) -> Option<usize> {
        self.grid.checked_mul(self.grid)
    }

    /// Floats the bank holds: `layers × k × grid² × dim`, `None` on overflow.
    fn floats(&self) -> Option<usize> {
        self.layers
            .len()
            .checked_mul(self.k)?
            .checked_mul(self.tokens()?)?
            .checked_mul(self.dim)
    }
}

/// Bank size in bytes for `k` images: `layers × k × tokens × dim × 4` (f32), `None` on
/// overflow. At 518 px (1369 tokens, D = 768), K = 4 and one layer: 16 822 272 bytes.
pub fn bank_bytes(layers: usize, k: usize, tokens: usize, dim: usize) -> Option<u64> {
    (layers as u64)
        .checked_mul(k as u64)?
        .checked_mul(tokens as u64)?
        .checked_mul(dim as u64)?
        .checked_mul(4)
}

/// The memory bank: per layer, the L2-normalised patch features of K images, `[K·N, D]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Bank {
    fingerprint: Fingerprint,
    layers: Vec<Vec<f32>>,
}

/// Writes the L2-normalised rows of `src` (`rows × dim`) into `dst`; a zero row stays zero
/// (scikit-learn's `normalize`).
fn normalise_rows(src: &[f32], dim: usize, dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
        let n = s.iter().map(|v| v * v).sum::<f32>().sqrt();
        let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
        for (o, &v) in d.iter_mut().zip(s) {
            *o = v * inv;
        }
    }
}

impl Bank {
    /// Builds a bank from `images[i][l]`: the local features (`grid² × dim`) of reference image
    /// `i` for layer `l` (in `fingerprint.layers` order). `fingerprint.k` is set to the number of
    /// images. Refused: no images, a wrong layer count or length, NaN or infinity, a bank over
    /// `max_bytes`.
    pub fn build(
        mut fingerprint: Fingerprint,
        images: &[Vec<&[f32]>],
        max_bytes: u64,
    ) -> Result<Bank, ReferenceError> {
        if images.is_empty() {
            return Err(ReferenceError::Input(
                "no reference images: a bank needs at least one good image".into(),
            ));
        }
        fingerprint.k = images.len();
        let n = fingerprint
            .tokens()
            .and_then(|t| t.checked_mul(fingerprint.dim))
            .ok_or_else(|| ReferenceError::Input("feature shape overflows".into()))?;
        let total = fingerprint
            .floats()
            .and_then(|f| f.checked_mul(4))
            .ok_or_else(|| ReferenceError::Input("bank size overflows".into()))?
            as u64;
        if total > max_bytes {
            return Err(ReferenceError::TooLarge {
                bytes: total,
                max_mb: max_bytes >> 20,
            });
        }
        let nl = fingerprint.layers.len();
        let mut layers = vec![Vec::with_capacity(n * images.len()); nl];
        for (i, img) in images.iter().enumerate() {
            if img.len() != nl {
                return Err(ReferenceError::Input(format!(
                    "reference image {i}: {} feature layers, expected {nl}",
                    img.len()
                )));
            }
            for (l, feats) in img.iter().enumerate() {
                if feats.len() != n {
                    return Err(ReferenceError::Input(format!(
                        "reference image {i}, layer {}: {} floats, expected {n}",
                        fingerprint.layers[l],
                        feats.len()
                    )));
                }
                if feats.iter().any(|v| !v.is_finite()) {
                    return Err(ReferenceError::Input(format!(
                        "reference image {i}, layer {}: features hold NaN or infinity",
                        fingerprint.layers[l]
                    )));
                }
                let start = layers[l].len();
                layers[l].resize(start + n, 0.0);
                normalise_rows(feats, fingerprint.dim, &mut layers[l][start..]);
            }
        }
        Ok(Bank {
            fingerprint,
            layers,
        })
    }

    /// What the bank was built for.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Bytes of features held.
    pub fn feature_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.len() as u64 * 4).sum()
    }

    /// Refuses a bank built for another model, text constant, layer set, input size, grid,
    /// dimension or region than `expected` (`k` and `precision` are the bank's own). `path`
    /// names the bank in the message.
    pub fn check(&self, expected: &Fingerprint, path: &str) -> Result<(), ReferenceError> {
        let f = &self.fingerprint;
        let mismatch = |field: &'static str, found: String, expected: String| {
            Err(ReferenceError::Mismatch {
                path: path.to_string(),
                field,
                found,
                expected,
            })
        };
        if f.model_sha256 != expected.model_sha256 {
            return mismatch(
                "model (model.onnx sha256)",
                f.model_sha256.clone(),
                expected.model_sha256.clone(),
            );
        }
        if f.text_sha256 != expected.text_sha256 {
            return mismatch(
                "text constant (sha256)",
                f.text_sha256.clone(),
                expected.text_sha256.clone(),
            );
        }
        if f.layers != expected.layers {
            return mismatch(
                "feature layers",
                format!("{:?}", f.layers),
                format!("{:?}", expected.layers),
            );
        }
        for (field, a, b) in [
            ("input size", f.input_size, expected.input_size),
            ("grid", f.grid, expected.grid),
            ("feature dimension", f.dim, expected.dim),
        ] {
            if a != b {
                return mismatch(field, a.to_string(), b.to_string());
            }
        }
        if f.region != expected.region {
            return mismatch("region", f.region.clone(), expected.region.clone());
        }
        Ok(())
    }

    /// The bank file: `MAGIC`, the header length (u32 LE), the header (JSON [`Fingerprint`]),
    /// the features (f32 LE, layer after layer, each `[K·N, D]` row-major, L2-normalised), and
    /// a CRC-32 (u32 LE) of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.fingerprint).unwrap_or_default();
        let mut out = Vec::with_capacity(16 + header.len() + self.feature_bytes() as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for l in &self.layers {
            for v in l {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a bank file's bytes (`path` names it in errors).
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Bank, ReferenceError> {
        let corrupt = |message: String| ReferenceError::Corrupt {
            path: path.to_string(),
            message,
        };
        if bytes.len() < MAGIC.len() + 8 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt(format!(
                "not a reference bank (expected the magic bytes {:?} and at least 16 bytes)",
                std::str::from_utf8(MAGIC).unwrap_or_default()
            )));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let actual = crc32fast::hash(body);
        if stored != actual {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:08x}, computed {actual:08x}): truncated or corrupt, rebuild it"
            )));
        }
        let hl = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
        let header_end = 12usize
            .checked_add(hl)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| corrupt(format!("header length {hl} exceeds the file")))?;
        let fingerprint: Fingerprint = serde_json::from_slice(&body[12..header_end])
            .map_err(|e| corrupt(format!("header: {e}")))?;
        if fingerprint.precision != "f32" {
            return Err(corrupt(format!(
                "precision {:?}: expected \"f32\"",
                fingerprint.precision
            )));
        }
        if fingerprint.k == 0 || fingerprint.layers.is_empty() || fingerprint.dim == 0 {
            return Err(corrupt(
                "header: k, layers and dim must be non-zero".to_string(),
            ));
        }
        let floats = fingerprint
            .floats()
            .ok_or_else(|| corrupt("header: sizes overflow".into()))?;
        let data = &body[header_end..];
        if Some(data.len()) != floats.checked_mul(4) {
            return Err(corrupt(format!(
                "{} bytes of features, the header says {} layers x {} images x {} tokens x {} dims x 4",
                data.len(),
                fingerprint.layers.len(),
                fingerprint.k,
                fingerprint.grid * fingerprint.grid,
                fingerprint.dim
            )));
        }
        let per_layer = floats / fingerprint.layers.len();
        let mut layers = Vec::with_capacity(fingerprint.layers.len());
        for chunk in data.chunks_exact(per_layer * 4) {
            let l: Vec<f32> = chunk
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if l.iter().any(|v| !v.is_finite()) {
                return Err(corrupt("features hold NaN or infinity".into()));
            }
            layers.push(l);
        }
        Ok(Bank {
            fingerprint,
            layers,
        })
    }

    /// Reads a bank file of at most `max_bank_mb` MiB.
    pub fn load(path: &Path, max_bank_mb: u64) -> Result<Bank, ReferenceError> {
        let max = max_bank_mb.saturating_mul(1 << 20).saturating_add(64 << 10);
        let bytes = fsio::read_limited(path, max, "reference bank")?;
        Bank::from_bytes(&bytes, &path.display().to_string())
    }

    /// Reads a bank file and refuses it unless it was built for `expected` (see [`Bank::check`]).
    pub fn load_checked(
        path: &Path,
        max_bank_mb: u64,
        expected: &Fingerprint,
    ) -> Result<Bank, ReferenceError> {
        let bank = Bank::load(path, max_bank_mb)?;
        bank.check(expected, &path.display().to_string())?;
        Ok(bank)
    }

    /// [`Bank::load_checked`], also returning the bank's identity: `sha256:` and the first 16
    /// hex digits of the file's SHA-256 (what a calibration made with this bank records).
    pub fn load_identified(
        path: &Path,
        max_bank_mb: u64,
        expected: &Fingerprint,
    ) -> Result<(Bank, String), ReferenceError> {
        let max = max_bank_mb.saturating_mul(1 << 20).saturating_add(64 << 10);
        let bytes = fsio::read_limited(path, max, "reference bank")?;
        let name = path.display().to_string();
        let bank = Bank::from_bytes(&bytes, &name)?;
        bank.check(expected, &name)?;
        Ok((bank, identity(&bytes)))
    }

    /// Writes the bank file atomically (see [`crate::statedir::replace_file`]).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::statedir::replace_file(path, &self.to_bytes())
    }
}

/// The identity of a bank file's bytes: `sha256:<first 16 hex digits>`.
pub fn identity(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", &hex::encode(Sha256::digest(bytes))[..16])
}

/// What [`Reference::apply`] did to a frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FewShot {
    /// The head's (zero-shot) image score before combination.
    pub zero_shot_score: f32,
    /// Maximum of the upsampled few-shot map (sum over layers of `1 − max cos`).
    pub map_max: f32,
}

/// A bank ready to match frames: owns the scratch buffers, so a frame allocates nothing.
#[derive(Clone, Debug)]
pub struct Reference {
    bank: Bank,
    size: usize,
    upsample: Bilinear,
    frame: Vec<f32>,
    sims: Vec<f32>,
    best: Vec<f32>,
    patch: Vec<f32>,
    map: Vec<f32>,
}

impl Reference {
    /// Loads the bank at `path` for `pkg` and the region keyed `region` (refused, with the
    /// reason, when built for anything else, corrupt or over `max_bank_mb`) and prepares it.
    pub fn load(
        path: &Path,
        pkg: &ModelPackage,
        region: &str,
        max_bank_mb: u64,
    ) -> Result<Reference, ReferenceError> {
        let expected = Fingerprint::for_package(pkg, region, 0);
        Ok(Reference::new(Bank::load_checked(
            path,
            max_bank_mb,
            &expected,
        )?))
    }

    /// Prepares `bank` for maps of `size × size` (the model input edge).
    pub fn new(bank: Bank) -> Reference {
        let f = &bank.fingerprint;
        let (g, size, dim) = (f.grid, f.input_size, f.dim);
        let n = g * g;
        Reference {
            upsample: Bilinear::new(g, g, size, size),
            frame: vec![0.0; n * dim],
            sims: vec![0.0; n * CHUNK],
            best: vec![0.0; n],
            patch: vec![0.0; n],
            map: vec![0.0; size * size],
            size,
            bank,
        }
    }

    /// The bank.
    pub fn bank(&self) -> &Bank {
        &self.bank
    }

    /// The few-shot patch map of one frame: per patch, the sum over layers of
    /// `1 − max_b cos(f, b)` (`grid × grid`, row-major). `locals[l]` holds the frame's features
    /// of layer `l` (`grid² × dim`).
    pub fn patch_map(&mut self, locals: &[&[f32]]) -> Result<&[f32], ReferenceError> {
        let f = &self.bank.fingerprint;
        let (dim, n) = (f.dim, f.grid * f.grid);
        if locals.len() != self.bank.layers.len() {
            return Err(ReferenceError::Input(format!(
                "frame has {} feature layers, the bank {}",
                locals.len(),
                self.bank.layers.len()
            )));
        }
        self.patch.fill(0.0);
        for (l, (feats, bank)) in locals.iter().zip(&self.bank.layers).enumerate() {
            if feats.len() != n * dim {
                return Err(ReferenceError::Input(format!(
                    "frame layer {l}: {} floats, expected {}",
                    feats.len(),
                    n * dim
                )));
            }
            if feats.iter().any(|v| !v.is_finite()) {
                return Err(ReferenceError::Input(format!(
                    "frame layer {l}: features hold NaN or infinity"
                )));
            }
            normalise_rows(feats, dim, &mut self.frame);
            let frame = &self.frame;
            // Row blocks of the frame in parallel (rayon), each against the whole bank, one
            // GEMM per bank chunk; the blocks write disjoint parts of `best` and `sims`.
            self.best
                .par_chunks_mut(ROWS)
                .zip(self.sims.par_chunks_mut(ROWS * CHUNK))
                .enumerate()
                .for_each(|(i, (best, sims))| {
                    let rows = best.len();
                    let a = &frame[i * ROWS * dim..(i * ROWS + rows) * dim];
                    best.fill(f32::NEG_INFINITY);
                    for chunk in bank.chunks(CHUNK * dim) {
                        let c = chunk.len() / dim;
                        let sims = &mut sims[..rows * c];
                        // sims[rows × c] = a[rows × D] · chunkᵀ[D × c].
                        // SAFETY: the strides describe matrices inside the slices: `a` holds
                        // rows·dim floats (row stride dim), `chunk` c·dim (read transposed: row
                        // stride 1, column stride dim) and `sims` rows·c (row stride c; the
                        // block's slice holds rows·CHUNK ≥ rows·c); beta = 0 overwrites it.
                        unsafe {
                            matrixmultiply::sgemm(
                                rows,
                                dim,
                                c,
                                1.0,
                                a.as_ptr(),
                                dim as isize,
                                1,
                                chunk.as_ptr(),
                                1,
                                dim as isize,
                                0.0,
                                sims.as_mut_ptr(),
                                c as isize,
                                1,
                            );
                        }
                        for (b, row) in best.iter_mut().zip(sims.chunks_exact(c)) {
                            *b = row.iter().fold(*b, |m, &v| m.max(v));
                        }
                    }
                });
            for (p, &b) in self.patch.iter_mut().zip(&self.best) {
                *p += 1.0 - b;
            }
        }
        Ok(&self.patch)
    }

    /// Adds the few-shot map of the frame whose local features are `locals` to `map`
    /// (`size × size`, the head's final map) and replaces `score` (the head's image score) by
    /// the combined score `0.5 · (score + clamp(max(few-shot map) / L, 0, 1))` (see the module
    /// docs). This is the one call a scorer makes per frame when a region has a bank.
    pub fn apply(
        &mut self,
        locals: &[&[f32]],
        map: &mut [f32],
        score: &mut f32,
    ) -> Result<FewShot, ReferenceError> {
        if map.len() != self.size * self.size {
            return Err(ReferenceError::Input(format!(
                "map holds {} values, expected {}x{}",
                map.len(),
                self.size,
                self.size
            )));
        }
        self.patch_map(locals)?;
        self.upsample.run(&self.patch, &mut self.map);
        let mut max = f32::NEG_INFINITY;
        for (m, &v) in map.iter_mut().zip(&self.map) {
            *m += v;
            max = max.max(v);
        }
        let layers = self.bank.layers.len() as f32;
        let zero_shot_score = *score;
        *score = 0.5 * (zero_shot_score + (max / layers).clamp(0.0, 1.0));
        Ok(FewShot {
            zero_shot_score,
            map_max: max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(grid: usize, dim: usize, layers: usize, size: usize) -> Fingerprint {
        Fingerprint {
            model_sha256: "m".into(),
            text_sha256: "t".into(),
            layers: (1..=layers).collect(),
            input_size: size,
            grid,
            dim,
            region: WHOLE_FRAME.into(),
            k: 0,
            precision: "f32".into(),
        }
    }

    /// Deterministic pseudo-random features in [-1, 1).
    fn feats(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The definition, by nested loops in f64: sum over layers of 1 − max cosine.
    fn naive(bank: &[Vec<Vec<f32>>], frame: &[Vec<f32>], n: usize, dim: usize) -> Vec<f64> {
        let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let mut out = vec![0.0; n];
        for (l, f) in frame.iter().enumerate() {
            for (j, o) in out.iter_mut().enumerate() {
                let a = &f[j * dim..(j + 1) * dim];
                let mut best = f64::NEG_INFINITY;
                for img in bank {
                    for b in img[l].chunks_exact(dim) {
                        let dot: f64 = a
                            .iter()
                            .zip(b)
                            .map(|(&x, &y)| f64::from(x) * f64::from(y))
                            .sum();
                        best = best.max(dot / (norm(a) * norm(b)));
                    }
                }
                *o += 1.0 - best;
            }
        }
        out
    }

    #[test]
    fn the_patch_map_equals_one_minus_the_best_cosine_summed_over_layers() {
        // 3 images × 16 tokens × 2 layers; a bank larger than one chunk is covered below.
        let (grid, dim, nl) = (4, 24, 2);
        let n = grid * grid;
        let imgs: Vec<Vec<Vec<f32>>> = (0..3)
            .map(|i| (0..nl).map(|l| feats(i * 10 + l as u64, n * dim)).collect())
            .collect();
        let views: Vec<Vec<&[f32]>> = imgs
            .iter()
            .map(|i| i.iter().map(Vec::as_slice).collect())
            .collect();
        let bank = Bank::build(fp(grid, dim, nl, 8), &views, u64::MAX).unwrap();
        assert_eq!(bank.fingerprint().k, 3);
        let frame: Vec<Vec<f32>> = (0..nl).map(|l| feats(99 + l as u64, n * dim)).collect();
        let fv: Vec<&[f32]> = frame.iter().map(Vec::as_slice).collect();
        let mut r = Reference::new(bank);
        let got = r.patch_map(&fv).unwrap().to_vec();
        let want = naive(&imgs, &frame, n, dim);
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn a_bank_larger_than_one_gemm_chunk_keeps_the_maximum_over_all_chunks() {
        // 2 images × 1024 tokens = 2048 rows: two chunks; the frame equals image 1's last
        // patches, which sit in the second chunk, so their distance must be 0.
        let (grid, dim) = (32, 8);
        let n = grid * grid;
        let a = feats(1, n * dim);
        let b = feats(2, n * dim);
        let bank = Bank::build(fp(grid, dim, 1, 64), &[vec![&a], vec![&b]], u64::MAX).unwrap();
        let mut r = Reference::new(bank);
        let got = r.patch_map(&[&b]).unwrap();
        assert!(
            got.iter().all(|&d| d.abs() < 1e-5),
            "max {:?}",
            got.iter().cloned().fold(0.0f32, f32::max)
        );
        let want = naive(
            &[vec![a.clone()], vec![b.clone()]],
            &[feats(3, n * dim)],
            n,
            dim,
        );
        let got = r.patch_map(&[&feats(3, n * dim)]).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-5);
        }
    }

    #[test]
    fn apply_adds_the_upsampled_map_and_averages_the_scores() {
        let (grid, dim, size) = (2, 4, 4);
        let bank_f = [1.0, 0.0, 0.0, 0.0].repeat(4);
        let bank = Bank::build(fp(grid, dim, 1, size), &[vec![&bank_f]], u64::MAX).unwrap();
        let mut r = Reference::new(bank);
        // Patch 0 equals the bank (distance 0), patch 3 is orthogonal (distance 1).
        let mut frame = [1.0, 0.0, 0.0, 0.0].repeat(4);
        frame[12..16].copy_from_slice(&[0.0, 1.0, 0.0, 0.0]);
        let mut map = vec![0.25; 16];
        let mut score = 0.4;
        let fs = r.apply(&[&frame], &mut map, &mut score).unwrap();
        // align_corners=False, 2 → 4: the bottom-right pixel is the bottom-right patch.
        assert!((map[15] - 1.25).abs() < 1e-6 && (map[0] - 0.25).abs() < 1e-6);
        assert!((fs.map_max - 1.0).abs() < 1e-6);
        assert!((score - 0.5 * (0.4 + 1.0)).abs() < 1e-6);
        assert_eq!(fs.zero_shot_score, 0.4);
    }

    #[test]
    fn a_bank_file_round_trips_and_a_flipped_byte_is_refused() {
        let f = feats(5, 16 * 4);
        let bank = Bank::build(fp(4, 4, 1, 8), &[vec![&f]], u64::MAX).unwrap();
        let bytes = bank.to_bytes();
        assert_eq!(Bank::from_bytes(&bytes, "b").unwrap(), bank);
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        let e = Bank::from_bytes(&bad, "b").unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        let e = Bank::from_bytes(&bytes[..bytes.len() - 9], "b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum") || e.contains("bytes"), "{e}");
        let e = Bank::from_bytes(b"PNG garbage here", "b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a reference bank"), "{e}");
    }

    #[test]
    fn a_bank_for_another_model_or_region_is_refused_naming_the_field() {
        let f = feats(5, 16 * 4);
        let bank = Bank::build(fp(4, 4, 1, 8), &[vec![&f]], u64::MAX).unwrap();
        let mut other = fp(4, 4, 1, 8);
        assert!(bank.check(&other, "b").is_ok());
        other.model_sha256 = "x".into();
        let e = bank.check(&other, "b").unwrap_err().to_string();
        assert!(e.contains("model") && e.contains("x"), "{e}");
        let mut other = fp(4, 4, 1, 8);
        other.region = "left:abc".into();
        let e = bank.check(&other, "b").unwrap_err().to_string();
        assert!(e.contains("region") && e.contains("left:abc"), "{e}");
        let mut other = fp(4, 4, 1, 8);
        other.layers = vec![6, 12];
        assert!(
            bank.check(&other, "b")
                .unwrap_err()
                .to_string()
                .contains("layers")
        );
    }

    #[test]
    fn a_bank_over_the_size_bound_or_with_bad_features_is_refused() {
        let f = feats(5, 16 * 4);
        let e = Bank::build(fp(4, 4, 1, 8), &[vec![&f]], 100).unwrap_err();
        assert!(
            matches!(e, ReferenceError::TooLarge { bytes: 256, .. }),
            "{e}"
        );
        let mut nan = f.clone();
        nan[3] = f32::NAN;
        assert!(Bank::build(fp(4, 4, 1, 8), &[vec![&nan]], u64::MAX).is_err());
        assert!(Bank::build(fp(4, 4, 1, 8), &[vec![&f[..10]]], u64::MAX).is_err());
        assert!(Bank::build(fp(4, 4, 1, 8), &[], u64::MAX).is_err());
        let bank = Bank::build(fp(4, 4, 1, 8), &[vec![&f]], u64::MAX).unwrap();
        let mut r = Reference::new(bank);
        assert!(r.patch_map(&[&nan]).is_err());
        assert!(r.patch_map(&[&f, &f]).is_err());
    }

    #[test]
    fn region_keys_change_with_the_geometry_and_keep_the_name() {
        let a = region_key("left", "[0, 0, 960, 1080]|[]");
        assert!(
            a.starts_with("left:") && a.len() == "left:".len() + 16,
            "{a}"
        );
        assert_eq!(a, region_key("left", "[0, 0, 960, 1080]|[]"));
        assert_ne!(a, region_key("left", "[0, 0, 961, 1080]|[]"));
    }

    #[test]
    fn the_stated_bank_size_matches_the_formula() {
        assert_eq!(bank_bytes(1, 4, 1369, 768), Some(16_822_272));
        assert_eq!(bank_bytes(1, usize::MAX, usize::MAX, 2), None);
    }
}
