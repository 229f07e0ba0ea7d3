//! `anomalyclip-edge calibrate`: thresholds for one camera region from good parts.
//!
//! Input: the daemon's config file, a camera (and region) in it, and good parts — either a
//! folder of images (full camera frames; the region's rectangle is cropped from each) or live
//! frames from the configured camera (`--frames N`, at least `--min-interval-ms` apart,
//! near-duplicates skipped). Each sample is scored as the daemon scores the region (same crop,
//! resize, ignore polygons and statistic, and the region's few-shot bank when it has
//! `reference`: the calibration is then of the combined score and records the bank's identity).
//! The live capture ([`live_frames`]) is shared with `reference --config`. Output: a calibration file in the state directory
//! (atomically replaced, the previous ones kept for `--rollback`), a summary on stderr and the
//! calibration as JSON on stdout. The method is in docs/calibration.md.
//!
//! Failure modes, each one line and exit 2 with nothing written: an unknown camera or region, a
//! folder without images or an image that can not be scored, a live camera that does not
//! deliver, reconnects or changes its frame size mid-capture, too few samples for the asked
//! false-alarm rate (the message says how many are needed), `--rollback` without a previous
//! calibration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anomalyclip_edge::calibration::{self, Options};
use anomalyclip_edge::camera::{self, Camera, CameraState, Frame, FrameNotify};
use anomalyclip_edge::config::{self, CameraConfig, Config, RegionConfig};
use anomalyclip_edge::daemon;
use anomalyclip_edge::image_io;
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::scorer::Scorer;
use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// The daemon's configuration file (model, engine, state directory, cameras).
    #[arg(long, short)]
    config: PathBuf,
    /// Camera name.
    #[arg(long)]
    camera: String,
    /// Region name (leave out for a camera without regions).
    #[arg(long)]
    region: Option<String>,
    /// A folder of good-part images (full frames of this camera).
    #[arg(long, conflicts_with_all = ["frames", "rollback"])]
    images: Option<PathBuf>,
    /// Capture this many good frames live from the camera.
    #[arg(long, conflicts_with = "rollback")]
    frames: Option<usize>,
    /// Least time between two captured frames, in milliseconds.
    #[arg(long, default_value_t = 200)]
    min_interval_ms: u64,
    /// Give up a live capture after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Target false-NG rate per frame for T2 (e.g. 0.001 = one good frame in 1000 judged NG).
    #[arg(long, default_value_t = 0.01)]
    rate: f64,
    /// Rate for T1, the start of UNKNOWN (default: 10 × --rate, at most 0.5).
    #[arg(long)]
    unknown_rate: Option<f64>,
    /// Restore the previous calibration of this region.
    #[arg(long)]
    rollback: bool,
    /// Compute and print, write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Mean absolute difference (0–255) below which a live frame counts as a near-duplicate of the
/// last one taken (compared on a 16 × 16 grey thumbnail of the region).
const NEAR_DUPLICATE: f64 = 0.5;

/// The camera named `name` in `cfg` (loaded from `path`).
pub(crate) fn find_camera<'a>(
    cfg: &'a Config,
    path: &Path,
    name: &str,
) -> anyhow::Result<&'a CameraConfig> {
    cfg.cameras
        .iter()
        .find(|c| c.name == name)
        .with_context(|| {
            format!(
                "{}: no camera {name:?} (cameras: {})",
                path.display(),
                names(cfg.cameras.iter().map(|c| c.name.as_str()))
            )
        })
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load_config(&args.config)?;
    let cam = find_camera(&cfg, &args.config, &args.camera)?;
    let region = find_region(cam, args.region.as_deref())?;
    let region_name = region.name.clone().unwrap_or_default();
    let unit = match &region.name {
        Some(r) => format!("{}/{r}", cam.name),
        None => cam.name.clone(),
    };
    if args.rollback {
        let cal = calibration::rollback(&cfg.state_dir, &cam.name, &region_name)?;
        eprintln!(
            "{unit}: restored calibration {} (T1 {}, T2 {}); reload the daemon (systemctl reload / SIGHUP) to apply it",
            cal.id, cal.t1, cal.t2
        );
        println!("{}", serde_json::to_string(&cal)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut opts = Options::new(args.rate);
    if let Some(u) = args.unknown_rate {
        opts.unknown_rate = u;
    }
    opts.debounce = Some((cam.alarm.raise_count, cam.alarm.raise_window));
    opts.validate()?;

    let mut scorer = Scorer::open(
        &cfg.model.package,
        HashCheck::UpTo(64 << 20),
        &daemon::engine_options(&cfg),
    )?
    .with_head(cfg.engine.head)?;
    if scorer.package().manifest.tiny {
        tracing::warn!(
            package = %cfg.model.package.display(),
            "the model package holds random weights (a test model): a calibration of it is meaningless for real detection"
        );
    }
    let validity = daemon::validity(&cfg, &scorer);
    let mut bank_id = String::new();
    if let Some(loaded) = daemon::load_reference(
        &cfg.state_dir,
        &cam.name,
        region,
        &validity.bank,
        validity.max_bank_mb,
    ) {
        let l = loaded.map_err(|why| anyhow::anyhow!("{unit}: reference: {why}"))?;
        eprintln!(
            "{unit}: scoring with the few-shot bank {} ({}, K = {}): the calibration is of the combined score",
            l.path.display(),
            l.id,
            l.reference.bank().fingerprint().k
        );
        bank_id = l.id;
        scorer.set_reference(Some(l.reference));
    }
    let fingerprint = daemon::calibration_fingerprint(&validity, region, &bank_id);
    let (values, source) = match (&args.images, args.frames) {
        (Some(dir), _) => (
            from_folder(&mut scorer, cam, region, dir)?,
            format!("folder:{}", dir.display()),
        ),
        (None, Some(n)) => (
            live(&mut scorer, &cfg, cam, region, n, &args)?,
            "camera".to_owned(),
        ),
        (None, None) => bail!("give --images DIR (good-part images) or --frames N (live frames)"),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let cal = calibration::calibrate(
        &values,
        &opts,
        fingerprint,
        &cam.name,
        &region_name,
        &source,
        now,
    )
    .with_context(|| format!("{unit}: {} samples", values.len()))?;
    eprintln!(
        "{unit}: {} good samples of {} ({}): T2 (NG) = {:.4} for a false-NG rate of {} per frame, T1 (UNKNOWN) = {:.4}; \
         the sample supports rates down to {:.2e} per frame (with N good frames the largest is exceeded by a new good frame with probability 1/(N+1))",
        cal.stats.n,
        region.statistic,
        source,
        cal.t2,
        cal.target_rate,
        cal.t1,
        cal.min_supported_rate,
    );
    if let Some(r) = cal.alarm_rate {
        eprintln!(
            "{unit}: under the {}-of-{} alarm debounce that is {r:.2e} false alarms per frame for independent frames (video frames are correlated: expect more; see docs/calibration.md)",
            cam.alarm.raise_count, cam.alarm.raise_window
        );
    }
    for n in &cal.notes {
        eprintln!("{unit}: note: {n}");
    }
    if !region.calibrated {
        eprintln!(
            "{unit}: note: this region decides with a hand-set threshold; set calibration = true for it in {} to use this calibration",
            args.config.display()
        );
    }
    if args.dry_run {
        eprintln!("{unit}: --dry-run: nothing written");
    } else {
        let path = calibration::save(&cfg.state_dir, &cal)?;
        eprintln!(
            "{unit}: wrote {} (id {}); reload the daemon (systemctl reload / SIGHUP) to apply it",
            path.display(),
            cal.id
        );
    }
    println!("{}", serde_json::to_string(&cal)?);
    Ok(ExitCode::SUCCESS)
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

pub(crate) fn find_region<'a>(
    cam: &'a CameraConfig,
    name: Option<&str>,
) -> anyhow::Result<&'a RegionConfig> {
    let found = cam.regions.iter().find(|r| r.name.as_deref() == name);
    found.with_context(|| match name {
        Some(n) => format!(
            "camera {:?} has no region {n:?} (regions: {})",
            cam.name,
            names(cam.regions.iter().filter_map(|r| r.name.as_deref()))
        ),
        None => format!(
            "camera {:?} has regions ({}): give --region NAME",
            cam.name,
            names(cam.regions.iter().filter_map(|r| r.name.as_deref()))
        ),
    })
}

/// The region's statistic on every image of `dir` (sorted by name).
fn from_folder(
    scorer: &mut Scorer,
    cam: &CameraConfig,
    region: &RegionConfig,
    dir: &Path,
) -> anyhow::Result<Vec<f32>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the folder", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                matches!(
                    x.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "bmp"
                )
            })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no images (expected .png, .jpg, .jpeg or .bmp files of good parts)",
            dir.display()
        );
    }
    let mut values = Vec::with_capacity(files.len());
    for f in &files {
        let img = image_io::load_image(f)?;
        let rgb = img.to_rgb();
        let (w, h) = (img.width() as u32, img.height() as u32);
        let s = scorer
            .score_region(
                &rgb,
                w,
                h,
                w as usize * 3,
                &region.shape,
                cam.pixel_threshold,
            )
            .with_context(|| format!("{}: cannot be scored", f.display()))?;
        values.push(region.statistic.value(s.score, s.map_max));
    }
    Ok(values)
}

/// The region's statistic on `n` live frames of the camera.
fn live(
    scorer: &mut Scorer,
    cfg: &Config,
    cam: &CameraConfig,
    region: &RegionConfig,
    n: usize,
    args: &CalibrateArgs,
) -> anyhow::Result<Vec<f32>> {
    let _ = cfg;
    let rules = Capture {
        frames: n,
        min_interval: Duration::from_millis(args.min_interval_ms),
        timeout: Duration::from_secs(args.timeout_s),
    };
    let mut values = Vec::with_capacity(n);
    let size = scorer.size() as u32;
    live_frames(size, cam, region, &rules, &mut |f: &Frame| {
        let s = scorer
            .score_region(
                &f.data,
                f.width,
                f.height,
                f.stride,
                &region.shape,
                cam.pixel_threshold,
            )
            .context("a live frame could not be scored")?;
        values.push(region.statistic.value(s.score, s.map_max));
        Ok(())
    })?;
    Ok(values)
}

/// How live frames are taken: how many, at least how far apart, and the overall time limit.
pub(crate) struct Capture {
    pub(crate) frames: usize,
    pub(crate) min_interval: Duration,
    pub(crate) timeout: Duration,
}

/// Starts the camera as the daemon does for `region` (full-resolution frames for a named
/// region, frames scaled to the model's `size` for the implicit one) and hands `take`
/// `rules.frames` frames at least `rules.min_interval` apart whose region is not a
/// near-duplicate of the last one taken. Refused (one line): no frame within 30 s, fewer frames
/// than asked within `rules.timeout`, a camera that goes offline or changes its frame size
/// mid-capture, an error of `take`.
pub(crate) fn live_frames(
    size: u32,
    cam: &CameraConfig,
    region: &RegionConfig,
    rules: &Capture,
    take: &mut dyn FnMut(&Frame) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    camera::init()?;
    let notify = FrameNotify::new();
    let events: Arc<Mutex<Vec<CameraState>>> = Arc::default();
    let cb: camera::StatusCallback = {
        let events = events.clone();
        Arc::new(move |ev: &camera::StatusEvent| {
            events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(ev.status.clone());
        })
    };
    // Full-resolution frames, as the daemon takes them for regions (for the implicit region
    // the daemon scales in GStreamer; cropping the whole frame and resizing is the same image).
    let mut settings = cam.settings(size);
    if region.name.is_some() {
        settings.scale = None;
    }
    let camera = Camera::spawn(0, settings, notify.clone(), cb)?;
    let res = capture(&camera, &notify, &events, cam, region, rules, take);
    if let Err(e) = camera.stop() {
        tracing::warn!(error = %e, "camera did not stop cleanly");
    }
    res
}

fn capture(
    camera: &Camera,
    notify: &FrameNotify,
    events: &Mutex<Vec<CameraState>>,
    cam: &CameraConfig,
    region: &RegionConfig,
    rules: &Capture,
    take: &mut dyn FnMut(&Frame) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let n = rules.frames;
    let started = Instant::now();
    let deadline = started + rules.timeout;
    let min_interval = rules.min_interval;
    let slots = [camera.slot().clone()];
    let mut taken = 0usize;
    let mut last: Option<(Instant, Vec<u8>)> = None;
    let mut geometry: Option<(u32, u32)> = None;
    let (mut duplicates, mut was_online) = (0usize, false);
    let first_frame_by = started + rules.timeout.min(Duration::from_secs(30));
    while taken < n {
        {
            let ev = events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for s in ev.iter() {
                match s {
                    CameraState::Online => was_online = true,
                    CameraState::Starting => {}
                    other if was_online => bail!(
                        "camera {:?} went {other} after {taken} of {n} frames: the capture stops (a reconnect may change what the camera sees); run the command again",
                        cam.name,
                    ),
                    _ => {}
                }
            }
        }
        events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let now = Instant::now();
        if taken == 0 && geometry.is_none() && now >= first_frame_by {
            bail!(
                "camera {:?} delivered no frame in {} s: is it online? (status: {})",
                cam.name,
                first_frame_by.duration_since(started).as_secs(),
                camera.status()
            );
        }
        if now >= deadline {
            bail!(
                "camera {:?}: only {taken} of {n} frames in {} s (--timeout-s)",
                cam.name,
                rules.timeout.as_secs()
            );
        }
        let frames = notify.take_any(&slots, Duration::from_millis(200));
        let Some(f) = frames.into_iter().next() else {
            continue;
        };
        match geometry {
            None => geometry = Some((f.width, f.height)),
            Some(g) if g != (f.width, f.height) => bail!(
                "camera {:?} changed its frame size from {}x{} to {}x{} after {taken} of {n} frames: the capture stops; run the command again",
                cam.name,
                g.0,
                g.1,
                f.width,
                f.height,
            ),
            Some(_) => {}
        }
        if last
            .as_ref()
            .is_some_and(|(t, _)| t.elapsed() < min_interval)
        {
            continue;
        }
        let thumb = thumbnail(&f.data, f.width, f.height, f.stride, region)?;
        if let Some((_, prev)) = &last
            && mean_abs_diff(prev, &thumb) < NEAR_DUPLICATE
        {
            duplicates += 1;
            continue;
        }
        take(&f)?;
        taken += 1;
        last = Some((Instant::now(), thumb));
        if taken.is_multiple_of(10) || taken == n {
            eprintln!("captured {taken}/{n} (near-duplicates skipped: {duplicates})");
        }
    }
    Ok(())
}

/// A 16 × 16 grey thumbnail of the region's crop (nearest pixel), for near-duplicate checks.
fn thumbnail(
    data: &[u8],
    width: u32,
    height: u32,
    stride: usize,
    region: &RegionConfig,
) -> anyhow::Result<Vec<u8>> {
    let r = region.shape.pixel_rect(width, height)?;
    let mut out = Vec::with_capacity(256);
    for ty in 0..16u32 {
        for tx in 0..16u32 {
            let x = (r.x + (tx * 2 + 1) * r.w / 32) as usize;
            let y = (r.y + (ty * 2 + 1) * r.h / 32) as usize;
            let i = y * stride + x * 3;
            let px = data.get(i..i + 3).context("frame shorter than its size")?;
            out.push(((u16::from(px[0]) + u16::from(px[1]) + u16::from(px[2])) / 3) as u8);
        }
    }
    Ok(out)
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    sum as f64 / a.len().max(1) as f64
}
