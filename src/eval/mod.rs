//! `eval`: score a labelled dataset and report image AUROC/AP, pixel AUROC and AUPRO per class.
//!
//! Stages, in order:
//! 1. [`dataset`]: open ROOT (`meta.json` or folder layout), validate items → [`dataset::Validated`]
//!    with per-item issues (`--strict` fails on any);
//! 2. [`evaluate`]: for each class, call the [`Scorer`] (engine + head) on every image
//!    ([`EvalOptions::images_per_call`] images per call, so engines can batch), load masks
//!    ([`mask`], with a pluggable Pillow-exact [`MaskResizer`]), stream maps into
//!    [`metrics::PixelAccumulator`] in parallel batches, compute the class's metrics;
//! 3. [`report`]: per-class and mean metrics (undefined ones excluded from the mean and shown as
//!    `n/a`, with the number of classes averaged), JSON, CSV and a terminal table.
//!
//! Input: a validated dataset, a scorer returning `(score, S×S map)` per image path, a mask
//! resizer. Output: [`EvalReport`]. Failure modes: [`EvalError`] — dataset-level problems, a map of
//! the wrong size or a NaN from the scorer (engine bugs: stop), `--strict` with any issue, I/O when
//! dumping maps. Per-item failures (the scorer fails on an image, a mask cannot be decoded) are
//! issues in the report, counted, and the run goes on.
//!
//! Memory: one class's pixel state at a time (see [`metrics`]: exact, ≤ 4 B per representable
//! `f32` in the maps' range + 4 B per anomalous pixel) plus `batch` maps in flight. Results are
//! bit-identical across runs and thread counts.

pub mod dataset;
pub mod layouts;
pub mod mask;
pub mod metrics;
pub mod report;

use std::io::{IsTerminal, Write as _};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

pub use dataset::{Layout, Validated, write_meta};
pub use mask::MaskResizer;
pub use metrics::{Metric, Undefined};
pub use report::{ClassReport, EvalReport, MeanReport, Timing};

use dataset::{
    ClassItems, DatasetError, EvalItem, Issue, IssueCounts, IssueKind, Origin, ValidateOptions,
};
use metrics::{MetricsError, PixelAccumulator};

/// Side of the reference anomaly maps.
pub const REFERENCE_MAP_SIZE: usize = 518;

/// What a [`Scorer`] returns per image: the score and the `S × S` map, or why it failed.
pub type ScoreResult = Result<(f32, Vec<f32>), String>;

/// Scores one image file: the image score and its `S × S` anomaly map (row-major, in the resized
/// frame, `S` = [`EvalOptions::map_size`]). An `Err` marks the item unreadable/failed and the run
/// continues. Closures `FnMut(&Path) -> Result<(f32, Vec<f32>), String>` implement it.
///
/// The driver hands images over in groups of [`EvalOptions::images_per_call`] through
/// [`Scorer::score_batch`]; a scorer that can batch engine calls overrides it, the default scores
/// them one by one.
pub trait Scorer {
    /// Runs decode + preprocess + engine + head on `image`.
    fn score(&mut self, image: &Path) -> ScoreResult;

    /// Scores `images` (one result per image, in order). Results must not depend on how the
    /// images are grouped.
    fn score_batch(&mut self, images: &[&Path]) -> Vec<ScoreResult> {
        images.iter().map(|p| self.score(p)).collect()
    }
}

impl<F> Scorer for F
where
    F: FnMut(&Path) -> ScoreResult,
{
    fn score(&mut self, image: &Path) -> ScoreResult {
        self(image)
    }
}

/// How to run an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Side `S` of the maps the scorer returns (518 for the reference).
    pub map_size: usize,
    /// Fail on the first issue (validation or evaluation).
    pub strict: bool,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Write every map as raw little-endian `f32` (`S × S`) under this folder, mirroring the
    /// image paths (`<img_path>.f32`), plus `index.csv` (class, image, label, score, file, size,
    /// and the mask used for the pixel metrics, empty when none).
    pub dump_maps: Option<PathBuf>,
    /// Maps buffered before a parallel accumulation step (memory: `batch × S² × 5` bytes).
    pub batch: usize,
    /// Images per [`Scorer::score_batch`] call (`--batch`; 1 = the paper's protocol). Results do
    /// not depend on it.
    pub images_per_call: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            map_size: REFERENCE_MAP_SIZE,
            strict: false,
            progress: true,
            dump_maps: None,
            batch: 16,
            images_per_call: 1,
        }
    }
}

/// What stops an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Opening or validating the dataset failed (includes `--strict` on validation issues).
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The scorer returned a map of the wrong size (an engine/config bug).
    #[error("scorer returned {got} map values for {image}, expected {expected} ({size}×{size})")]
    MapSize {
        /// The image.
        image: PathBuf,
        /// Values returned.
        got: usize,
        /// `S²`.
        expected: usize,
        /// `S`.
        size: usize,
    },
    /// A metric input was invalid (NaN score or map value from the engine).
    #[error("class {class}: {source}")]
    Metrics {
        /// The class.
        class: String,
        /// The cause.
        #[source]
        source: MetricsError,
    },
    /// The scorer returned another number of results than images it was given (a scorer bug).
    #[error("scorer returned {got} results for a batch of {expected} images")]
    BatchSize {
        /// Results returned.
        got: usize,
        /// Images given.
        expected: usize,
    },
    /// `--strict` and an issue during evaluation.
    #[error("--strict: {0}")]
    Strict(String),
    /// Writing a dumped map failed.
    #[error("cannot write map dump {path}: {source}")]
    Dump {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Everything `eval` needs besides the scorer and the resizer.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    /// Dataset ROOT.
    pub root: PathBuf,
    /// `--meta`: an explicit `meta.json`.
    pub meta: Option<PathBuf>,
    /// Folder layout when there is no `meta.json` (`auto` prefers `ROOT/meta.json`).
    pub layout: Layout,
    /// `--classes`: only these.
    pub classes: Option<Vec<String>>,
    /// Run options.
    pub options: EvalOptions,
}

/// Opens, validates (failing early with `--strict`) and evaluates a dataset.
pub fn run(
    request: &EvalRequest,
    scorer: &mut dyn Scorer,
    resizer: &dyn MaskResizer,
) -> Result<EvalReport, EvalError> {
    let opened = dataset::open(&request.root, request.meta.as_deref(), request.layout)?;
    let validated = dataset::validate(
        &request.root,
        &opened,
        &ValidateOptions {
            classes: request.classes.clone(),
        },
    )?;
    evaluate(&validated, scorer, resizer, &request.options)
}

/// One scored image waiting for the parallel accumulation step.
struct Pending {
    map: Vec<f32>,
    /// `None` for a normal image (all-zero truth).
    mask: Option<(PathBuf, String)>,
    img_path: String,
}

struct MapDump {
    dir: PathBuf,
    index: std::fs::File,
}

impl MapDump {
    fn new(dir: &Path) -> Result<Self, EvalError> {
        let err = |source| EvalError::Dump {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let index_path = dir.join("index.csv");
        let mut index = std::fs::File::create(&index_path).map_err(|source| EvalError::Dump {
            path: index_path.clone(),
            source,
        })?;
        writeln!(
            index,
            "class,img_path,anomalous,score,map_file,width,height,mask_path"
        )
        .map_err(|source| EvalError::Dump {
            path: index_path,
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            index,
        })
    }

    fn write(
        &mut self,
        class: &str,
        item: &EvalItem,
        score: f32,
        map: &[f32],
        size: usize,
    ) -> Result<(), EvalError> {
        let img_path = item.img_path.as_str();
        // Only plain components: a meta.json path must not escape the dump folder.
        let rel: PathBuf = Path::new(img_path)
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s),
                _ => None,
            })
            .collect();
        let mut name = rel.into_os_string();
        name.push(".f32");
        let rel = PathBuf::from(name);
        let path = self.dir.join(&rel);
        let err = |source| EvalError::Dump {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let bytes: Vec<u8> = map.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, bytes).map_err(err)?;
        let field = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_owned()
            }
        };
        writeln!(
            self.index,
            "{},{},{},{:e},{},{size},{size},{}",
            field(class),
            field(img_path),
            u8::from(item.anomalous),
            score,
            field(&rel.to_string_lossy()),
            field(item.mask_path.as_deref().unwrap_or("")),
        )
        .map_err(err)
    }
}

fn progress_bar(total: usize, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>16} [{bar:32}] {pos}/{len} {per_sec} ETA {eta} ({elapsed})",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.enable_steady_tick(Duration::from_millis(250));
    pb
}

/// Records an issue; with `--strict` it stops the run.
fn record(issues: &mut Vec<Issue>, issue: Issue, strict: bool) -> Result<(), EvalError> {
    if strict {
        return Err(EvalError::Strict(issue.to_string()));
    }
    issues.push(issue);
    Ok(())
}

/// Loads the batch's masks in parallel and streams maps + truths into the accumulator, in order.
fn flush(
    acc: &mut PixelAccumulator,
    pending: &mut Vec<Pending>,
    class: &str,
    size: usize,
    resizer: &dyn MaskResizer,
    issues: &mut Vec<Issue>,
    strict: bool,
) -> Result<usize, EvalError> {
    let truths: Vec<Result<Vec<bool>, mask::MaskError>> = pending
        .par_iter()
        .map(|p| match &p.mask {
            None => Ok(vec![false; size * size]),
            Some((path, _)) => mask::load_mask(path, size, resizer),
        })
        .collect();
    let mut pairs: Vec<(&[f32], &[bool])> = Vec::with_capacity(pending.len());
    let mut failed = Vec::new();
    for (p, t) in pending.iter().zip(&truths) {
        match t {
            Ok(t) => pairs.push((&p.map, t)),
            Err(e) => {
                let mask_rel = p.mask.as_ref().map(|m| m.1.as_str());
                failed.push(Issue::new(
                    IssueKind::UnreadableMask,
                    class,
                    mask_rel,
                    format!("{e}: image metrics only for {}", p.img_path),
                ));
            }
        }
    }
    let used = pairs.len();
    acc.add_images(&pairs)
        .map_err(|source| EvalError::Metrics {
            class: class.to_owned(),
            source,
        })?;
    drop(pairs);
    pending.clear();
    for f in failed {
        record(issues, f, strict)?;
    }
    Ok(used)
}

/// State shared by the classes of one run.
struct Run<'a> {
    scorer: &'a mut dyn Scorer,
    resizer: &'a dyn MaskResizer,
    opts: &'a EvalOptions,
    pb: ProgressBar,
    dump: Option<MapDump>,
    issues: Vec<Issue>,
    peak_memory: usize,
}

/// Scores and measures one class.
fn evaluate_class(run: &mut Run<'_>, class: &ClassItems) -> Result<ClassReport, EvalError> {
    let Run {
        scorer,
        resizer,
        opts,
        pb,
        dump,
        issues,
        peak_memory,
    } = run;
    let resizer = *resizer;
    let opts = *opts;
    let size = opts.map_size;
    let batch = opts.batch.max(1);
    pb.set_message(class.name.clone());
    let mut labels = Vec::with_capacity(class.items.len());
    let mut scores = Vec::with_capacity(class.items.len());
    // The other decision statistics: the map's maximum, and the blend with the score.
    let mut map_maxes = Vec::with_capacity(class.items.len());
    let mut skipped = class.skipped;
    let mut acc = class.has_masks.then(|| PixelAccumulator::new(size, size));
    let mut pending: Vec<Pending> = Vec::with_capacity(batch);
    let mut pixel_images = 0;
    let per_call = opts.images_per_call.max(1);
    for chunk in class.items.chunks(per_call) {
        let paths: Vec<&Path> = chunk.iter().map(|i| i.image.as_path()).collect();
        let results = scorer.score_batch(&paths);
        if results.len() != chunk.len() {
            return Err(EvalError::BatchSize {
                got: results.len(),
                expected: chunk.len(),
            });
        }
        pb.inc(chunk.len() as u64);
        for (item, result) in chunk.iter().zip(results) {
            let (score, map) = match result {
                Ok(r) => r,
                Err(e) => {
                    skipped += 1;
                    record(
                        issues,
                        Issue::new(
                            IssueKind::ScoreFailed,
                            &class.name,
                            Some(&item.img_path),
                            format!("scoring failed ({e}): skipped"),
                        ),
                        opts.strict,
                    )?;
                    continue;
                }
            };
            if map.len() != size * size {
                return Err(EvalError::MapSize {
                    image: item.image.clone(),
                    got: map.len(),
                    expected: size * size,
                    size,
                });
            }
            if !score.is_finite() {
                return Err(EvalError::Metrics {
                    class: class.name.clone(),
                    source: MetricsError::NonFinite {
                        index: labels.len(),
                        value: score,
                    },
                });
            }
            labels.push(item.anomalous);
            scores.push(score);
            map_maxes.push(map.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            if let Some(d) = dump.as_mut() {
                d.write(&class.name, item, score, &map, size)?;
            }
            if let Some(acc) = acc.as_mut()
                && item.has_pixel_truth()
            {
                pending.push(Pending {
                    map,
                    mask: item.mask.clone().zip(item.mask_path.clone()),
                    img_path: item.img_path.clone(),
                });
                if pending.len() >= batch {
                    pixel_images += flush(
                        acc,
                        &mut pending,
                        &class.name,
                        size,
                        resizer,
                        issues,
                        opts.strict,
                    )?;
                    *peak_memory = (*peak_memory).max(acc.memory_bytes());
                }
            }
        }
    }
    let map_err = |source| EvalError::Metrics {
        class: class.name.clone(),
        source,
    };
    let image_auroc = metrics::image_auroc(&labels, &scores).map_err(map_err)?;
    let image_ap = metrics::average_precision(&labels, &scores).map_err(map_err)?;
    let blends: Vec<f32> = scores
        .iter()
        .zip(&map_maxes)
        .map(|(s, m)| crate::decision::Statistic::Blend.value(*s, *m))
        .collect();
    let map_max_auroc = metrics::image_auroc(&labels, &map_maxes).map_err(map_err)?;
    let map_max_ap = metrics::average_precision(&labels, &map_maxes).map_err(map_err)?;
    let blend_auroc = metrics::image_auroc(&labels, &blends).map_err(map_err)?;
    let blend_ap = metrics::average_precision(&labels, &blends).map_err(map_err)?;
    let (pixel_auroc, aupro, regions) = match acc.as_mut() {
        None => {
            let u = Metric::Undefined(Undefined::NoMasks);
            (u, u, 0)
        }
        Some(acc) => {
            pixel_images += flush(
                acc,
                &mut pending,
                &class.name,
                size,
                resizer,
                issues,
                opts.strict,
            )?;
            *peak_memory = (*peak_memory).max(acc.memory_bytes());
            let pm = acc.finish();
            (pm.pixel_auroc, pm.aupro, pm.regions)
        }
    };
    let anomalous = labels.iter().filter(|&&l| l).count();
    Ok(ClassReport {
        name: class.name.clone(),
        images: labels.len(),
        normal: labels.len() - anomalous,
        anomalous,
        pixel_images,
        regions,
        skipped,
        image_auroc,
        image_ap,
        pixel_auroc,
        aupro,
        map_max_auroc,
        map_max_ap,
        blend_auroc,
        blend_ap,
    })
}

/// Evaluates a validated dataset. Classes run one after another (one class's pixel state in
/// memory at a time); within a class, masks and map statistics are computed in parallel batches.
pub fn evaluate(
    dataset: &Validated,
    scorer: &mut dyn Scorer,
    resizer: &dyn MaskResizer,
    opts: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    dataset.check(opts.strict)?;
    let start = Instant::now();
    let mut run = Run {
        scorer,
        resizer,
        opts,
        pb: progress_bar(dataset.total_items(), opts.progress),
        dump: opts.dump_maps.as_deref().map(MapDump::new).transpose()?,
        issues: dataset.issues.clone(),
        peak_memory: 0,
    };
    let mut classes = Vec::with_capacity(dataset.classes.len());
    for class in &dataset.classes {
        if class.items.is_empty() {
            classes.push(ClassReport::empty(&class.name, class.skipped));
            continue;
        }
        match evaluate_class(&mut run, class) {
            Ok(r) => classes.push(r),
            Err(e) => {
                run.pb.abandon();
                return Err(e);
            }
        }
    }
    run.pb.finish_and_clear();
    let (issues, peak) = (run.issues, run.peak_memory);
    let images = classes.iter().map(|c| c.images).sum();
    let source = match &dataset.origin {
        Origin::MetaFile(p) => format!("meta:{}", p.display()),
        Origin::Discovered(l) => format!("layout:{l}"),
    };
    Ok(EvalReport {
        root: dataset.root.display().to_string(),
        source,
        map_size: opts.map_size,
        mean: MeanReport::of(&classes),
        classes,
        issue_counts: IssueCounts::of(&issues),
        issues,
        timing: Timing {
            images,
            seconds: start.elapsed().as_secs_f64(),
            peak_pixel_memory: peak,
        },
    })
}
