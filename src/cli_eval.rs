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

use anomalyclip_edge::engine::{self, Backend, EngineOptions, Precision};
use anomalyclip_edge::eval::dataset::{self, IssueCounts, Layout, ValidateOptions};
use anomalyclip_edge::eval::{self, EvalOptions, ScoreResult};
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::preprocess::{Filter, resize_u8};
use anomalyclip_edge::reference::{DEFAULT_MAX_BANK_MB, Reference, WHOLE_FRAME};
use anomalyclip_edge::scorer::Scorer;
use anyhow::Context;
use std::collections::HashMap;

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
    /// Model precision: fp32, int8 (CPU) or fp16 (GPU); the package must have it.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
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
    /// Also evaluate with a few-shot reference bank per class: K normal images drawn with
    /// --seed from the class's training split (`<class>/train/good`, `train/good` for one
    /// category); the test split is untouched. Reports zero-shot and few-shot side by side.
    #[arg(long, value_name = "K")]
    few_shot: Option<usize>,
    /// Seed of the few-shot draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
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

/// The eval driver's view of the inference core: `images_per_call` files per engine call, and
/// per class the few-shot reference bank of that class (none: zero-shot).
struct EngineScorer(Scorer, HashMap<String, Reference>);

impl eval::Scorer for EngineScorer {
    fn begin_class(&mut self, class: &str) {
        let bank = self.1.remove(class);
        self.0.set_reference(bank);
    }

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
    if args.few_shot == Some(0) {
        anyhow::bail!("--few-shot 0: expected at least 1 reference image per class");
    }
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
    // The reference draw before the model load too: a class without enough training images
    // costs nothing.
    let references = match args.few_shot {
        Some(k) => Some(draw_references(&validated, k, args.seed)?),
        None => None,
    };

    let opts = EngineOptions {
        backend: args.backend,
        threads: args.threads,
        ort_library: args.ort_library.clone(),
        max_batch: args.batch,
        precision: args.precision,
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
    let mut scorer = EngineScorer(scorer, HashMap::new());
    let report = eval::evaluate(&validated, &mut scorer, &pillow_bilinear, &eval_opts)?;
    let few_shot = match &references {
        Some(refs) => {
            for (class, files) in refs {
                let bank = build_bank(&mut scorer.0, files)
                    .with_context(|| format!("few-shot references of class {class}"))?;
                scorer.1.insert(class.clone(), Reference::new(bank));
            }
            let fs_opts = EvalOptions {
                dump_maps: None,
                ..eval_opts.clone()
            };
            Some(eval::evaluate(
                &validated,
                &mut scorer,
                &pillow_bilinear,
                &fs_opts,
            )?)
        }
        None => None,
    };

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
    if let (Some(fs), Some(refs), Some(k)) = (&few_shot, &references, args.few_shot) {
        let mut out = std::io::stdout().lock();
        write!(out, "{}", side_by_side(&report, fs, k, args.seed)).context("writing to stdout")?;
        out.flush().ok();
        let (fs_json, fs_csv) = (few_shot_path(&json_path, k), few_shot_path(&csv_path, k));
        fs.write_json(&fs_json)?;
        fs.write_csv(&fs_csv)?;
        let listing: serde_json::Map<String, serde_json::Value> = refs
            .iter()
            .map(|(c, f)| {
                let files = f.iter().map(|p| p.display().to_string().into()).collect();
                (c.clone(), serde_json::Value::Array(files))
            })
            .collect();
        let refs_path = few_shot_path(&json_path.with_extension("references.json"), k);
        let refs_json = serde_json::json!({"k": k, "seed": args.seed, "references": listing});
        std::fs::write(&refs_path, format!("{refs_json:#}\n"))
            .with_context(|| format!("writing {}", refs_path.display()))?;
        eprintln!(
            "wrote {}, {} and {}",
            fs_json.display(),
            fs_csv.display(),
            refs_path.display()
        );
    }
    let few_shot_errors = few_shot.as_ref().map_or(0, |r| r.issue_counts.errors);
    Ok(if report.issue_counts.errors > 0 || few_shot_errors > 0 {
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

/// `eval-report.json` → `eval-report.few-shot-K.json`.
fn few_shot_path(path: &Path, k: usize) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.few-shot-{k}.{}", ext.to_string_lossy()),
        None => format!("{stem}.few-shot-{k}"),
    };
    path.with_file_name(name)
}

/// The training split's normal images of `class`: `ROOT/<class>/train/good`, or `ROOT/train/good`
/// for a single-category layout.
fn train_good(dataset: &dataset::Validated, class: &str) -> PathBuf {
    match dataset.origin {
        dataset::Origin::Discovered(Layout::Sdd) => dataset.root.join("train").join("good"),
        _ => dataset.root.join(class).join("train").join("good"),
    }
}

/// SplitMix64: the few-shot draw's generator (fixed here, so a seed picks the same images on
/// every platform and version).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// K images per evaluated class, drawn without replacement with `seed` from the name-sorted
/// training images (a Fisher–Yates shuffle driven by SplitMix64 seeded with `seed`, first K).
fn draw_references(
    dataset: &dataset::Validated,
    k: usize,
    seed: u64,
) -> anyhow::Result<Vec<(String, Vec<PathBuf>)>> {
    let mut out = Vec::new();
    for class in dataset.classes.iter().filter(|c| !c.items.is_empty()) {
        let dir = train_good(dataset, &class.name);
        let mut files = crate::cli_reference::list_images(&dir)
            .with_context(|| format!("--few-shot: training images of class {}", class.name))?;
        if files.len() < k {
            anyhow::bail!(
                "--few-shot {k}: {} holds {} images (png/jpg/jpeg/bmp), class {} needs {k}",
                dir.display(),
                files.len(),
                class.name
            );
        }
        let mut state = seed;
        for i in (1..files.len()).rev() {
            let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
            files.swap(i, j);
        }
        files.truncate(k);
        out.push((class.name.clone(), files));
    }
    Ok(out)
}

/// The whole-frame reference bank of `files`.
fn build_bank(
    scorer: &mut Scorer,
    files: &[PathBuf],
) -> anyhow::Result<anomalyclip_edge::reference::Bank> {
    let s = scorer.size();
    let n = 3 * s * s;
    let mut input = vec![0.0f32; files.len() * n];
    for (path, out) in files.iter().zip(input.chunks_exact_mut(n)) {
        let img = anomalyclip_edge::image_io::load_image(path)?;
        scorer
            .prepare_image(&img, out)
            .with_context(|| path.display().to_string())?;
    }
    Ok(scorer.build_bank(&input, files.len(), WHOLE_FRAME, DEFAULT_MAX_BANK_MB)?)
}

/// Zero-shot and few-shot metrics per class and mean, side by side (percent).
fn side_by_side(zs: &eval::EvalReport, fs: &eval::EvalReport, k: usize, seed: u64) -> String {
    use std::fmt::Write as _;
    let p = |m: Option<f64>| m.map_or_else(|| "n/a".to_owned(), |v| format!("{:.1}", v * 100.0));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nzero-shot vs few-shot (K = {k}, seed {seed}), percent:"
    );
    let _ = writeln!(
        t,
        "{:<20} {:>15} {:>15} {:>15} {:>15}",
        "class", "img AUROC", "img AP", "px AUROC", "AUPRO"
    );
    let row = |t: &mut String, name: &str, a: [Option<f64>; 4], b: [Option<f64>; 4]| {
        let cells: Vec<String> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| format!("{:>6} → {:>6}", p(*x), p(*y)))
            .collect();
        let _ = writeln!(t, "{name:<20} {}", cells.join(" "));
    };
    for (a, b) in zs.classes.iter().zip(&fs.classes) {
        let m = |c: &eval::ClassReport| {
            [
                c.image_auroc.value(),
                c.image_ap.value(),
                c.pixel_auroc.value(),
                c.aupro.value(),
            ]
        };
        row(&mut t, &a.name, m(a), m(b));
    }
    let m = |r: &eval::EvalReport| {
        [
            r.mean.image_auroc.value,
            r.mean.image_ap.value,
            r.mean.pixel_auroc.value,
            r.mean.aupro.value,
        ]
    };
    row(&mut t, "mean", m(zs), m(fs));
    t
}
