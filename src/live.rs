//! The live view: an optional local HTTP server (`[http]`) that shows what the model sees —
//! the camera frame with the anomaly map overlaid, a verdict badge, an overview of all cameras
//! and a gallery of recent NG frames.
//!
//! Input: the inference worker's scored frames through [`LiveHub::offer`] (one call per scored
//! frame, with every region of it: rectangle, verdict, score and — when [`LiveHub::wants_maps`]
//! says the frame may be drawn — its map); HTTP requests. Output: HTML pages (served from the binary, no build step), JSON
//! (`/api/cameras`, `/api/stats`), JPEG frames (`/live/<camera>/frame.jpg`, MJPEG at
//! `/live/<camera>/stream.mjpeg`) and the NG gallery files in `<state_dir>/gallery/<camera>/`.
//!
//! Drawing: each region's map is overlaid on its rectangle, map pixels inside ignore polygons
//! are dimmed, named regions are outlined in their verdict's colour, and the border has the
//! frame's worst verdict's colour (NG over UNKNOWN over OK): the verdicts the daemon published.
//! The overview shows the worst region's score and threshold. The region editor and the
//! calibration page ([`editor`], [`capture`]) are served here too.
//!
//! Cost rule: [`LiveHub::offer`] records the score history (a short lock, no allocation once
//! warm) and copies the frame only when a viewer of that camera is connected and the live rate
//! (`http.max_fps`) is due, or when an NG frame is due for the gallery. The copy goes to one
//! encoder thread (`ace-live`) through a latest-per-camera slot: inference never waits for an
//! encode or a viewer, and a frame not yet encoded is replaced by a newer one. Viewers read a
//! `watch` channel (latest JPEG only): a viewer that never reads holds back only its own
//! connection. `/api/stats` counts live encodes (`live_encodes`: zero while nobody watches) and
//! gallery encodes separately.
//!
//! Colour scale: anchored to the camera's pixel threshold, not to each frame's range. A map
//! value `v` sits at `p = v / (2·t)` below the threshold `t` and at `p = 0.5 + (v − t) / (2·(1 −
//! t))` above it; values below `p = 0.25` are not tinted, `p = 0.5` (the threshold) is yellow,
//! `p = 1` red. The same value has the same colour on every frame.
//!
//! Access: loopback binds may run without a token; any other bind needs `http.token_file`
//! ([`config`] refuses the file otherwise). With a token every page and API needs
//! `Authorization: Bearer <token>` or the session cookie set by `POST /login` (the token is
//! compared by SHA-256 digest in constant time; never put in a URL, never logged).
//!
//! Failure modes: a port that cannot be bound is a start-up error of the daemon; an unknown
//! camera, gallery file or path (including traversal attempts) is 404; a missing or wrong
//! token is 401; request bodies over 16 KiB are refused (413); a gallery write that fails is
//! logged (at most every 10 s) and the frame skipped.

pub mod capture;
pub mod config;
pub mod editor;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::camera::Frame;
use crate::payload::is_valid_name;
use crate::region::PixelRect;

pub use config::HttpConfig;

/// The decision shown for a frame or region (the daemon's `crate::decision::Verdict`; ordered
/// OK < UNKNOWN < NG, so the worst region of a frame is the largest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Verdict {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "UNKNOWN")]
    Unknown,
    #[serde(rename = "NG")]
    Ng,
}

impl From<crate::decision::Verdict> for Verdict {
    fn from(v: crate::decision::Verdict) -> Self {
        match v {
            crate::decision::Verdict::Ok => Verdict::Ok,
            crate::decision::Verdict::Unknown => Verdict::Unknown,
            crate::decision::Verdict::Ng => Verdict::Ng,
        }
    }
}

/// Scores kept per camera for the sparkline.
const HISTORY: usize = 120;
/// Longest time a `frame.jpg` request keeps the camera "watched".
const LEASE: Duration = Duration::from_secs(3);
/// Smallest interval between two gallery frames of one camera.
const GALLERY_INTERVAL: Duration = Duration::from_secs(1);
/// JPEG quality of live and gallery frames.
const JPEG_QUALITY: u8 = 80;
/// Sessions kept (oldest dropped first).
const MAX_SESSIONS: usize = 64;
/// Session cookie name.
const COOKIE: &str = "ace_session";
/// Largest region edit accepted (16 regions with many polygon points fit).
const MAX_EDIT_BODY: usize = 64 << 10;

/// One scored frame's summary, for the overview.
#[derive(Debug, Clone, Serialize)]
struct Last {
    seq: u64,
    ts_ms: u64,
    score: f32,
    threshold: f32,
    verdict: Verdict,
    latency_ms: f32,
    map_max: f32,
    /// The full-resolution frame's size (the region editor converts `rect_px` with it).
    width: u32,
    height: u32,
}

struct CamLive {
    history: VecDeque<(u64, f32)>,
    last: Option<Last>,
    /// Open MJPEG streams.
    streams: usize,
    /// A `frame.jpg` viewer keeps the camera watched until then.
    lease_until: Option<Instant>,
    last_live: Option<Instant>,
    last_gallery: Option<Instant>,
    tx: watch::Sender<Option<Bytes>>,
}

impl CamLive {
    fn new() -> Self {
        Self {
            history: VecDeque::with_capacity(HISTORY),
            last: None,
            streams: 0,
            lease_until: None,
            last_live: None,
            last_gallery: None,
            tx: watch::channel(None).0,
        }
    }

    fn watched(&self, now: Instant) -> bool {
        self.streams > 0 || self.lease_until.is_some_and(|t| t > now)
    }
}

/// One region of a scored frame as the live view draws it: the whole frame for a camera
/// without regions.
#[derive(Debug, Clone)]
pub struct LiveRegion {
    /// The region's rectangle in frame pixels; `None` = the whole frame (no outline drawn).
    pub rect: Option<PixelRect>,
    /// Its anomaly map (`map_size`², ignored pixels zero), when the frame may be drawn
    /// ([`LiveHub::wants_maps`]); `None`: the region is outlined but not tinted.
    pub map: Option<Vec<f32>>,
    pub map_size: usize,
    /// The map pixels inside ignore polygons (`map_size`²), shown dimmed.
    pub ignore: Option<Arc<[bool]>>,
    pub pixel_threshold: f32,
    pub verdict: Verdict,
    pub score: f32,
    /// T2 (NaN when the region has no valid threshold).
    pub threshold: f32,
    pub map_max: f32,
}

/// A frame copied for the encoder.
struct Job {
    rgb: Vec<u8>,
    width: usize,
    height: usize,
    stride: usize,
    layers: Vec<LiveRegion>,
    /// The worst verdict of the frame's regions (the border colour).
    verdict: Verdict,
    seq: u64,
    ts_ms: u64,
    live: bool,
    gallery: bool,
}

/// Counters served at `/api/stats`.
#[derive(Debug, Default, Serialize)]
pub struct LiveCounters {
    /// Frames offered by the worker.
    pub offered: u64,
    /// Frames copied for the encoder.
    pub copied: u64,
    /// Live view JPEGs encoded (zero while nobody watches).
    pub live_encodes: u64,
    /// Gallery JPEGs encoded and written.
    pub gallery_encodes: u64,
    /// Viewers now (open streams plus cameras with a recent `frame.jpg` request).
    pub viewers: u64,
}

struct Inner {
    max_fps: u32,
    max_width: u32,
    gallery_count: u32,
    gallery_bytes: u64,
    gallery_dir: PathBuf,
    cams: Mutex<HashMap<String, CamLive>>,
    /// Fast path: open streams plus leases handed out (an upper bound; leases expire).
    watchers: AtomicUsize,
    jobs: Mutex<HashMap<String, Job>>,
    wake: Condvar,
    stop: AtomicBool,
    offered: AtomicU64,
    copied: AtomicU64,
    live_encodes: AtomicU64,
    gallery_encodes: AtomicU64,
    /// Calibration captures started from the page.
    captures: capture::Captures,
}

/// The worker's and the server's shared view of the cameras (cheap to clone).
#[derive(Clone)]
pub struct LiveHub {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LiveHub {
    /// A hub for `cfg`, keeping the gallery under `<state_dir>/gallery`, with its encoder
    /// thread started.
    pub fn new(cfg: &HttpConfig, state_dir: &Path) -> std::io::Result<LiveHub> {
        let inner = Arc::new(Inner {
            max_fps: cfg.max_fps.max(1),
            max_width: cfg.max_width.max(16),
            gallery_count: cfg.gallery_count,
            gallery_bytes: u64::from(cfg.gallery_mib).saturating_mul(1 << 20),
            gallery_dir: state_dir.join("gallery"),
            cams: Mutex::new(HashMap::new()),
            watchers: AtomicUsize::new(0),
            jobs: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            offered: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            live_encodes: AtomicU64::new(0),
            gallery_encodes: AtomicU64::new(0),
            captures: capture::Captures::default(),
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("ace-live".into())
            .spawn(move || encoder(&worker))?;
        Ok(LiveHub { inner })
    }

    /// The calibration captures (the worker feeds them with [`capture::Captures::sample`]).
    pub fn captures(&self) -> &capture::Captures {
        &self.inner.captures
    }

    /// Stops the encoder thread (frames not yet encoded are dropped).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
    }

    /// Counters (see [`LiveCounters`]).
    pub fn counters(&self) -> LiveCounters {
        let i = &self.inner;
        let now = Instant::now();
        let viewers = lock(&i.cams)
            .values()
            .map(|c| c.streams as u64 + u64::from(c.lease_until.is_some_and(|t| t > now)))
            .sum();
        LiveCounters {
            offered: i.offered.load(Ordering::Relaxed),
            copied: i.copied.load(Ordering::Relaxed),
            live_encodes: i.live_encodes.load(Ordering::Relaxed),
            gallery_encodes: i.gallery_encodes.load(Ordering::Relaxed),
            viewers,
        }
    }

    /// Whether the worker should copy the region maps of `camera`'s next frame: `(live, ng)` —
    /// someone watches and the live rate is due; NG frames may go to the gallery. Cheap: two
    /// relaxed loads while nobody watches.
    pub fn wants_maps(&self, camera: &str) -> (bool, bool) {
        let i = &self.inner;
        let gallery = i.gallery_count > 0;
        if i.watchers.load(Ordering::Relaxed) == 0 {
            return (false, gallery);
        }
        let now = Instant::now();
        let period = Duration::from_secs(1) / i.max_fps;
        let live = lock(&i.cams).get(camera).is_some_and(|c| {
            c.watched(now) && c.last_live.is_none_or(|t| now.duration_since(t) >= period)
        });
        (live, gallery)
    }

    /// Called by the inference worker for every scored frame with its regions: records the
    /// worst region's score and, only when someone watches this camera (or the frame is NG and
    /// the gallery is due), hands the frame to the encoder thread. Never blocks on an encode or
    /// a viewer.
    pub fn offer(&self, camera: &str, frame: &Frame, regions: Vec<LiveRegion>) {
        let i = &self.inner;
        i.offered.fetch_add(1, Ordering::Relaxed);
        // The worst region speaks for the frame (NG over UNKNOWN over OK, then the score).
        let Some(worst) = regions
            .iter()
            .max_by(|a, b| a.verdict.cmp(&b.verdict).then(a.score.total_cmp(&b.score)))
        else {
            return;
        };
        let (verdict, score, threshold, map_max) =
            (worst.verdict, worst.score, worst.threshold, worst.map_max);
        let now = Instant::now();
        let (live, gallery) = {
            let mut cams = lock(&i.cams);
            if !cams.contains_key(camera) {
                cams.insert(camera.to_owned(), CamLive::new());
            }
            let Some(c) = cams.get_mut(camera) else {
                return;
            };
            if c.history.len() == HISTORY {
                c.history.pop_front();
            }
            c.history.push_back((frame.capture_unix_ms, score));
            c.last = Some(Last {
                seq: frame.seq,
                ts_ms: frame.capture_unix_ms,
                score,
                threshold,
                verdict,
                latency_ms: frame.captured_at.elapsed().as_secs_f32() * 1e3,
                map_max,
                width: frame.width,
                height: frame.height,
            });
            let period = Duration::from_secs(1) / i.max_fps;
            let live = i.watchers.load(Ordering::Relaxed) > 0
                && c.watched(now)
                && c.last_live.is_none_or(|t| now.duration_since(t) >= period);
            let gallery = i.gallery_count > 0
                && verdict == Verdict::Ng
                && c.last_gallery
                    .is_none_or(|t| now.duration_since(t) >= GALLERY_INTERVAL);
            if live {
                c.last_live = Some(now);
            }
            if gallery {
                c.last_gallery = Some(now);
            }
            (live, gallery)
        };
        if !live && !gallery {
            return;
        }
        i.copied.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            rgb: frame.data.clone(),
            width: frame.width as usize,
            height: frame.height as usize,
            stride: frame.stride,
            layers: regions,
            verdict,
            seq: frame.seq,
            ts_ms: frame.capture_unix_ms,
            live,
            gallery,
        };
        let mut jobs = lock(&i.jobs);
        // A gallery frame not yet written is kept in preference to a newer live-only one.
        match jobs.get_mut(camera) {
            Some(old) if old.gallery && !job.gallery => old.live |= job.live,
            Some(old) => *old = job,
            None => {
                jobs.insert(camera.to_owned(), job);
            }
        }
        drop(jobs);
        i.wake.notify_one();
    }

    fn subscribe(&self, camera: &str) -> watch::Receiver<Option<Bytes>> {
        lock(&self.inner.cams)
            .entry(camera.to_owned())
            .or_insert_with(CamLive::new)
            .tx
            .subscribe()
    }

    fn lease(&self, camera: &str) {
        let mut cams = lock(&self.inner.cams);
        let c = cams.entry(camera.to_owned()).or_insert_with(CamLive::new);
        if c.lease_until.is_none_or(|t| t <= Instant::now()) {
            self.inner.watchers.fetch_add(1, Ordering::Relaxed);
        }
        c.lease_until = Some(Instant::now() + LEASE);
    }

    fn stream_opened(&self, camera: &str) -> StreamGuard {
        lock(&self.inner.cams)
            .entry(camera.to_owned())
            .or_insert_with(CamLive::new)
            .streams += 1;
        self.inner.watchers.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            hub: self.clone(),
            camera: camera.to_owned(),
        }
    }

    /// Forgets expired leases in the fast-path count (called by the server now and then).
    fn expire_leases(&self) {
        let now = Instant::now();
        let mut cams = lock(&self.inner.cams);
        for c in cams.values_mut() {
            if c.lease_until.is_some_and(|t| t <= now) {
                c.lease_until = None;
                self.inner.watchers.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Counts an MJPEG viewer while its response body lives.
struct StreamGuard {
    hub: LiveHub,
    camera: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(c) = lock(&self.hub.inner.cams).get_mut(&self.camera) {
            c.streams = c.streams.saturating_sub(1);
        }
        self.hub.inner.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder thread
// ---------------------------------------------------------------------------------------------

fn encoder(i: &Inner) {
    let mut last_error: Option<Instant> = None;
    loop {
        let batch: Vec<(String, Job)> = {
            let mut jobs = lock(&i.jobs);
            while jobs.is_empty() && !i.stop.load(Ordering::SeqCst) {
                jobs = i
                    .wake
                    .wait_timeout(jobs, Duration::from_millis(500))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if i.stop.load(Ordering::SeqCst) {
                return;
            }
            jobs.drain().collect()
        };
        for (camera, job) in batch {
            let jpeg = match render_jpeg(&job, i.max_width) {
                Ok(j) => Bytes::from(j),
                Err(e) => {
                    warn!(camera = %camera, error = %e, "live view: JPEG encoding failed");
                    continue;
                }
            };
            if job.live {
                i.live_encodes.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = lock(&i.cams).get(&camera) {
                    c.tx.send_replace(Some(jpeg.clone()));
                }
            }
            if job.gallery {
                i.gallery_encodes.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = gallery_write(i, &camera, &job, &jpeg)
                    && last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    warn!(camera = %camera, error = %e, "NG gallery: frame not kept");
                    last_error = Some(Instant::now());
                }
            }
        }
    }
}

/// Position of map value `v` on the colour scale anchored at the pixel threshold `t` (see the
/// module documentation): 0.5 at `t`, 0 at 0, 1 at 1.
pub fn scale_position(v: f32, t: f32) -> f32 {
    let t = t.clamp(1e-6, 1.0 - 1e-6);
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if v < t {
        0.5 * v / t
    } else {
        0.5 + 0.5 * (v - t) / (1.0 - t)
    }
}

/// Overlay colour and opacity at scale position `p`: none below 0.25, blue → yellow up to the
/// threshold (0.5), yellow → red above it.
pub fn overlay_colour(p: f32) -> ([f32; 3], f32) {
    if p < 0.25 {
        ([0.0, 0.0, 0.0], 0.0)
    } else if p < 0.5 {
        let s = (p - 0.25) / 0.25;
        ([255.0 * s, 255.0 * s, 255.0 * (1.0 - s)], 0.15 + 0.3 * s)
    } else {
        let s = ((p - 0.5) / 0.5).min(1.0);
        ([255.0, 255.0 * (1.0 - s), 0.0], 0.5 + 0.15 * s)
    }
}

/// Bilinear sample of the `n × n` map at fractional map coordinates (pixel centres at +0.5).
fn sample(map: &[f32], n: usize, x: f32, y: f32) -> f32 {
    if n == 0 || map.len() < n * n {
        return 0.0;
    }
    let fx = (x - 0.5).clamp(0.0, (n - 1) as f32);
    let fy = (y - 0.5).clamp(0.0, (n - 1) as f32);
    let (x0, y0) = (fx as usize, fy as usize);
    let (x1, y1) = ((x0 + 1).min(n - 1), (y0 + 1).min(n - 1));
    let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
    let top = map[y0 * n + x0] * (1.0 - ax) + map[y0 * n + x1] * ax;
    let bottom = map[y1 * n + x0] * (1.0 - ax) + map[y1 * n + x1] * ax;
    top * (1.0 - ay) + bottom * ay
}

/// The frame (downscaled to at most `max_width`) with the map overlaid and a verdict border.
fn verdict_colour(v: Verdict) -> [u8; 3] {
    match v {
        Verdict::Ok => [40, 170, 60],
        Verdict::Unknown => [230, 170, 0],
        Verdict::Ng => [220, 30, 30],
    }
}

/// The frame scaled to `max_width` with each region's map overlaid on its rectangle (colour
/// scale anchored at the pixel threshold), ignored map pixels dimmed, named regions outlined
/// in their verdict's colour, and a border in the frame's worst verdict's colour.
fn render_rgb(job: &Job, max_width: u32) -> (Vec<u8>, u32, u32) {
    let (w, h) = (job.width.max(1), job.height.max(1));
    let ow = w.min(max_width as usize).max(1);
    let oh = (h * ow / w).max(1);
    let mut out = vec![0u8; ow * oh * 3];
    let border = (ow.min(oh) / 60).max(2);
    let line = (border / 2).max(1);
    let badge = verdict_colour(job.verdict);
    let full = PixelRect {
        x: 0,
        y: 0,
        w: w as u32,
        h: h as u32,
    };
    // Each layer's rectangle in frame and in output pixels.
    let layers: Vec<(&LiveRegion, PixelRect, [usize; 4])> = job
        .layers
        .iter()
        .map(|l| {
            let r = l.rect.unwrap_or(full);
            let o = [
                r.x as usize * ow / w,
                r.y as usize * oh / h,
                ((r.x + r.w) as usize * ow).div_ceil(w),
                ((r.y + r.h) as usize * oh).div_ceil(h),
            ];
            (l, r, o)
        })
        .collect();
    for oy in 0..oh {
        let sy = oy * h / oh;
        for ox in 0..ow {
            let o = (oy * ow + ox) * 3;
            if ox < border || oy < border || ox >= ow - border || oy >= oh - border {
                out[o..o + 3].copy_from_slice(&badge);
                continue;
            }
            let sx = ox * w / ow;
            let s = sy * job.stride + sx * 3;
            let src = job.rgb.get(s..s + 3).unwrap_or(&[0, 0, 0]);
            let mut px = [f32::from(src[0]), f32::from(src[1]), f32::from(src[2])];
            let mut edge = None;
            for (l, r, ob) in &layers {
                let (rx, ry) = (r.x as usize, r.y as usize);
                if sx < rx || sy < ry || sx >= rx + r.w as usize || sy >= ry + r.h as usize {
                    continue;
                }
                if l.rect.is_some()
                    && (ox < ob[0] + line
                        || oy < ob[1] + line
                        || ox + line >= ob[2]
                        || oy + line >= ob[3])
                {
                    edge = Some(verdict_colour(l.verdict));
                    continue;
                }
                let Some(map) = &l.map else { continue };
                let n = l.map_size;
                let mx = ((sx - rx) as f32 + 0.5) * n as f32 / r.w.max(1) as f32;
                let my = ((sy - ry) as f32 + 0.5) * n as f32 / r.h.max(1) as f32;
                let cell = (my as usize).min(n.saturating_sub(1)) * n
                    + (mx as usize).min(n.saturating_sub(1));
                if l.ignore
                    .as_ref()
                    .is_some_and(|ig| ig.get(cell) == Some(&true))
                {
                    for p in &mut px {
                        *p *= 0.45;
                    }
                    continue;
                }
                let v = sample(map, n, mx, my);
                let (c, a) = overlay_colour(scale_position(v, l.pixel_threshold));
                for k in 0..3 {
                    px[k] = px[k] * (1.0 - a) + c[k] * a;
                }
            }
            match edge {
                Some(c) => out[o..o + 3].copy_from_slice(&c),
                None => {
                    for k in 0..3 {
                        out[o + k] = px[k].round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
    }
    (out, ow as u32, oh as u32)
}

fn render_jpeg(job: &Job, max_width: u32) -> Result<Vec<u8>, image::ImageError> {
    let (rgb, w, h) = render_rgb(job, max_width);
    let mut out = Vec::with_capacity(rgb.len() / 8);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY).encode(
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// Gallery file names: `<capture ms>-<seq>.jpg` (digits only, so a request can be checked
/// against the pattern before any path is built).
fn is_gallery_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".jpg") else {
        return false;
    };
    let mut parts = stem.split('-');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The gallery's files of `camera`, newest first: (name, bytes).
fn gallery_list(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let meta = e.metadata().ok()?;
                    (is_gallery_name(&name) && meta.is_file()).then_some((name, meta.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    // Names start with the capture time in ms: sort by the numeric prefix.
    files.sort_by_key(|(n, _)| {
        std::cmp::Reverse(
            n.split('-')
                .next()
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(0),
        )
    });
    files
}

fn gallery_write(i: &Inner, camera: &str, job: &Job, jpeg: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = i.gallery_dir.join(camera);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&dir)?;
    let name = format!("{}-{}.jpg", job.ts_ms, job.seq);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, jpeg)?;
    std::fs::rename(&tmp, dir.join(&name))?;
    // Bound: newest first, keep while both count and bytes fit.
    let mut bytes = 0u64;
    for (k, (n, len)) in gallery_list(&dir).into_iter().enumerate() {
        bytes = bytes.saturating_add(len);
        if k >= i.gallery_count as usize || bytes > i.gallery_bytes {
            let _ = std::fs::remove_file(dir.join(n));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------------------------

/// Camera names and their status words (`online`, `reconnecting`, …), from the daemon.
pub type StatusFn = Arc<dyn Fn() -> Vec<(String, String)> + Send + Sync>;

/// Runs the checks of `check-config` on a candidate config text: its problems, one line each
/// (empty: the text is a good config).
pub type ValidateFn = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// A region's file path from its camera and region name (`""`: the whole frame).
pub type PathFn = Arc<dyn Fn(&str, &str) -> PathBuf + Send + Sync>;

/// What the region editor needs from the daemon.
pub struct EditorSetup {
    /// The config file the daemon runs on (the one the editor rewrites).
    pub config_path: PathBuf,
    /// `http.edit_config`: false serves the editor read-only.
    pub enabled: bool,
    pub validate: ValidateFn,
    /// Asks the daemon to reload its config file (after a write).
    pub reload: Arc<dyn Fn() + Send + Sync>,
    /// Where the file's previous text is kept after each write (in the state directory).
    pub backup: PathBuf,
    /// The state directory (calibrations accepted on the page are written there).
    pub state_dir: PathBuf,
    /// Where a region's few-shot bank goes (`camera`, region `""` for the whole frame).
    pub reference_path: PathFn,
}

struct EditorState {
    setup: EditorSetup,
    /// One edit at a time: read, compare, check, write.
    lock: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct AppState {
    hub: LiveHub,
    editor: Option<Arc<EditorState>>,
    token: Option<[u8; 32]>,
    sessions: Arc<Mutex<VecDeque<[u8; 32]>>>,
    statuses: StatusFn,
    node_id: Arc<str>,
    max_fps: u32,
}

impl AppState {
    fn known(&self, camera: &str) -> bool {
        is_valid_name(camera) && (self.statuses)().iter().any(|(n, _)| n == camera)
    }
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

/// Binds `cfg.listen` and serves the live view until `shutdown` is cancelled. The bind happens
/// before this returns (a taken port is an error at start); serving runs on a spawned task.
pub async fn serve(
    cfg: &HttpConfig,
    hub: LiveHub,
    statuses: StatusFn,
    node_id: &str,
    editor: Option<EditorSetup>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let local = listener.local_addr()?;
    let state = AppState {
        hub: hub.clone(),
        editor: editor.map(|setup| {
            Arc::new(EditorState {
                setup,
                lock: tokio::sync::Mutex::new(()),
            })
        }),
        token: cfg.token.as_ref().map(|t| digest(t.0.as_bytes())),
        sessions: Arc::new(Mutex::new(VecDeque::new())),
        statuses,
        node_id: node_id.into(),
        max_fps: cfg.max_fps,
    };
    let app = router(state);
    info!(
        url = %format!("http://{local}/"),
        token = cfg.token.is_some(),
        "live view listening"
    );
    let expire = {
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => hub.expire_leases(),
                }
            }
        }
    };
    tokio::spawn(expire);
    Ok(tokio::spawn(async move {
        let stop = shutdown.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            warn!(error = %e, "live view server ended");
        }
    }))
}

fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/", get(overview))
        .route("/live/{camera}", get(live_page))
        .route("/live/{camera}/frame.jpg", get(frame_jpg))
        .route("/live/{camera}/stream.mjpeg", get(stream_mjpeg))
        .route("/gallery/{camera}", get(gallery_page))
        .route("/gallery/{camera}/{file}", get(gallery_file))
        .route("/api/cameras", get(api_cameras))
        .route("/api/stats", get(api_stats))
        .route("/regions/{camera}", get(regions_page))
        .route("/calibrate/{camera}", get(calibrate_page))
        .route("/api/calibration/{camera}", get(api_calibration))
        .route("/api/reference/{camera}", get(api_reference))
        .route(
            "/api/calibration/{camera}/{action}",
            axum::routing::post(calibration_action),
        )
        .route(
            "/api/regions/{camera}",
            get(api_regions)
                .post(save_regions)
                .route_layer(DefaultBodyLimit::max(MAX_EDIT_BODY)),
        )
        .route("/static/app.css", get(app_css))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .merge(protected)
        .route("/login", get(login_page).post(login))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(16 << 10))
        .with_state(state)
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

fn cookie_session(headers: &HeaderMap) -> Option<[u8; 32]> {
    for v in headers.get_all(header::COOKIE) {
        for part in v.to_str().ok()?.split(';') {
            if let Some(hexed) = part.trim().strip_prefix(&format!("{COOKIE}=")) {
                let mut out = [0u8; 32];
                if hex::decode_to_slice(hexed, &mut out).is_ok() {
                    return Some(out);
                }
            }
        }
    }
    None
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = state.token else {
        return true;
    };
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        && bool::from(digest(bearer.trim().as_bytes())[..].ct_eq(&token[..]))
    {
        return true;
    }
    if let Some(session) = cookie_session(headers) {
        let d = digest(&session);
        return lock(&state.sessions)
            .iter()
            .fold(false, |found, s| found | bool::from(s[..].ct_eq(&d[..])));
    }
    false
}

async fn require_auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if authorized(&state, req.headers()) {
        return next.run(req).await;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Html(
            "<!doctype html><title>401</title><p>401: a token is needed. \
             <a href=\"/login\">Log in</a>.</p>",
        ),
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn login_page() -> Html<&'static str> {
    Html(include_str!("live/login.html"))
}

/// Decodes `application/x-www-form-urlencoded` percent escapes and `+`.
fn form_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut k = 0;
    while k < b.len() {
        match b[k] {
            b'+' => out.push(b' '),
            b'%' => {
                let hexed = s.get(k + 1..k + 3)?;
                out.push(u8::from_str_radix(hexed, 16).ok()?);
                k += 2;
            }
            c => out.push(c),
        }
        k += 1;
    }
    Some(out)
}

async fn login(State(state): State<AppState>, body: Bytes) -> Response {
    let Some(token) = state.token else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    };
    let given = std::str::from_utf8(&body)
        .ok()
        .and_then(|s| {
            s.split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .and_then(form_decode)
        })
        .unwrap_or_default();
    let given = String::from_utf8_lossy(&given).trim().to_owned();
    if !bool::from(digest(given.as_bytes())[..].ct_eq(&token[..])) {
        warn!("live view: failed login");
        return (
            StatusCode::UNAUTHORIZED,
            Html("<!doctype html><p>401: wrong token. <a href=\"/login\">Try again</a>.</p>"),
        )
            .into_response();
    }
    let mut session = [0u8; 32];
    if random_bytes(&mut session).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no random source\n").into_response();
    }
    {
        let mut s = lock(&state.sessions);
        if s.len() >= MAX_SESSIONS {
            s.pop_front();
        }
        s.push_back(digest(&session));
    }
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        hex::encode(session)
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_owned()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

fn random_bytes(out: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(out)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/static/app.css\"></head>\
         <body>{body}</body></html>",
        html_escape(title)
    ))
}

async fn app_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("live/app.css"),
    )
        .into_response()
}

#[derive(Serialize)]
struct CameraRow {
    name: String,
    status: String,
    last: Option<Last>,
    /// Scores of the last frames, oldest first.
    scores: Vec<f32>,
    /// Frames per second over the history window.
    fps: Option<f32>,
}

fn camera_rows(state: &AppState) -> Vec<CameraRow> {
    let statuses = (state.statuses)();
    let cams = lock(&state.hub.inner.cams);
    statuses
        .into_iter()
        .map(|(name, status)| {
            let c = cams.get(&name);
            let scores = c.map_or_else(Vec::new, |c| c.history.iter().map(|h| h.1).collect());
            let fps = c.and_then(|c| {
                let (first, last) = (c.history.front()?.0, c.history.back()?.0);
                (last > first && c.history.len() > 1)
                    .then(|| (c.history.len() - 1) as f32 * 1000.0 / (last - first) as f32)
            });
            CameraRow {
                last: c.and_then(|c| c.last.clone()),
                name,
                status,
                scores,
                fps,
            }
        })
        .collect()
}

async fn api_cameras(State(state): State<AppState>) -> Response {
    axum::Json(camera_rows(&state)).into_response()
}

async fn api_stats(State(state): State<AppState>) -> Response {
    axum::Json(state.hub.counters()).into_response()
}

async fn overview(State(state): State<AppState>) -> Html<String> {
    let mut rows = String::new();
    for c in camera_rows(&state) {
        let n = html_escape(&c.name);
        rows.push_str(&format!(
            "<tr data-camera=\"{n}\"><td><a href=\"/live/{n}\">{n}</a></td>\
             <td class=\"status\">{}</td><td class=\"verdict\">{}</td><td class=\"score\">{}</td>\
             <td class=\"threshold\">{}</td><td><canvas class=\"spark\" width=\"160\" height=\"28\"></canvas></td>\
             <td class=\"fps\">{}</td><td class=\"latency\">{}</td>\
             <td><a href=\"/gallery/{n}\">NG gallery</a> · <a href=\"/regions/{n}\">regions</a> · <a href=\"/calibrate/{n}\">calibrate</a></td></tr>",
            html_escape(&c.status),
            c.last.as_ref().map_or("–".into(), |l| format!("{:?}", l.verdict).to_uppercase()),
            c.last.as_ref().map_or("–".into(), |l| format!("{:.3}", l.score)),
            c.last.as_ref().map_or("–".into(), |l| format!("{:.3}", l.threshold)),
            c.fps.map_or("–".into(), |f| format!("{f:.1}")),
            c.last.as_ref().map_or("–".into(), |l| format!("{:.0} ms", l.latency_ms)),
        ));
    }
    page(
        "anomalyclip-edge",
        &format!(
            "<h1>anomalyclip-edge <small>{}</small></h1>\
             <table id=\"cameras\"><thead><tr><th>camera</th><th>status</th><th>verdict</th>\
             <th>score</th><th>threshold</th><th>recent scores</th><th>fps</th><th>latency</th><th></th></tr></thead>\
             <tbody>{rows}</tbody></table>\
             <p class=\"note\">Scores of the tiny test model mean nothing; a real model package gives real scores.</p>\
             <script>{}</script>",
            html_escape(&state.node_id),
            include_str!("live/overview.js")
        ),
    )
}

async fn live_page(State(state): State<AppState>, UrlPath(camera): UrlPath<String>) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let n = html_escape(&camera);
    page(
        &format!("{camera} — live"),
        &format!(
            "<h1><a href=\"/\">anomalyclip-edge</a> / {n} <span id=\"badge\" class=\"badge\">…</span></h1>\
             <div class=\"live\"><img id=\"frame\" alt=\"live frame of {n}\" src=\"/live/{n}/frame.jpg\"></div>\
             <div class=\"legend\"><span>0</span><span class=\"bar\"></span><span>pixel threshold</span><span class=\"bar hot\"></span><span>1</span></div>\
             <p id=\"info\"></p>\
             <p><a href=\"/live/{n}/stream.mjpeg\">MJPEG stream</a> · <a href=\"/gallery/{n}\">NG gallery</a> · <a href=\"/regions/{n}\">regions</a> · <a href=\"/calibrate/{n}\">calibrate</a></p>\
             <script>const CAMERA = {}; const FPS = {};\n{}</script>",
            serde_json::to_string(&camera).unwrap_or_default(),
            state.max_fps,
            include_str!("live/live.js")
        ),
    )
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Region editor (the file side is `editor`)

async fn regions_page(State(state): State<AppState>, UrlPath(camera): UrlPath<String>) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let n = html_escape(&camera);
    page(
        &format!("{camera} — regions"),
        &format!(
            "<h1><a href=\"/\">anomalyclip-edge</a> / <a href=\"/live/{n}\">{n}</a> / regions</h1>\
             <div class=\"editor\"><div class=\"canvas\" id=\"canvas\">\
             <img id=\"frame\" alt=\"frame of {n}\" draggable=\"false\">\
             <svg id=\"overlay\" viewBox=\"0 0 1 1\" preserveAspectRatio=\"none\"></svg></div>\
             <div class=\"side\"><p class=\"note\">Drag on the frame to draw a region; drag a region to move it, \
             its corner to resize it. Ignore polygons: select a region, then <em>Add ignore polygon</em> and click \
             the points.</p>\
             <ul id=\"list\"></ul>\
             <div id=\"selected\" hidden><label>name <input id=\"name\" maxlength=\"64\"></label>\
             <button id=\"poly\">Add ignore polygon</button> <button id=\"polydone\" hidden>Finish polygon</button> \
             <button id=\"clearpoly\">Clear ignore polygons</button> <button id=\"delete\">Delete region</button></div>\
             <p><button id=\"save\">Save to the config file</button> <button id=\"discard\">Discard changes</button></p>\
             <p id=\"status\" class=\"status\"></p><pre id=\"problems\"></pre>\
             <p class=\"note\">Saving rewrites the config file (comments and other settings stay) after the checks \
             of <code>check-config</code>, then reloads it. Moving or renaming a calibrated region makes it \
             UNKNOWN until it is calibrated again.</p></div></div>\
             <script>const CAMERA = {};\n{}</script>",
            serde_json::to_string(&camera).unwrap_or_default(),
            include_str!("live/regions.js")
        ),
    )
    .into_response()
}

fn json_error(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A browser request from another site (a page elsewhere posting to this loopback server) is
/// refused: `Sec-Fetch-Site` when the browser sends it, else `Origin` against `Host`.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site == "same-origin" || site == "none";
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true; // not a browser (curl, a script): the token rules apply
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    origin
        .to_str()
        .ok()
        .and_then(|o| {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
        })
        .is_some_and(|o| !host.is_empty() && o == host)
}

fn read_config(path: &Path) -> Result<String, String> {
    crate::fsio::read_limited_string(path, crate::fsio::MAX_CONFIG_FILE, "config file")
        .map_err(|e| format!("cannot read {}: {}", path.display(), e.cause()))
}

async fn api_regions(State(state): State<AppState>, UrlPath(camera): UrlPath<String>) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let Some(ed) = state.editor.clone() else {
        return not_found().await;
    };
    let frame = lock(&state.hub.inner.cams)
        .get(&camera)
        .and_then(|c| c.last.as_ref().map(|l| (l.width, l.height)));
    let path = ed.setup.config_path.clone();
    let cam = camera.clone();
    let read = tokio::task::spawn_blocking(move || {
        let text = read_config(&path)?;
        let regions = editor::regions_of(&text, &cam).map_err(|e| e.to_string())?;
        Ok::<_, String>((editor::digest_hex(text.as_bytes()), regions))
    })
    .await;
    match read {
        Ok(Ok((base, regions))) => axum::Json(serde_json::json!({
            "camera": camera,
            "config": ed.setup.config_path.display().to_string(),
            "editable": ed.setup.enabled,
            "base": base,
            "frame": frame.map(|(w, h)| serde_json::json!({"width": w, "height": h})),
            "regions": regions,
        }))
        .into_response(),
        Ok(Err(e)) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "error": e }),
        ),
        Err(_) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "error": "internal error" }),
        ),
    }
}

/// How a save ended (the blocking part's answer).
enum Saved {
    Done { base: String, path: PathBuf },
    Changed,
    Refused(String),
    Problems(Vec<String>),
    WriteFailed { error: String, text: String },
}

async fn save_regions(
    State(state): State<AppState>,
    UrlPath(camera): UrlPath<String>,
    headers: HeaderMap,
    body: Result<axum::Json<editor::Edit>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let Some(ed) = state.editor.clone() else {
        return not_found().await;
    };
    if !same_origin(&headers) {
        return json_error(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "cross-site request refused" }),
        );
    }
    if !ed.setup.enabled {
        return json_error(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "editing is off (http.edit_config = false)" }),
        );
    }
    let edit = match body {
        Ok(axum::Json(e)) => e,
        Err(e) => {
            // 415 for a body that is not declared JSON (a form post), 413 for one over the
            // bound, 400 for anything else.
            let status = match e {
                axum::extract::rejection::JsonRejection::MissingJsonContentType(_) => {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE
                }
                _ if e.status() == StatusCode::PAYLOAD_TOO_LARGE => e.status(),
                _ => StatusCode::BAD_REQUEST,
            };
            return json_error(
                status,
                serde_json::json!({ "error": format!("bad request: {}", e.body_text()) }),
            );
        }
    };
    let _one = ed.lock.lock().await;
    let job = {
        let ed = ed.clone();
        let camera = camera.clone();
        tokio::task::spawn_blocking(move || save_blocking(&ed.setup, &camera, &edit))
    };
    let saved = match job.await {
        Ok(s) => s,
        Err(_) => Saved::Refused("internal error".into()),
    };
    match saved {
        Saved::Done { base, path } => {
            info!(camera = %camera, file = %path.display(), "region editor: config file written; reloading");
            (ed.setup.reload)();
            axum::Json(serde_json::json!({ "saved": path.display().to_string(), "base": base }))
                .into_response()
        }
        Saved::Changed => json_error(
            StatusCode::CONFLICT,
            serde_json::json!({ "error": "the config file changed since this page read it: \
                                          discard and edit again" }),
        ),
        Saved::Refused(e) => json_error(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e })),
        Saved::Problems(p) => {
            info!(camera = %camera, problems = p.len(), "region editor: edit refused by the checks");
            json_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({ "error": "the edited config has problems; nothing was written",
                                    "problems": p }),
            )
        }
        Saved::WriteFailed { error, text } => {
            warn!(camera = %camera, error = %error, "region editor: cannot write the config file");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({ "error": error, "text": text }),
            )
        }
    }
}

fn save_blocking(setup: &EditorSetup, camera: &str, edit: &editor::Edit) -> Saved {
    let old = match read_config(&setup.config_path) {
        Ok(t) => t,
        Err(e) => return Saved::Refused(e),
    };
    if editor::digest_hex(old.as_bytes()) != edit.base {
        return Saved::Changed;
    }
    let new = match editor::apply(&old, camera, edit) {
        Ok(t) => t,
        Err(e) => return Saved::Refused(e.to_string()),
    };
    let problems = (setup.validate)(&new);
    if !problems.is_empty() {
        return Saved::Problems(problems);
    }
    if let Some(dir) = setup.backup.parent()
        && let Err(e) = crate::statedir::create_dir(dir)
            .and_then(|()| crate::statedir::replace_file(&setup.backup, old.as_bytes()))
    {
        warn!(file = %setup.backup.display(), error = %e, "region editor: previous config not kept");
    }
    match editor::write_atomic(&setup.config_path, &new) {
        Ok(path) => Saved::Done {
            base: editor::digest_hex(new.as_bytes()),
            path,
        },
        Err(e) => Saved::WriteFailed {
            error: format!(
                "cannot write {}: {e} (nothing changed; the checked file is attached: copy it \
                 over the config file and reload the daemon)",
                setup.config_path.display()
            ),
            text: new,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Calibration from the page (the captures are `capture`)

async fn calibrate_page(
    State(state): State<AppState>,
    UrlPath(camera): UrlPath<String>,
) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let n = html_escape(&camera);
    page(
        &format!("{camera} — calibrate"),
        &format!(
            "<h1><a href=\"/\">anomalyclip-edge</a> / <a href=\"/live/{n}\">{n}</a> / calibrate</h1>\
             <p class=\"note\">Put good parts in front of the camera, then start: the next frames' scores (exactly \
             what the region decides with) are collected, and the thresholds for the false-NG rate you ask for are \
             proposed. Nothing changes until you accept.</p>\
             <form id=\"start\" onsubmit=\"return false\"><label>region <select id=\"region\"></select></label>\
             <label>good frames <input id=\"frames\" type=\"number\" min=\"10\" max=\"100000\" value=\"200\"></label>\
             <label>false-NG rate per frame (T2) <input id=\"rate\" type=\"number\" step=\"any\" value=\"0.01\"></label>\
             <label>least interval, ms <input id=\"interval\" type=\"number\" min=\"0\" max=\"60000\" value=\"200\"></label>\
             <button id=\"go\">Start capture</button></form>\
             <p id=\"progress\" class=\"status\"></p>\
             <div id=\"proposal\" hidden><svg id=\"hist\" viewBox=\"0 0 400 120\" width=\"600\" height=\"180\"></svg>\
             <table id=\"numbers\"></table><ul id=\"notes\"></ul>\
             <p><button id=\"accept\">Accept (write the calibration and reload)</button> \
             <button id=\"discard\">Discard</button></p></div>\
             <p id=\"result\" class=\"status\"></p>\
             <h2>Few-shot reference</h2>\
             <p class=\"note\">Builds the region's few-shot bank from K good frames (the same crops it scores), \
             with the daemon's own encoder: inference waits while the bank is built (K encoder runs). Used by a region \
             with <code>reference = true</code>; a calibrated region needs a new calibration after a new bank.</p>\
             <form id=\"refstart\" onsubmit=\"return false\"><label>good frames (K) <input id=\"refk\" type=\"number\" min=\"1\" max=\"16\" value=\"4\"></label>\
             <label>least interval, ms <input id=\"refinterval\" type=\"number\" min=\"0\" max=\"60000\" value=\"500\"></label>\
             <button id=\"refgo\">Capture reference</button></form>\
             <p id=\"refprogress\" class=\"status\"></p>\
             <p id=\"refdone\" hidden><button id=\"refaccept\">Accept (write the bank and reload)</button> \
             <button id=\"refdiscard\">Discard</button></p>\
             <p id=\"refresult\" class=\"status\"></p>\
             <script>const CAMERA = {};\n{}</script>",
            serde_json::to_string(&camera).unwrap_or_default(),
            include_str!("live/calibrate.js")
        ),
    )
    .into_response()
}

#[derive(serde::Deserialize)]
struct RegionQuery {
    #[serde(default)]
    region: String,
}

async fn api_calibration(
    State(state): State<AppState>,
    UrlPath(camera): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<RegionQuery>,
) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    match state.hub.captures().status(&camera, &q.region) {
        Some(s) => axum::Json(s).into_response(),
        None => axum::Json(serde_json::json!({ "state": "idle" })).into_response(),
    }
}

async fn api_reference(
    State(state): State<AppState>,
    UrlPath(camera): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<RegionQuery>,
) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    match state.hub.captures().reference_status(&camera, &q.region) {
        Some(s) => axum::Json(s).into_response(),
        None => axum::Json(serde_json::json!({ "state": "idle" })).into_response(),
    }
}

/// The answer to a capture start: 202, 409 while one runs for the region, 400 for bad options.
fn start_answer(started: Result<(), String>) -> Response {
    match started {
        Ok(()) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "state": "running" })),
        )
            .into_response(),
        Err(e) if e.contains("already running") => {
            json_error(StatusCode::CONFLICT, serde_json::json!({ "error": e }))
        }
        Err(e) => json_error(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e })),
    }
}

async fn calibration_action(
    State(state): State<AppState>,
    UrlPath((camera, action)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let Some(ed) = state.editor.clone() else {
        return not_found().await;
    };
    if !same_origin(&headers) {
        return json_error(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "cross-site request refused" }),
        );
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            serde_json::json!({ "error": "expected Content-Type: application/json" }),
        );
    }
    let bad = |e: serde_json::Error| {
        json_error(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": format!("bad request: {e}") }),
        )
    };
    let captures = state.hub.captures();
    match action.as_str() {
        "start" => {
            let req: capture::StartRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            let started = captures.start(&camera, &req);
            if started.is_ok() {
                info!(camera = %camera, region = %req.region, frames = req.frames, rate = req.rate, "live view: calibration capture started");
            }
            start_answer(started)
        }
        "reference-start" => {
            let req: capture::ReferenceRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            let started = captures.start_reference(&camera, &req);
            if started.is_ok() {
                info!(camera = %camera, region = %req.region, k = req.frames, "live view: few-shot reference capture started");
            }
            start_answer(started)
        }
        "reference-accept" | "reference-discard" => {
            let q: RegionQuery = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            if action == "reference-discard" {
                let had = captures.discard_reference(&camera, &q.region);
                return axum::Json(serde_json::json!({ "discarded": had })).into_response();
            }
            let Some(bank) = captures.take_reference(&camera, &q.region) else {
                return json_error(
                    StatusCode::CONFLICT,
                    serde_json::json!({ "error": "no built bank for this region" }),
                );
            };
            let path = (ed.setup.reference_path)(&camera, &q.region);
            let target = path.clone();
            let saved = tokio::task::spawn_blocking(move || {
                if let Some(dir) = target.parent() {
                    crate::statedir::create_dir(dir)?;
                }
                bank.save(&target)?;
                Ok::<_, std::io::Error>(crate::reference::identity(&bank.to_bytes()))
            })
            .await;
            match saved {
                Ok(Ok(id)) => {
                    info!(camera = %camera, region = %q.region, file = %path.display(), id = %id, "live view: few-shot bank accepted; reloading");
                    (ed.setup.reload)();
                    axum::Json(serde_json::json!({
                        "id": id, "saved": path.display().to_string(),
                    }))
                    .into_response()
                }
                Ok(Err(e)) => json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": format!("cannot write {}: {e}", path.display()) }),
                ),
                Err(_) => json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": "internal error" }),
                ),
            }
        }
        "accept" | "discard" => {
            let q: RegionQuery = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            if action == "discard" {
                let had = captures.discard(&camera, &q.region);
                return axum::Json(serde_json::json!({ "discarded": had })).into_response();
            }
            let Some(cal) = captures.take(&camera, &q.region) else {
                return json_error(
                    StatusCode::CONFLICT,
                    serde_json::json!({ "error": "no finished capture for this region" }),
                );
            };
            let dir = ed.setup.state_dir.clone();
            let saved = tokio::task::spawn_blocking(move || {
                crate::calibration::save(&dir, &cal).map(|p| (p, cal))
            })
            .await;
            match saved {
                Ok(Ok((path, cal))) => {
                    info!(camera = %camera, region = %q.region, id = %cal.id, t1 = cal.t1, t2 = cal.t2, file = %path.display(), "live view: calibration accepted; reloading");
                    (ed.setup.reload)();
                    axum::Json(serde_json::json!({
                        "id": cal.id, "t1": cal.t1, "t2": cal.t2,
                        "saved": path.display().to_string(),
                    }))
                    .into_response()
                }
                Ok(Err(e)) => json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": e.to_string() }),
                ),
                Err(_) => json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": "internal error" }),
                ),
            }
        }
        _ => not_found().await,
    }
}

fn jpeg_response(jpeg: Bytes) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        jpeg,
    )
        .into_response()
}

async fn frame_jpg(State(state): State<AppState>, UrlPath(camera): UrlPath<String>) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    state.hub.lease(&camera);
    let mut rx = state.hub.subscribe(&camera);
    // A frame encoded within the lease is fresh enough; otherwise wait for the next one.
    let current = rx.borrow_and_update().clone();
    let next = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
    let jpeg = match next {
        Ok(Ok(())) => rx.borrow().clone(),
        _ => current,
    };
    match jpeg {
        Some(j) => jpeg_response(j),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "no frame scored yet\n",
        )
            .into_response(),
    }
}

async fn stream_mjpeg(State(state): State<AppState>, UrlPath(camera): UrlPath<String>) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let guard = state.hub.stream_opened(&camera);
    let rx = state.hub.subscribe(&camera);
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.changed().await.ok()?;
        let jpeg = rx.borrow_and_update().clone()?;
        let mut part = Vec::with_capacity(jpeg.len() + 96);
        part.extend_from_slice(
            format!(
                "--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                jpeg.len()
            )
            .as_bytes(),
        );
        part.extend_from_slice(&jpeg);
        part.extend_from_slice(b"\r\n");
        Some((Ok::<Bytes, Infallible>(Bytes::from(part)), (rx, guard)))
    });
    (
        [
            (
                header::CONTENT_TYPE,
                "multipart/x-mixed-replace; boundary=frame",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn gallery_page(State(state): State<AppState>, UrlPath(camera): UrlPath<String>) -> Response {
    if !state.known(&camera) {
        return not_found().await;
    }
    let n = html_escape(&camera);
    let files = gallery_list(&state.hub.inner.gallery_dir.join(&camera));
    let mut items = String::new();
    for (f, len) in &files {
        items.push_str(&format!(
            "<figure><a href=\"/gallery/{n}/{f}\" download><img src=\"/gallery/{n}/{f}\" alt=\"{f}\"></a>\
             <figcaption>{f} · {} KiB</figcaption></figure>",
            len.div_ceil(1024)
        ));
    }
    if files.is_empty() {
        items.push_str("<p>No NG frames kept yet.</p>");
    }
    page(
        &format!("{camera} — NG gallery"),
        &format!(
            "<h1><a href=\"/\">anomalyclip-edge</a> / <a href=\"/live/{n}\">{n}</a> / NG gallery</h1>\
             <div class=\"gallery\">{items}</div>"
        ),
    )
    .into_response()
}

async fn gallery_file(
    State(state): State<AppState>,
    UrlPath((camera, file)): UrlPath<(String, String)>,
) -> Response {
    if !state.known(&camera) || !is_gallery_name(&file) {
        return not_found().await;
    }
    let path = state.hub.inner.gallery_dir.join(&camera).join(&file);
    let read = tokio::task::spawn_blocking(move || {
        crate::fsio::read_limited(&path, 64 << 20, "gallery file")
    })
    .await;
    match read {
        Ok(Ok(bytes)) => {
            let mut r = jpeg_response(Bytes::from(bytes));
            if let Ok(v) =
                HeaderValue::from_str(&format!("attachment; filename=\"{camera}-{file}\""))
            {
                r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            r
        }
        _ => not_found().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(rect: [u32; 4], value: f32, verdict: Verdict) -> LiveRegion {
        LiveRegion {
            rect: Some(PixelRect {
                x: rect[0],
                y: rect[1],
                w: rect[2],
                h: rect[3],
            }),
            map: Some(vec![value; 4 * 4]),
            map_size: 4,
            ignore: None,
            pixel_threshold: 0.5,
            verdict,
            score: value,
            threshold: 0.5,
            map_max: value,
        }
    }

    #[test]
    fn regions_are_drawn_on_their_rectangles_with_outlines_ignore_dimming_and_the_worst_border() {
        let (w, h) = (120usize, 120usize);
        let mut a = layer([10, 10, 40, 100], 0.0, Verdict::Ok);
        let mut b = layer([60, 10, 40, 100], 1.0, Verdict::Ng);
        // The top-left map cell of region a is ignored; a has no map tint (zeros).
        let mut ignore = vec![false; 16];
        ignore[0] = true;
        a.ignore = Some(ignore.into());
        b.ignore = None;
        let job = Job {
            rgb: vec![128; w * h * 3],
            width: w,
            height: h,
            stride: w * 3,
            layers: vec![a, b],
            verdict: Verdict::Ng,
            seq: 0,
            ts_ms: 0,
            live: true,
            gallery: false,
        };
        let (out, ow, oh) = render_rgb(&job, 640);
        assert_eq!((ow, oh), (120, 120));
        let px = |x: usize, y: usize| {
            let o = (y * 120 + x) * 3;
            [out[o], out[o + 1], out[o + 2]]
        };
        assert_eq!(
            px(0, 0),
            verdict_colour(Verdict::Ng),
            "border: the worst verdict"
        );
        assert_eq!(
            px(10, 60),
            verdict_colour(Verdict::Ok),
            "region a's outline"
        );
        assert_eq!(
            px(60, 60),
            verdict_colour(Verdict::Ng),
            "region b's outline"
        );
        assert_eq!(px(30, 80), [128, 128, 128], "inside a, map 0: not tinted");
        assert_eq!(
            px(55, 60),
            [128, 128, 128],
            "between the regions: the frame"
        );
        let red = px(80, 60);
        assert!(
            red[0] > 200 && red[1] < 100,
            "inside b, map 1: red, got {red:?}"
        );
        // a's first map cell covers frame x 10..20, y 10..35: dimmed.
        assert_eq!(px(15, 20), [58, 58, 58], "ignored map cell dimmed");
    }

    #[test]
    fn the_colour_scale_puts_the_pixel_threshold_at_its_middle_whatever_the_frame() {
        for t in [0.1f32, 0.5, 0.9] {
            assert!((scale_position(t, t) - 0.5).abs() < 1e-6);
            assert!(scale_position(0.0, t).abs() < 1e-6);
            assert!((scale_position(1.0, t) - 1.0).abs() < 1e-6);
        }
        // Monotonic in the value.
        let mut last = -1.0;
        for k in 0..=100 {
            let p = scale_position(k as f32 / 100.0, 0.3);
            assert!(p >= last, "{k}: {p} < {last}");
            last = p;
        }
        // NaN is drawn as nothing, not as the hottest colour.
        assert_eq!(overlay_colour(scale_position(f32::NAN, 0.5)).1, 0.0);
    }

    #[test]
    fn gallery_names_are_digits_only_and_reject_traversal() {
        assert!(is_gallery_name("1700000000000-42.jpg"));
        for bad in [
            "../x.jpg",
            "1-2.jpg/..",
            "..",
            "1-2-3.jpg",
            "a-1.jpg",
            "1-.jpg",
            "1-2.png",
            "%2e%2e",
        ] {
            assert!(!is_gallery_name(bad), "{bad}");
        }
    }

    #[test]
    fn form_decoding_handles_escapes_and_refuses_truncated_ones() {
        assert_eq!(form_decode("a%2Bb+c").as_deref(), Some(&b"a+b c"[..]));
        assert_eq!(form_decode("abc%2"), None);
    }
}
