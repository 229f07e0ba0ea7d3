//! `anomalyclip-edge reference`: builds a few-shot reference bank (see `src/reference.rs` for
//! what the bank holds and how it is used), in one of two modes:
//!
//! - **Whole frame, from files** (`--model PKG --images DIR --out FILE`): the bank of the good
//!   images of a folder (PNG/JPEG/BMP, sorted by name; with `--k`, the first K), region key
//!   `frame`, usable with `reference = "FILE"` on a `[[camera]]` without regions.
//! - **A camera's region, as the daemon scores it** (`--config FILE --camera C [--region R]`
//!   with `--images DIR` (full frames of that camera) or `--frames K` (live frames, at least
//!   `--interval-ms` apart, near-duplicates skipped: the capture of `calibrate`)): each sample is
//!   cropped and resized as the daemon crops the region, the bank is keyed by the region's name
//!   and geometry and written atomically to `<state_dir>/reference/<camera>/<region or
//!   _frame>.bank` (or `--out`), where `reference = true` finds it.
//!
//! Output: the bank file and one JSON line on stdout with its path, K, layers, size in bytes and
//! fingerprint. Failure modes (exit 2, nothing written): a bad package or config, an unknown
//! camera or region, a folder with no or too few images, an image that cannot be decoded
//! (named), a camera that delivers nothing or too few frames in time, a bank over
//! `--max-bank-mb` (default: the config's `[model] max_bank_mb`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anomalyclip_edge::camera::Frame;
use anomalyclip_edge::config;
use anomalyclip_edge::daemon;
use anomalyclip_edge::engine::{self, Backend, EngineOptions};
use anomalyclip_edge::image_io;
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::reference::{self, WHOLE_FRAME};
use anomalyclip_edge::scorer::Scorer;
use anyhow::{Context, bail};

use crate::cli_calibrate::{Capture, find_camera, find_region, live_frames};

#[derive(clap::Args)]
pub struct ReferenceArgs {
    /// Model package directory (written by engines/export.py); whole-frame mode.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    model: Option<PathBuf>,
    /// The daemon's configuration file: build the bank of --camera's region as the daemon
    /// scores it, into the state directory.
    #[arg(long, short, requires = "camera")]
    config: Option<PathBuf>,
    /// Camera name (with --config).
    #[arg(long, requires = "config")]
    camera: Option<String>,
    /// Region name (with --config; leave out for a camera without regions).
    #[arg(long, requires = "config")]
    region: Option<String>,
    /// Folder of good (defect-free) images; with --config, full frames of the camera.
    #[arg(long, conflicts_with = "frames", required_unless_present = "frames")]
    images: Option<PathBuf>,
    /// Capture this many good frames live from the camera (with --config).
    #[arg(long, requires = "config")]
    frames: Option<usize>,
    /// Least time between two captured frames, in milliseconds (with --frames).
    #[arg(long, alias = "min-interval-ms", default_value_t = 200)]
    interval_ms: u64,
    /// Give up a live capture after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Bank file to write (required without --config; with it, default
    /// <state_dir>/reference/<camera>/<region or _frame>.bank).
    #[arg(long, required_unless_present = "config")]
    out: Option<PathBuf>,
    /// Use the first K images (by file name) instead of all.
    #[arg(long)]
    k: Option<usize>,
    /// Refuse a bank larger than this many MiB (default: [model] max_bank_mb of --config, else
    /// 256).
    #[arg(long)]
    max_bank_mb: Option<u64>,
    /// Inference backend (whole-frame mode; with --config, the config's engine).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// CPU threads for inference (0 = all cores; whole-frame mode).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the install paths).
    #[arg(long)]
    ort_library: Option<PathBuf>,
}

/// Image files directly in `dir`, sorted by name.
pub fn list_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("--images {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("--images {}", dir.display()))?
            .path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if path.is_file() && matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "bmp")) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The images of `--images`, the first `--k` of them when given.
fn select_images(dir: &Path, k: Option<usize>) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = list_images(dir)?;
    if let Some(k) = k {
        if files.len() < k {
            bail!(
                "--images {}: {} images (png/jpg/jpeg/bmp), --k asks for {k}",
                dir.display(),
                files.len()
            );
        }
        files.truncate(k);
    }
    if files.is_empty() {
        bail!(
            "--images {}: no png/jpg/jpeg/bmp images in the folder",
            dir.display()
        );
    }
    Ok(files)
}

pub fn run(args: ReferenceArgs) -> anyhow::Result<ExitCode> {
    if args.k == Some(0) {
        bail!("--k 0: expected at least 1 reference image");
    }
    if args.frames == Some(0) {
        bail!("--frames 0: expected at least 1 reference frame");
    }
    if let Some(config) = args.config.clone() {
        return run_config(&config, &args);
    }
    let (Some(model), Some(images), Some(out)) = (&args.model, &args.images, &args.out) else {
        bail!("give --model PKG --images DIR --out FILE, or --config FILE --camera NAME");
    };
    engine::check_threads(args.threads).map_err(|m| anyhow::anyhow!("--threads {m}"))?;
    let files = select_images(images, args.k)?;
    let opts = EngineOptions {
        backend: args.backend,
        threads: args.threads,
        ort_library: args.ort_library.clone(),
        ..EngineOptions::default()
    };
    let mut scorer = Scorer::open(model, HashCheck::All, &opts)?;
    let s = scorer.size();
    let n = 3 * s * s;
    let mut input = vec![0.0f32; files.len() * n];
    for (path, out) in files.iter().zip(input.chunks_exact_mut(n)) {
        let img = image_io::load_image(path)?;
        scorer
            .prepare_image(&img, out)
            .with_context(|| path.display().to_string())?;
    }
    let max = args.max_bank_mb.unwrap_or(reference::DEFAULT_MAX_BANK_MB);
    let bank = scorer.build_bank(&input, files.len(), WHOLE_FRAME, max)?;
    bank.save(out)
        .with_context(|| format!("--out {}", out.display()))?;
    let sources = files.iter().map(|p| p.display().to_string()).collect();
    print_summary(&bank, out, sources, None);
    Ok(ExitCode::SUCCESS)
}

fn print_summary(
    bank: &reference::Bank,
    out: &Path,
    sources: Vec<String>,
    unit: Option<serde_json::Value>,
) {
    let mut line = serde_json::json!({
        "bank": out.display().to_string(),
        "k": bank.fingerprint().k,
        "layers": bank.fingerprint().layers,
        "feature_bytes": bank.feature_bytes(),
        "images": sources,
        "fingerprint": bank.fingerprint(),
    });
    if let (Some(obj), Some(serde_json::Value::Object(extra))) = (line.as_object_mut(), unit) {
        obj.extend(extra);
    }
    println!("{line}");
}

/// `--config` mode: the bank of one camera region, from full frames in a folder or live.
fn run_config(path: &Path, args: &ReferenceArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load_config(path)?;
    let camera = args.camera.as_deref().context("--config needs --camera")?;
    let cam = find_camera(&cfg, path, camera)?;
    let region = find_region(cam, args.region.as_deref())?;
    let unit = match &region.name {
        Some(r) => format!("{}/{r}", cam.name),
        None => cam.name.clone(),
    };
    let max = args.max_bank_mb.unwrap_or(cfg.model.max_bank_mb);
    let out = match &args.out {
        Some(o) => o.clone(),
        None => daemon::reference_bank_path(&cfg.state_dir, &cam.name, region.name.as_deref()),
    };
    let mut scorer = Scorer::open(
        &cfg.model.package,
        HashCheck::UpTo(64 << 20),
        &daemon::engine_options(&cfg),
    )?
    .with_head(cfg.engine.head)?;
    let s = scorer.size();
    let plane = 3 * s * s;
    let mut input: Vec<f32> = Vec::new();
    let mut sources = Vec::new();
    match (&args.images, args.frames) {
        (Some(dir), _) => {
            for f in select_images(dir, args.k)? {
                let img = image_io::load_image(&f)?;
                let rgb = img.to_rgb();
                let (w, h) = (img.width() as u32, img.height() as u32);
                let at = input.len();
                input.resize(at + plane, 0.0);
                scorer
                    .prepare_region(&rgb, w, h, w as usize * 3, &region.shape, &mut input[at..])
                    .with_context(|| format!("{}: region {unit}", f.display()))?;
                sources.push(f.display().to_string());
            }
        }
        (None, Some(n)) => {
            let n = args.k.map_or(n, |k| k.min(n));
            let rules = Capture {
                frames: n,
                min_interval: Duration::from_millis(args.interval_ms),
                timeout: Duration::from_secs(args.timeout_s),
            };
            live_frames(s as u32, cam, region, &rules, &mut |f: &Frame| {
                let at = input.len();
                input.resize(at + plane, 0.0);
                scorer
                    .prepare_region(
                        &f.data,
                        f.width,
                        f.height,
                        f.stride,
                        &region.shape,
                        &mut input[at..],
                    )
                    .context("a live frame could not be cropped")?;
                sources.push(format!("camera:{}#{}", cam.name, f.seq));
                Ok(())
            })?;
        }
        (None, None) => bail!("give --images DIR (good frames) or --frames K (live frames)"),
    }
    let key = daemon::reference_region_key(region);
    let k = input.len() / plane;
    let bank = scorer.build_bank(&input, k, &key, max)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        anomalyclip_edge::statedir::create_dir(dir)
            .with_context(|| format!("{unit}: cannot create {}", dir.display()))?;
    }
    bank.save(&out)
        .with_context(|| format!("{unit}: cannot write {}", out.display()))?;
    eprintln!(
        "{unit}: wrote the few-shot bank {} (K = {k}, {} bytes, region key {key}); set reference = {} for it in {} and reload the daemon (systemctl reload / SIGHUP); calibrate again if the region is calibrated",
        out.display(),
        bank.feature_bytes(),
        if args.out.is_some() {
            format!("{:?}", out.display().to_string())
        } else {
            "true".to_owned()
        },
        path.display()
    );
    let extra = serde_json::json!({
        "camera": cam.name,
        "region": region.name,
        "region_key": key,
    });
    print_summary(&bank, &out, sources, Some(extra));
    Ok(ExitCode::SUCCESS)
}
