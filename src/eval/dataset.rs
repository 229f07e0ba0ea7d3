//! Evaluation datasets: folder discovery (the 17 official AnomalyCLIP layouts; MVTec-style ones
//! here, the others in [`super::layouts`]), `meta.json` in the official AnomalyCLIP format, and
//! validation with per-item issues.
//!
//! Input: a dataset ROOT and either a `meta.json` or a folder layout. Output: [`Validated`], the
//! test items per class (image path, optional mask path, label) plus every [`Issue`] found, with
//! counts. Failure modes: [`DatasetError`] for problems that stop everything (ROOT unreadable, no
//! layout recognised, malformed `meta.json`, unknown `--classes`); everything item-level is an
//! [`Issue`]:
//! - [`Severity::Error`]: the item cannot be evaluated and is **skipped** (image missing or
//!   unreadable, bad label);
//! - [`Severity::Warning`]: the item or class is used with reduced scope (anomalous image without
//!   a usable mask → image metrics only; mask of another size than its image → used, resized like
//!   the reference; empty class → no metrics; mask files without an image).
//!
//! `--strict` ([`Validated::check`] with `strict = true`) turns any issue into a failure.
//!
//! Layouts (`good` — or `ok`, as in BTAD — is the normal species; others are defect types):
//! - `mvtec` (also `mpdd`, `btad`, `dtd`, `head_ct`): `ROOT/<class>/{train,test}/<species>/<image>`,
//!   masks in `ROOT/<class>/ground_truth/<species>/<stem>_mask.<ext>` (also `<stem>.<ext>`,
//!   `<stem>_label.<ext>`), or beside the image as `<stem>_mask.<ext>` / `<stem>_label.<ext>`;
//! - `sdd`: one category at ROOT: `ROOT/{train,test}/<species>/…`, masks as above under
//!   `ROOT/ground_truth/…` or beside the images; the class is named after ROOT's folder; without
//!   `ROOT/test/`, the official SDD tree (`ROOT/electrical commutators/…`, MVTec-style);
//! - the other official layouts (`visa`, `dagm`, `isbi`, `br35`, `brainmri`, `covid`,
//!   `endotect`, `clinicdb`, `colondb`, `kvasir`, `tn3k`): [`super::layouts`];
//! - `auto`: `ROOT/meta.json` if present, else `visa` when `ROOT/split_csv/1cls.csv` exists, else
//!   `sdd` when `ROOT/test` exists, else `mvtec`.
//!
//! Every tree is described in `docs/datasets.md`.
//!
//! A class without any mask is *image-only* (image metrics, no pixel metrics, no warning); a class
//! with masks for some anomalous images but not others warns for each missing one. Masks are
//! paired with images by name (the official scripts pair sorted lists by index, which silently
//! mispairs when a file is missing). Validation reads image headers only; decoding failures that
//! only show at evaluation time are reported by the driver as issues of the same kinds.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The official file name of the dataset description.
pub const META_FILE: &str = "meta.json";

/// The class folder of the official SDD tree (`ROOT/electrical commutators/{train,test,…}`).
pub const SDD_OFFICIAL_CLASS: &str = "electrical commutators";

/// Species (sub-folder) names of normal images: `good` (MVTec AD, VisA, MPDD, SDD) and `ok`
/// (BTAD). Every other species is a defect type.
pub const NORMAL_SPECIES: &[&str] = &["good", "ok"];

/// File extensions considered images (others, e.g. `.txt`, are ignored). `tif`/`webp` are listed
/// so that they are reported as unreadable rather than silently skipped.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];

/// Stem suffixes that mark a mask file stored beside its image.
const MASK_SUFFIXES: &[&str] = &["_mask", "_label"];

/// Dataset-level failures (item-level problems are [`Issue`]s).
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `meta.json` is not a regular file, too large or unreadable.
    #[error(transparent)]
    File(#[from] crate::fsio::FsioError),
    /// The layout was found but holds no test image (`dataset-meta` writes nothing).
    #[error(
        "no test images under {root} (layout {layout}): expected image files ({}) in {expected}; nothing written",
        IMAGE_EXTENSIONS.join(", ")
    )]
    NoImages {
        /// The ROOT.
        root: PathBuf,
        /// The layout searched.
        layout: Layout,
        /// Where images were looked for.
        expected: &'static str,
    },
    /// No supported layout found under ROOT.
    #[error(
        "no dataset found under {root}: expected {expected} (or a meta.json; see `dataset-meta --layout`)"
    )]
    NoLayout {
        /// The ROOT.
        root: PathBuf,
        /// What the layout needs.
        expected: String,
    },
    /// `meta.json` is not valid JSON in the official format.
    #[error("{path} is not a valid meta.json: {message}")]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// The parse error.
        message: String,
    },
    /// The VisA split CSV is malformed.
    #[error("{path}: {message}")]
    BadCsv {
        /// The CSV file.
        path: PathBuf,
        /// What is wrong and what was expected.
        message: String,
    },
    /// Writing `meta.json` failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Classes asked for with `--classes` that the dataset does not have.
    #[error("unknown classes {unknown:?}; the dataset has {available:?}")]
    UnknownClasses {
        /// Asked for, not found.
        unknown: Vec<String>,
        /// What exists.
        available: Vec<String>,
    },
    /// Nothing left to evaluate after validation.
    #[error("nothing to evaluate: no readable test images ({errors} errors, {warnings} warnings)")]
    NothingToEvaluate {
        /// Error count.
        errors: usize,
        /// Warning count.
        warnings: usize,
    },
    /// `--strict` and at least one issue.
    #[error(
        "--strict: {errors} errors and {warnings} warnings in the dataset (first: {first}); fix them or drop --strict"
    )]
    Strict {
        /// Error count.
        errors: usize,
        /// Warning count.
        warnings: usize,
        /// The first issue, formatted.
        first: String,
    },
}

/// A folder layout for discovery: `auto` plus the 17 official AnomalyCLIP generators
/// (`generate_dataset_json/*.py`); see `docs/datasets.md` for each tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Detect: `visa` when `ROOT/split_csv/1cls.csv` exists, `sdd` when `ROOT/test` exists, else
    /// `mvtec`.
    Auto,
    /// `ROOT/<class>/{train,test}/<species>/…` with `ROOT/<class>/ground_truth/<species>/…`.
    Mvtec,
    /// One category at ROOT (`ROOT/test/{good,<defect>…}`), or the official SDD tree
    /// (`ROOT/electrical commutators/{train,test,ground_truth}/…`, MVTec-style).
    Sdd,
    /// VisA: `ROOT/split_csv/1cls.csv` (object, split, label, image, mask).
    Visa,
    /// MPDD: MVTec-style.
    Mpdd,
    /// BTAD: MVTec-style with `ok` as the normal species.
    Btad,
    /// DAGM 2007: `ROOT/<ClassN>/{Train,Test}/*.PNG` with masks in `…/Label/<stem>_label.PNG`.
    Dagm,
    /// DTD-Synthetic: MVTec-style.
    Dtd,
    /// HeadCT: `ROOT/brain/test/{good,<defect>}/…`, image-level only.
    #[serde(rename = "head_ct")]
    HeadCt,
    /// Brain MRI: `ROOT/brain_tumor_dataset/{no,yes}/…`, image-level only.
    Brainmri,
    /// Br35H: `ROOT/{no,yes}/…`, image-level only.
    Br35,
    /// COVID-19 Radiography: `ROOT/{NORMAL,<finding>…}/…`, image-level only.
    Covid,
    /// ISIC 2016: `ROOT/skin/test/<species>/…`, masks in
    /// `ROOT/skin/ISBI2016_ISIC_Part1_Test_GroundTruth/`.
    Isbi,
    /// CVC-ClinicDB: `ROOT/images/`, `ROOT/masks/` (every image anomalous).
    Clinicdb,
    /// CVC-ColonDB: `ROOT/images/`, `ROOT/masks/` (every image anomalous).
    Colondb,
    /// Kvasir-SEG: `ROOT/images/`, `ROOT/masks/` (every image anomalous).
    Kvasir,
    /// EndoTect: `ROOT/<species>/…` (`good` normal), masks in `ROOT/masks/`.
    Endotect,
    /// TN3K: `ROOT/test-image/`, `ROOT/test-mask/` (every image anomalous).
    Tn3k,
}

impl Layout {
    /// The names accepted by [`FromStr`] (case-insensitive).
    pub const NAMES: &'static [&'static str] = &[
        "auto", "mvtec", "sdd", "visa", "mpdd", "btad", "dagm", "dtd", "head_ct", "brainmri",
        "br35", "covid", "isbi", "clinicdb", "colondb", "kvasir", "endotect", "tn3k",
    ];

    /// Every layout, in [`Layout::NAMES`] order.
    pub const ALL: &'static [Layout] = &[
        Layout::Auto,
        Layout::Mvtec,
        Layout::Sdd,
        Layout::Visa,
        Layout::Mpdd,
        Layout::Btad,
        Layout::Dagm,
        Layout::Dtd,
        Layout::HeadCt,
        Layout::Brainmri,
        Layout::Br35,
        Layout::Covid,
        Layout::Isbi,
        Layout::Clinicdb,
        Layout::Colondb,
        Layout::Kvasir,
        Layout::Endotect,
        Layout::Tn3k,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        Layout::ALL
            .iter()
            .position(|l| *l == self)
            .map_or("auto", |i| Layout::NAMES[i])
    }

    /// Whether the layout is an MVTec-style tree of classes (`<class>/test/<species>/…`).
    pub fn is_mvtec_style(self) -> bool {
        matches!(
            self,
            Layout::Mvtec | Layout::Mpdd | Layout::Btad | Layout::Dtd | Layout::HeadCt
        )
    }

    /// The folders the layout needs, for error messages.
    pub fn expected_tree(self) -> &'static str {
        match self {
            Layout::Auto => {
                "ROOT/<class>/test/<species>/… (mvtec), ROOT/test/<species>/… (sdd) or ROOT/split_csv/1cls.csv (visa)"
            }
            Layout::Mvtec | Layout::Mpdd | Layout::Dtd => {
                "ROOT/<class>/test/<species>/… (normal species `good`), masks in ROOT/<class>/ground_truth/<species>/"
            }
            Layout::Btad => {
                "ROOT/<class>/test/<species>/… (normal species `ok`), masks in ROOT/<class>/ground_truth/<species>/"
            }
            Layout::HeadCt => "ROOT/brain/test/{good,<defect>}/…",
            Layout::Sdd => {
                "ROOT/test/<species>/… (one category) or ROOT/electrical commutators/test/<species>/…"
            }
            Layout::Visa => {
                "ROOT/split_csv/1cls.csv with columns object,split,label,image,mask (paths relative to ROOT)"
            }
            Layout::Dagm => {
                "ROOT/<ClassN>/{Train,Test}/<image>.PNG, masks in ROOT/<ClassN>/{Train,Test}/Label/"
            }
            Layout::Brainmri => "ROOT/brain_tumor_dataset/{no,yes}/…",
            Layout::Br35 => "ROOT/{no,yes}/…",
            Layout::Covid => "ROOT/{NORMAL,<finding>…}/…",
            Layout::Isbi => {
                "ROOT/skin/test/<species>/…, masks in ROOT/skin/ISBI2016_ISIC_Part1_Test_GroundTruth/"
            }
            Layout::Clinicdb | Layout::Colondb | Layout::Kvasir => "ROOT/images/ and ROOT/masks/",
            Layout::Endotect => "ROOT/<species>/… (normal species `good`), masks in ROOT/masks/",
            Layout::Tn3k => "ROOT/test-image/ and ROOT/test-mask/",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase().replace('-', "_");
        let lower = match lower.as_str() {
            "single" => "sdd",
            "headct" => "head_ct",
            other => other,
        };
        Layout::NAMES
            .iter()
            .position(|n| *n == lower)
            .map(|i| Layout::ALL[i])
            .ok_or_else(|| {
                format!(
                    "unknown layout {s:?}; use one of {}",
                    Layout::NAMES.join(", ")
                )
            })
    }
}

/// One entry of `meta.json` (official field names and order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaItem {
    /// Image path relative to ROOT.
    pub img_path: String,
    /// Mask path relative to ROOT; empty for normal images and image-only datasets (`null` is
    /// read as empty).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub mask_path: String,
    /// Class (category) name.
    pub cls_name: String,
    /// Species: `good` or the defect type.
    #[serde(default)]
    pub specie_name: String,
    /// 0 = normal, 1 = anomalous.
    pub anomaly: u8,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// `meta.json`: split → class → items (paths relative to ROOT).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Training split (written for compatibility; not used by `eval`).
    #[serde(default)]
    pub train: BTreeMap<String, Vec<MetaItem>>,
    /// Test split.
    #[serde(default)]
    pub test: BTreeMap<String, Vec<MetaItem>>,
}

impl Meta {
    /// Serialises like the official scripts (`json.dumps(info, indent=4) + "\n"`).
    pub fn to_json(&self) -> String {
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        // Serialising plain strings and integers cannot fail.
        if self.serialize(&mut ser).is_err() {
            return String::new();
        }
        let mut s = String::from_utf8(buf).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses `meta.json` text.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, DatasetError> {
        serde_json::from_str(text).map_err(|e| DatasetError::BadMeta {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Reads a `meta.json` file.
pub fn read_meta(path: &Path) -> Result<Meta, DatasetError> {
    let text = crate::fsio::read_limited_string(path, crate::fsio::MAX_META_JSON, "meta.json")?;
    Meta::from_json(&text, path)
}

/// How bad an issue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Used with reduced scope.
    Warning,
    /// Skipped.
    Error,
}

/// What went wrong with an item or a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// An image path (from `meta.json`) that does not exist. Error: skipped.
    MissingImage,
    /// An image that cannot be decoded. Error: skipped.
    UnreadableImage,
    /// An image or mask path in `meta.json` that leaves ROOT (absolute, or with `..`). Error:
    /// skipped (the evaluation reads only files under the dataset root).
    OutsideRoot,
    /// `anomaly` not 0 or 1. Error: skipped.
    BadLabel,
    /// The scorer failed on the image. Error: skipped.
    ScoreFailed,
    /// An anomalous image without a mask in a class that has masks. Warning: image metrics only.
    MissingMask,
    /// A mask that cannot be decoded. Warning: image metrics only.
    UnreadableMask,
    /// A mask whose size differs from its image's. Warning: used (resized like the reference).
    MaskSizeMismatch,
    /// A class with no test image. Warning: no metrics for it.
    EmptyClass,
    /// A mask file that no image refers to. Warning.
    UnpairedMask,
}

impl IssueKind {
    /// Errors skip the item; warnings reduce what it is used for.
    pub fn severity(self) -> Severity {
        match self {
            IssueKind::MissingImage
            | IssueKind::UnreadableImage
            | IssueKind::OutsideRoot
            | IssueKind::BadLabel
            | IssueKind::ScoreFailed => Severity::Error,
            IssueKind::MissingMask
            | IssueKind::UnreadableMask
            | IssueKind::MaskSizeMismatch
            | IssueKind::EmptyClass
            | IssueKind::UnpairedMask => Severity::Warning,
        }
    }
}

/// One problem with a dataset item or class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// Error (skipped) or warning (reduced use).
    pub severity: Severity,
    /// What kind.
    pub kind: IssueKind,
    /// The class.
    pub class: String,
    /// The file concerned, relative to ROOT, if any.
    pub path: Option<String>,
    /// What happened and what it means for the evaluation.
    pub message: String,
}

impl Issue {
    /// A new issue; the severity follows from the kind.
    pub fn new(
        kind: IssueKind,
        class: &str,
        path: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: kind.severity(),
            kind,
            class: class.to_owned(),
            path: path.map(str::to_owned),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        match &self.path {
            Some(p) => write!(f, "{sev}: {}: {p}: {}", self.class, self.message),
            None => write!(f, "{sev}: {}: {}", self.class, self.message),
        }
    }
}

/// Issue counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueCounts {
    /// Issues of severity error.
    pub errors: usize,
    /// Issues of severity warning.
    pub warnings: usize,
    /// Per kind.
    pub by_kind: BTreeMap<IssueKind, usize>,
}

impl IssueCounts {
    /// Counts a list of issues.
    pub fn of(issues: &[Issue]) -> Self {
        let mut c = IssueCounts::default();
        for i in issues {
            match i.severity {
                Severity::Error => c.errors += 1,
                Severity::Warning => c.warnings += 1,
            }
            *c.by_kind.entry(i.kind).or_insert(0) += 1;
        }
        c
    }
}

/// Where a dataset description came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Read from this `meta.json`.
    MetaFile(PathBuf),
    /// Discovered from folders with this layout.
    Discovered(Layout),
}

/// A dataset description and the issues found while building it.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The description (paths relative to ROOT).
    pub meta: Meta,
    /// Where it came from.
    pub origin: Origin,
    /// Issues found during discovery (e.g. unpaired masks).
    pub issues: Vec<Issue>,
}

/// Opens a dataset: `meta` if given; else, for [`Layout::Auto`], `ROOT/meta.json` when it exists;
/// else folder discovery with `layout`.
pub fn open(root: &Path, meta: Option<&Path>, layout: Layout) -> Result<Opened, DatasetError> {
    if let Some(path) = meta {
        return Ok(Opened {
            meta: read_meta(path)?,
            origin: Origin::MetaFile(path.to_owned()),
            issues: Vec::new(),
        });
    }
    let default_meta = root.join(META_FILE);
    if layout == Layout::Auto && present(&default_meta) {
        return Ok(Opened {
            meta: read_meta(&default_meta)?,
            origin: Origin::MetaFile(default_meta),
            issues: Vec::new(),
        });
    }
    discover(root, layout)
}

/// Builds the description of a folder tree (never reads an existing `meta.json`).
pub fn discover(root: &Path, layout: Layout) -> Result<Opened, DatasetError> {
    let layout = match layout {
        Layout::Auto => detect_layout(root)?,
        l => l,
    };
    let mut meta = Meta::default();
    let mut issues = Vec::new();
    let no_layout = || DatasetError::NoLayout {
        root: root.to_owned(),
        expected: format!("{} for --layout {layout}", layout.expected_tree()),
    };
    match layout {
        Layout::Sdd if root.join("test").is_dir() => {
            let name = class_name_of_root(root);
            discover_class(root, "", &name, &mut meta, &mut issues)?;
        }
        Layout::Sdd => {
            // The official SDD tree: the one class of `SDD.py`, MVTec-style.
            let name = SDD_OFFICIAL_CLASS;
            let dir = root.join(name);
            if !dir.join("test").is_dir() {
                return Err(no_layout());
            }
            discover_class(&dir, name, name, &mut meta, &mut issues)?;
        }
        Layout::Auto => discover_classes(root, &mut meta, &mut issues, no_layout)?,
        l if l.is_mvtec_style() => discover_classes(root, &mut meta, &mut issues, no_layout)?,
        l => super::layouts::discover(root, l, &mut meta, &mut issues, no_layout)?,
    }
    Ok(Opened {
        meta,
        origin: Origin::Discovered(layout),
        issues,
    })
}

/// MVTec-style: every non-hidden sub-folder of ROOT with a `test/` folder is a class.
fn discover_classes(
    root: &Path,
    meta: &mut Meta,
    issues: &mut Vec<Issue>,
    no_layout: impl Fn() -> DatasetError,
) -> Result<(), DatasetError> {
    let mut found = false;
    for dir in sorted_entries(root)? {
        if dir.is_dir() && dir.join("test").is_dir() {
            let name = file_name(&dir);
            if name.starts_with('.') {
                continue;
            }
            found = true;
            discover_class(&dir, &name, &name, meta, issues)?;
        }
    }
    if found { Ok(()) } else { Err(no_layout()) }
}

fn detect_layout(root: &Path) -> Result<Layout, DatasetError> {
    if root.join(super::layouts::VISA_CSV).is_file() {
        return Ok(Layout::Visa);
    }
    if root.join("test").is_dir() {
        return Ok(Layout::Sdd);
    }
    let any_class = sorted_entries(root)?
        .iter()
        .any(|d| d.is_dir() && d.join("test").is_dir());
    if any_class {
        Ok(Layout::Mvtec)
    } else {
        Err(DatasetError::NoLayout {
            root: root.to_owned(),
            expected: Layout::Auto.expected_tree().into(),
        })
    }
}

fn class_name_of_root(root: &Path) -> String {
    let canon = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    canon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".to_owned())
}

pub(super) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(super) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DatasetError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|source| DatasetError::Io {
            path: dir.to_owned(),
            source,
        })?;
        out.push(e.path());
    }
    out.sort();
    Ok(out)
}

/// Whether `p` is listed as an image: an image extension, not hidden, not a directory. A FIFO,
/// a device or a dangling symlink with an image name is listed, so that reading it reports what
/// it is instead of the file silently missing from the evaluation.
pub(super) fn is_image_file(p: &Path) -> bool {
    if p.is_dir() || file_name(p).starts_with('.') || std::fs::symlink_metadata(p).is_err() {
        return false;
    }
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

pub(super) fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The image stem a beside-mask belongs to (`x_mask.png` → `x`).
fn mask_target(stem: &str) -> Option<&str> {
    MASK_SUFFIXES.iter().find_map(|s| stem.strip_suffix(s))
}

/// Joins a relative prefix and a name with `/` (meta paths use `/` on every platform).
pub(super) fn rel(prefix: &str, parts: &[&str]) -> String {
    let mut s = String::from(prefix);
    for p in parts {
        if !s.is_empty() {
            s.push('/');
        }
        s.push_str(p);
    }
    s
}

/// Discovers one class rooted at `dir` (`prefix` = its path relative to ROOT, "" for sdd).
fn discover_class(
    dir: &Path,
    prefix: &str,
    class: &str,
    meta: &mut Meta,
    issues: &mut Vec<Issue>,
) -> Result<(), DatasetError> {
    let gt_dir = dir.join("ground_truth");
    for split in ["train", "test"] {
        let split_dir = dir.join(split);
        if !split_dir.is_dir() {
            continue;
        }
        let mut items = Vec::new();
        for species_dir in sorted_entries(&split_dir)? {
            if !species_dir.is_dir() {
                continue;
            }
            let species = file_name(&species_dir);
            if species.starts_with('.') {
                continue;
            }
            let normal = NORMAL_SPECIES.contains(&species.as_str());
            let files: Vec<PathBuf> = sorted_entries(&species_dir)?
                .into_iter()
                .filter(|p| is_image_file(p))
                .collect();
            // Masks beside the images: `<stem>_mask.*` / `<stem>_label.*`.
            let mut beside: BTreeMap<String, String> = BTreeMap::new();
            let mut images = Vec::new();
            for f in &files {
                let s = stem(f);
                match mask_target(&s) {
                    Some(target) => {
                        beside.insert(target.to_owned(), file_name(f));
                    }
                    None => images.push(f.clone()),
                }
            }
            // Masks under ground_truth/<species>/.
            let gt_species = gt_dir.join(&species);
            let gt_files: Vec<PathBuf> = if !normal && gt_species.is_dir() {
                sorted_entries(&gt_species)?
                    .into_iter()
                    .filter(|p| is_image_file(p))
                    .collect()
            } else {
                Vec::new()
            };
            let mut gt_by_stem: BTreeMap<String, String> = BTreeMap::new();
            for g in &gt_files {
                let s = stem(g);
                let target = mask_target(&s).unwrap_or(&s).to_owned();
                gt_by_stem.entry(target).or_insert_with(|| file_name(g));
            }
            let mut used_gt: Vec<String> = Vec::new();
            for img in &images {
                let s = stem(img);
                let img_rel = rel(prefix, &[split, &species, &file_name(img)]);
                let mask_path = if normal {
                    String::new()
                } else if let Some(g) = gt_by_stem.get(&s) {
                    used_gt.push(g.clone());
                    rel(prefix, &["ground_truth", &species, g])
                } else if let Some(b) = beside.get(&s) {
                    rel(prefix, &[split, &species, b])
                } else {
                    String::new()
                };
                items.push(MetaItem {
                    img_path: img_rel,
                    mask_path,
                    cls_name: class.to_owned(),
                    specie_name: species.clone(),
                    anomaly: u8::from(!normal),
                });
            }
            if split == "test" {
                for g in &gt_files {
                    let name = file_name(g);
                    if !used_gt.contains(&name) {
                        let p = rel(prefix, &["ground_truth", &species, &name]);
                        issues.push(Issue::new(
                            IssueKind::UnpairedMask,
                            class,
                            Some(&p),
                            "mask without a test image of the same name: ignored",
                        ));
                    }
                }
                let image_stems: Vec<String> = images.iter().map(|i| stem(i)).collect();
                for (target, name) in &beside {
                    if !image_stems.contains(target) {
                        let p = rel(prefix, &[split, &species, name]);
                        issues.push(Issue::new(
                            IssueKind::UnpairedMask,
                            class,
                            Some(&p),
                            "mask without an image of the same name beside it: ignored",
                        ));
                    }
                }
            }
        }
        let map = if split == "train" {
            &mut meta.train
        } else {
            &mut meta.test
        };
        map.insert(class.to_owned(), items);
    }
    Ok(())
}

/// What [`write_meta`] did.
#[derive(Debug, Clone)]
pub struct WrittenMeta {
    /// The file written.
    pub path: PathBuf,
    /// The layout used (resolved from `auto`).
    pub layout: Layout,
    /// Test images per class.
    pub test_images: BTreeMap<String, usize>,
    /// Issues found during discovery.
    pub issues: Vec<Issue>,
}

/// `dataset-meta ROOT --layout …`: discovers the tree and writes `ROOT/meta.json`.
pub fn write_meta(root: &Path, layout: Layout) -> Result<WrittenMeta, DatasetError> {
    write_meta_to(root, layout, &root.join(META_FILE))
}

/// Like [`write_meta`], to another file.
pub fn write_meta_to(root: &Path, layout: Layout, out: &Path) -> Result<WrittenMeta, DatasetError> {
    let opened = discover(root, layout)?;
    let layout = match opened.origin {
        Origin::Discovered(l) => l,
        Origin::MetaFile(_) => layout,
    };
    // A meta.json without test images describes nothing to evaluate: refuse to write it.
    if opened.meta.test.values().all(Vec::is_empty) {
        return Err(DatasetError::NoImages {
            root: root.to_owned(),
            layout,
            expected: layout.expected_tree(),
        });
    }
    std::fs::write(out, opened.meta.to_json()).map_err(|source| DatasetError::Write {
        path: out.to_owned(),
        source,
    })?;
    Ok(WrittenMeta {
        path: out.to_owned(),
        layout,
        test_images: opened
            .meta
            .test
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect(),
        issues: opened.issues,
    })
}

/// A test item ready for evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalItem {
    /// Image path as in `meta.json` (relative to ROOT).
    pub img_path: String,
    /// Absolute (ROOT-joined) image path.
    pub image: PathBuf,
    /// Absolute mask path, when the item is anomalous and has a usable mask.
    pub mask: Option<PathBuf>,
    /// Mask path as in `meta.json`, when `mask` is set.
    pub mask_path: Option<String>,
    /// Anomalous (label 1).
    pub anomalous: bool,
    /// Species (`good` or the defect type).
    pub species: String,
}

impl EvalItem {
    /// Whether the item takes part in pixel metrics: normal images (all-zero mask) and anomalous
    /// images with a mask.
    pub fn has_pixel_truth(&self) -> bool {
        !self.anomalous || self.mask.is_some()
    }
}

/// A class's items after validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassItems {
    /// Class name.
    pub name: String,
    /// Usable items, in `meta.json` order.
    pub items: Vec<EvalItem>,
    /// False for image-only classes (no mask anywhere): no pixel metrics.
    pub has_masks: bool,
    /// Items skipped with an error.
    pub skipped: usize,
}

/// What validation asks for.
#[derive(Debug, Clone, Default)]
pub struct ValidateOptions {
    /// Only these classes (`--classes`); all when `None`.
    pub classes: Option<Vec<String>>,
}

/// A validated dataset: usable items per class and every issue found.
#[derive(Debug, Clone)]
pub struct Validated {
    /// ROOT.
    pub root: PathBuf,
    /// Where the description came from.
    pub origin: Origin,
    /// Classes in name order (empty classes included, with no items).
    pub classes: Vec<ClassItems>,
    /// All issues (discovery first, then per class in item order).
    pub issues: Vec<Issue>,
}

impl Validated {
    /// Issue counts.
    pub fn counts(&self) -> IssueCounts {
        IssueCounts::of(&self.issues)
    }

    /// Usable test images over all classes.
    pub fn total_items(&self) -> usize {
        self.classes.iter().map(|c| c.items.len()).sum()
    }

    /// Fails with `--strict` on any issue, and always when nothing is left to evaluate.
    pub fn check(&self, strict: bool) -> Result<(), DatasetError> {
        let c = self.counts();
        if strict && let Some(first) = self.issues.first() {
            return Err(DatasetError::Strict {
                errors: c.errors,
                warnings: c.warnings,
                first: first.to_string(),
            });
        }
        if self.total_items() == 0 {
            return Err(DatasetError::NothingToEvaluate {
                errors: c.errors,
                warnings: c.warnings,
            });
        }
        Ok(())
    }
}

/// Joins a `meta.json` path to ROOT like the official loader (`os.path.join`: an absolute path
/// stays absolute); `None` for an empty path.
fn join_rel(root: &Path, rel: &str) -> Option<PathBuf> {
    // Paths that leave ROOT are refused before this (`leaves_root`).
    if rel.is_empty() {
        None
    } else {
        Some(root.join(rel))
    }
}

/// Whether a `meta.json` path would leave ROOT, judged on the path as written (`.` and `..`
/// resolved lexically, symlinks not followed). An absolute path inside ROOT is accepted: several
/// official generators write their root argument into every path. Anything else outside ROOT is
/// refused; the official loader would read it.
fn leaves_root(root: &Path, rel: &str) -> bool {
    fn lexical(p: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    }
    if rel.is_empty() {
        return false;
    }
    let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    let root = lexical(&root);
    !lexical(&root.join(rel)).starts_with(&root)
}

/// Whether something that is not a directory exists at `p` (a FIFO or a device counts, so that
/// opening it reports what it is instead of "does not exist").
fn present(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| !m.is_dir())
}

/// Width and height from the header (regular files only: a FIFO or device is an error, not a
/// hang).
fn dimensions(path: &Path, max: u64, what: &'static str) -> Result<(u32, u32), String> {
    let (file, _) = crate::fsio::open_regular(path, max, what).map_err(|e| e.cause())?;
    image::ImageReader::new(std::io::BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

/// Checks one item: returns the usable item (if any) and its issues.
fn check_item(
    root: &Path,
    class: &str,
    class_has_masks: bool,
    item: &MetaItem,
) -> (Option<EvalItem>, Vec<Issue>) {
    let mut issues = Vec::new();
    let ip = item.img_path.as_str();
    if item.anomaly > 1 {
        issues.push(Issue::new(
            IssueKind::BadLabel,
            class,
            Some(ip),
            format!("anomaly = {} (expected 0 or 1): skipped", item.anomaly),
        ));
        return (None, issues);
    }
    for (what, path) in [("image", ip), ("mask", item.mask_path.as_str())] {
        if leaves_root(root, path) {
            issues.push(Issue::new(
                IssueKind::OutsideRoot,
                class,
                Some(ip),
                format!(
                    "{what} path {path:?} leads outside the dataset root {}: skipped \
                     (meta.json paths must stay under ROOT)",
                    root.display()
                ),
            ));
            return (None, issues);
        }
    }
    let Some(image) = join_rel(root, ip).filter(|p| present(p)) else {
        issues.push(Issue::new(
            IssueKind::MissingImage,
            class,
            Some(ip),
            "image does not exist under ROOT (wrong path in meta.json?): skipped",
        ));
        return (None, issues);
    };
    let img_dims = match dimensions(&image, crate::fsio::MAX_IMAGE_FILE, "image") {
        Ok(d) => d,
        Err(e) => {
            issues.push(Issue::new(
                IssueKind::UnreadableImage,
                class,
                Some(ip),
                format!("cannot read image ({e}): skipped"),
            ));
            return (None, issues);
        }
    };
    let anomalous = item.anomaly == 1;
    let mut mask = None;
    let mut mask_path = None;
    if anomalous && class_has_masks {
        let mp = item.mask_path.as_str();
        match join_rel(root, mp) {
            None => {
                issues.push(Issue::new(
                    IssueKind::MissingMask,
                    class,
                    Some(ip),
                    "anomalous image without a mask: image metrics only",
                ));
            }
            Some(p) if p.is_dir() => issues.push(Issue::new(
                IssueKind::MissingMask,
                class,
                Some(ip),
                "anomalous image without a mask: image metrics only",
            )),
            Some(p) if !present(&p) => issues.push(Issue::new(
                IssueKind::MissingMask,
                class,
                Some(ip),
                format!("mask {mp} does not exist (wrong path in meta.json?): image metrics only"),
            )),
            Some(p) => match dimensions(&p, crate::fsio::MAX_MASK_FILE, "mask") {
                Err(e) => issues.push(Issue::new(
                    IssueKind::UnreadableMask,
                    class,
                    Some(mp),
                    format!("cannot read mask ({e}): image metrics only for {ip}"),
                )),
                Ok(md) => {
                    if md != img_dims {
                        issues.push(Issue::new(
                            IssueKind::MaskSizeMismatch,
                            class,
                            Some(mp),
                            format!(
                                "mask is {}×{}, image {ip} is {}×{}: used, resized to the map size",
                                md.0, md.1, img_dims.0, img_dims.1
                            ),
                        ));
                    }
                    mask = Some(p);
                    mask_path = Some(mp.to_owned());
                }
            },
        }
    }
    (
        Some(EvalItem {
            img_path: item.img_path.clone(),
            image,
            mask,
            mask_path,
            anomalous,
            species: item.specie_name.clone(),
        }),
        issues,
    )
}

/// A mask path counts as "given" when non-empty and not a directory (the official convention
/// for image-only datasets is an empty path or a folder).
fn mask_given(root: &Path, item: &MetaItem) -> bool {
    item.anomaly == 1
        && !item.mask_path.is_empty()
        && join_rel(root, &item.mask_path).is_none_or(|p| !p.is_dir())
}

/// Validates the test split of `opened` under `root`: reads every image and mask header (in
/// parallel), pairs masks, counts issues. Fails only for unknown `--classes`.
pub fn validate(
    root: &Path,
    opened: &Opened,
    opts: &ValidateOptions,
) -> Result<Validated, DatasetError> {
    let available: Vec<String> = opened.meta.test.keys().cloned().collect();
    let selected: Vec<String> = match &opts.classes {
        None => available.clone(),
        Some(wanted) => {
            let unknown: Vec<String> = wanted
                .iter()
                .filter(|w| !available.contains(w))
                .cloned()
                .collect();
            if !unknown.is_empty() {
                return Err(DatasetError::UnknownClasses { unknown, available });
            }
            let mut w = wanted.clone();
            w.sort();
            w.dedup();
            w
        }
    };
    let mut issues: Vec<Issue> = opened
        .issues
        .iter()
        .filter(|i| selected.contains(&i.class))
        .cloned()
        .collect();
    let mut classes = Vec::new();
    for name in selected {
        let items = opened
            .meta
            .test
            .get(&name)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if items.is_empty() {
            issues.push(Issue::new(
                IssueKind::EmptyClass,
                &name,
                None,
                "class has no test images: no metrics",
            ));
            classes.push(ClassItems {
                name,
                items: Vec::new(),
                has_masks: false,
                skipped: 0,
            });
            continue;
        }
        let has_masks = items.iter().any(|i| mask_given(root, i));
        let checked: Vec<(Option<EvalItem>, Vec<Issue>)> = items
            .par_iter()
            .map(|i| check_item(root, &name, has_masks, i))
            .collect();
        let mut usable = Vec::new();
        let mut skipped = 0;
        for (item, mut its) in checked {
            issues.append(&mut its);
            match item {
                Some(i) => usable.push(i),
                None => skipped += 1,
            }
        }
        if usable.is_empty() {
            issues.push(Issue::new(
                IssueKind::EmptyClass,
                &name,
                None,
                format!("no usable test image ({skipped} skipped): no metrics"),
            ));
        }
        classes.push(ClassItems {
            name,
            items: usable,
            has_masks,
            skipped,
        });
    }
    Ok(Validated {
        root: root.to_owned(),
        origin: opened.origin.clone(),
        classes,
        issues,
    })
}
