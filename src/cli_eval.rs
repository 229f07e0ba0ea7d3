//! `anomalyclip-edge eval` and `dataset-meta`: the paper's evaluation protocol on a labelled
//! dataset, through the same package + engine + head as the daemon.
//!
//! `eval` input: a model package and a dataset ROOT (MVTec-style classes, one SDD-style category,
//! or a `meta.json` in the official format; image-only classes get image metrics only). Output: a
//! table on stdout (per class and mean: image AUROC, image AP, pixel AUROC, AUPRO), the same
//! numbers as JSON and CSV files (byte-identical across runs, batch sizes and thread counts),
//! every dataset issue on stderr with counts, a progress bar with throughput and ETA on a
//! terminal, and on request the raw maps (`--dump-maps`).
//!
//! `dataset-meta` input: a folder tree and its layout. Output: the `meta.json` describing it.
//!
//! Exit codes of `eval`: 0 the report was written and every item was evaluated (warnings, e.g.
//! an anomalous image without a mask, are printed and counted but do not change the code); 1 the
//! report was written but some items were skipped with an error (image missing or unreadable,
//! bad label, scoring failed); 2 no report: bad usage, unreadable ROOT or no dataset found,
//! malformed `meta.json`, unknown `--classes`, nothing to evaluate, `--strict` with any issue,
//! model or engine failure, report file not writable (one line on stderr).
//! `dataset-meta`: 0 written (unpaired masks are printed as warnings), 2 not written (no layout,
//! or a layout without any test image: an empty `meta.json` is never written).
//!
//! Design: the dataset is opened and validated before the model is loaded, so a bad ROOT or a
//! `--strict` failure costs no model load. `--batch N` hands the driver's images to the engine N
//! at a time ([`Scorer::score_files`]: parallel decode, one engine call); the head runs per image,
//! so the numbers do not depend on N. Masks are resized with the crate's Pillow-exact bilinear
//! resampler, as the reference's `transforms.Resize` does.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anomalyclip_edge::engine::{self, Backend, EngineOptions};
use anomalyclip_edge::eval::dataset::{self, IssueCounts, Layout, ValidateOptions};
use anomalyclip_edge::eval::{self, EvalOptions, ScoreResult};
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::preprocess::{Filter, resize_u8};
use anomalyclip_edge::scorer::Scorer;
use anyhow::Context;

/// Issues printed one per line on stderr; the rest are counted (all are in the JSON report).
const MAX_ISSUE_LINES: usize = 50;

/// Largest `--batch`: the same bound as the daemon's `[engine] max_batch` (every image of a
/// batch is decoded and held at once: 64 × 518² × 3 floats is ~200 MB of model input).
const MAX_BATCH: usize = 64;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model package directory (written by engines/export.py).
    #[arg(long)]
    model: PathBuf,
    /// Dataset ROOT.
    #[arg(long)]
    data: PathBuf,
    /// A meta.json describing the dataset (paths relative to ROOT); default: ROOT/meta.json when
    /// present and --layout is auto, else the folder layout.
    #[arg(long)]
    meta: Option<PathBuf>,
    /// Folder layout: auto (meta.json, else visa when ROOT/split_csv/1cls.csv exists, else sdd
    /// when ROOT/test exists, else mvtec), or one of the official layouts: mvtec, visa, mpdd,
    /// btad, sdd, dagm, dtd, head_ct, brainmri, br35, covid, isbi, clinicdb, colondb, kvasir,
    /// endotect, tn3k (trees: docs/datasets.md).
    #[arg(long, default_value = "auto")]
    layout: Layout,
    /// Only these classes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Fail (exit 2, no report) on any dataset issue, warnings included.
    #[arg(long)]
    strict: bool,
    /// Directory for the report files (created if needed; default: the current directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// JSON report path (default: eval-report.json under --out).
    #[arg(long)]
    json: Option<PathBuf>,
    /// CSV report path (default: eval-report.csv under --out).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write every anomaly map (raw little-endian float32, S×S) under this directory, mirroring
    /// the image paths (`<img_path>.f32`), with `index.csv` (class, image, label, score, mask).
    #[arg(long)]
    dump_maps: Option<PathBuf>,
    /// No progress bar (it is only drawn when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,
    /// Inference backend.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// CPU threads for inference (0 = all cores; at most 4 × the CPUs available, and 256).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Images per engine call, 1 to 64 (1 = the paper's protocol; the numbers do not depend on
    /// it).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the install paths).
    #[arg(long)]
    ort_library: Option<PathBuf>,
    /// Skip hashing package files larger than 64 MiB (presence is still checked).
    #[arg(long)]
    fast_load: bool,
}

#[derive(clap::Args)]
pub struct DatasetMetaArgs {
    /// Dataset ROOT.
    root: PathBuf,
    /// Folder layout: auto (visa when ROOT/split_csv/1cls.csv exists, else sdd when ROOT/test
    /// exists, else mvtec), or one of the official layouts: mvtec, visa, mpdd, btad, sdd, dagm,
    /// dtd, head_ct, brainmri, br35, covid, isbi, clinicdb, colondb, kvasir, endotect, tn3k
    /// (trees: docs/datasets.md).
    #[arg(long, default_value = "auto")]
    layout: Layout,
    /// Where to write (default: ROOT/meta.json).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

/// The eval driver's view of the inference core: `images_per_call` files per engine call.
struct EngineScorer(Scorer);

impl eval::Scorer for EngineScorer {
    fn score(&mut self, image: &Path) -> ScoreResult {
        self.score_batch(&[image])
            .pop()
            .unwrap_or_else(|| Err("no result".into()))
    }

    fn score_batch(&mut self, images: &[&Path]) -> Vec<ScoreResult> {
        match self.0.score_files(images) {
            Ok(results) => results
                .into_iter()
                .map(|r| {
                    r.map(|s| (s.score, s.map))
                        .map_err(|e| crate::one_line(&e.to_string()))
                })
                .collect(),
            Err(e) => {
                let msg = crate::one_line(&e.to_string());
                images.iter().map(|_| Err(msg.clone())).collect()
            }
        }
    }
}

/// Pillow's `resize(…, BILINEAR)` of a single-channel mask, as the reference's mask transform.
fn pillow_bilinear(src: &[u8], w: usize, h: usize, dst_w: usize, dst_h: usize) -> Vec<u8> {
    resize_u8(src, w, h, w, 1, dst_w, dst_h, Filter::Bilinear)
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if args.batch == 0 || args.batch > MAX_BATCH {
        anyhow::bail!(
            "--batch {}: expected 1 to {MAX_BATCH} images per engine call",
            args.batch
        );
    }
    engine::check_threads(args.threads).map_err(|m| anyhow::anyhow!("--threads {m}"))?;
    let out_dir = args.out.clone().unwrap_or_else(|| PathBuf::from("."));
    if let Some(dir) = &args.out {
        crate::ensure_dir(dir)?;
    }
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| out_dir.join("eval-report.json"));
    let csv_path = args
        .csv
        .clone()
        .unwrap_or_else(|| out_dir.join("eval-report.csv"));

    // The dataset first: a bad ROOT or a --strict failure should not cost a model load.
    let opened = dataset::open(&args.data, args.meta.as_deref(), args.layout)?;
    let validated = dataset::validate(
        &args.data,
        &opened,
        &ValidateOptions {
            classes: args.classes.clone(),
        },
    )?;
    validated.check(args.strict)?;

    let opts = EngineOptions {
        backend: args.backend,
        threads: args.threads,
        ort_library: args.ort_library.clone(),
        max_batch: args.batch,
        ..EngineOptions::default()
    };
    let hashes = if args.fast_load {
        HashCheck::UpTo(64 << 20)
    } else {
        HashCheck::All
    };
    let scorer = Scorer::open(&args.model, hashes, &opts)
        .with_context(|| format!("model package {}", args.model.display()))?;
    let tiny = scorer.package().manifest.tiny;
    if tiny {
        tracing::warn!(
            "model package {} holds random weights (a test model): the metrics are meaningless for real detection",
            args.model.display()
        );
    }
    let eval_opts = EvalOptions {
        map_size: scorer.size(),
        strict: args.strict,
        progress: !args.no_progress,
        dump_maps: args.dump_maps.clone(),
        images_per_call: args.batch,
        ..EvalOptions::default()
    };
    let mut scorer = EngineScorer(scorer);
    let report = eval::evaluate(&validated, &mut scorer, &pillow_bilinear, &eval_opts)?;

    print_issues(&report.issues, &report.issue_counts);
    {
        let mut out = std::io::stdout().lock();
        write!(out, "{}", report.table()).context("writing to stdout")?;
        if tiny {
            writeln!(
                out,
                "note: random-weight test model ({}): these numbers say nothing about detection quality",
                args.model.display()
            )
            .context("writing to stdout")?;
        }
        out.flush().ok();
    }
    report.write_json(&json_path)?;
    report.write_csv(&csv_path)?;
    eprintln!("wrote {} and {}", json_path.display(), csv_path.display());
    Ok(if report.issue_counts.errors > 0 {
        eprintln!(
            "{} item(s) skipped with errors: the metrics leave them out (exit 1)",
            report.issue_counts.errors
        );
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Every issue (up to [`MAX_ISSUE_LINES`]) on stderr, then the counts per kind.
fn print_issues(issues: &[dataset::Issue], counts: &IssueCounts) {
    if issues.is_empty() {
        return;
    }
    let mut err = std::io::stderr().lock();
    for issue in issues.iter().take(MAX_ISSUE_LINES) {
        let _ = writeln!(err, "{issue}");
    }
    if issues.len() > MAX_ISSUE_LINES {
        let _ = writeln!(
            err,
            "… and {} more issue(s), all listed in the JSON report",
            issues.len() - MAX_ISSUE_LINES
        );
    }
    let kinds: Vec<String> = counts
        .by_kind
        .iter()
        .map(|(kind, n)| {
            let name = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{kind:?}"));
            format!("{name} {n}")
        })
        .collect();
    let _ = writeln!(
        err,
        "dataset issues: {} error(s) (items skipped), {} warning(s) (reduced use): {}",
        counts.errors,
        counts.warnings,
        kinds.join(", ")
    );
}

pub fn run_dataset_meta(args: DatasetMetaArgs) -> anyhow::Result<ExitCode> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.root.join(dataset::META_FILE));
    if output.exists() && !args.force {
        anyhow::bail!(
            "{} exists: pass --force to replace it, or --output to write elsewhere",
            output.display()
        );
    }
    let written = dataset::write_meta_to(&args.root, args.layout, &output)?;
    for issue in &written.issues {
        eprintln!("{issue}");
    }
    let classes: Vec<String> = written
        .test_images
        .iter()
        .map(|(class, n)| format!("{class} {n}"))
        .collect();
    let total: usize = written.test_images.values().sum();
    println!(
        "wrote {} (layout {}): {} test images in {} class(es): {}",
        written.path.display(),
        written.layout,
        total,
        written.test_images.len(),
        classes.join(", ")
    );
    if !written.issues.is_empty() {
        eprintln!("{} warning(s)", written.issues.len());
    }
    Ok(ExitCode::SUCCESS)
}
