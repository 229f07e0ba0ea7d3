//! The camera stage's configuration: `[[camera]]` as written and resolved ([`CameraConfig`],
//! [`MaskConfig`]), its defaults, and **the one check of a camera source** ([`check_source`]),
//! which both the config resolution and the camera's own planner ([`super::pipeline`]) call, so
//! the two cannot disagree about what a camera accepts.
//!
//! Input: the raw `[[camera]]` tables (keys optional, `deny_unknown_fields`). Output: one
//! [`CameraConfig`] per table, or problems at each key's line: a name that is not a topic level
//! or is used twice, a source that is missing, doubled or rejected by [`check_source`]
//! (scheme, host, `/dev/videoN`, absolute `file://` path, empty pipeline), a `file://` that does
//! not exist, ranges. At [`FsChecks::Full`] (`check-config`) every source is also built with
//! GStreamer exactly as the camera builds it (elements created, none started), so an unknown
//! element, an unlinkable description or a missing plugin is refused with GStreamer's message.
//!
//! [`FsChecks::Full`]: crate::config::FsChecks::Full

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::pipeline::{self, redact_uri};
use super::{CameraError, CameraSettings, Source};
use crate::alarm::{self, DebounceConfig};
use crate::config::problems::{Ctx, S, in_range, name_problem, unit_interval};
use crate::decision::Statistic;
use crate::payload::{MAX_NAME_LEN, MaskKind, is_valid_name};
use crate::region::{RegionShape, Units};

/// Topic levels a region can not be named: the camera's own topics live beside its regions'.
pub const RESERVED_REGION_NAMES: [&str; 10] = [
    "status",
    "result",
    "alarm",
    "mask",
    "calibration",
    "inspect",
    "inspection",
    "ready",
    "stats",
    "info",
];

/// Most regions per camera (each is one more image through the engine per frame).
pub const MAX_REGIONS: usize = 16;
/// Most points of one ignore polygon, and most polygons per region.
pub const MAX_POLYGON_POINTS: usize = 256;
pub const MAX_POLYGONS: usize = 32;

/// How a region decides: the statistic and its thresholds (hand-set or calibrated).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionConfig {
    /// `None`: the camera's implicit whole-frame region (topics without a region level).
    pub name: Option<String>,
    pub shape: RegionShape,
    pub statistic: Statistic,
    /// Hand-set T2 (NG at or above): the region's `threshold`, else the camera's.
    pub threshold: f32,
    /// Hand-set T1 (UNKNOWN at or above), if any.
    pub t1: Option<f32>,
    /// Decide with the calibration file of this region (see `calibrate`); a missing or
    /// mismatching one makes every frame UNKNOWN. Excludes a hand-set `threshold`/`t1`.
    pub calibrated: bool,
    /// The few-shot reference bank this region is scored with (`reference = true` or
    /// `reference = "path"`), `None` for zero-shot.
    pub reference: Option<ReferenceConfig>,
}

/// Where a region's few-shot bank is (`reference = true`: the state directory; a string: that
/// file), and where the key is written (for problems found later, e.g. by `check-config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceConfig {
    pub source: ReferenceSource,
    /// 1-based line of the `reference` key.
    pub line: usize,
    /// TOML path of the key (`camera[0].region[1].reference`).
    pub path: String,
}

/// `reference = true` (the bank `anomalyclip-edge reference --config` writes into the state
/// directory) or `reference = "file"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceSource {
    StateDir,
    File(std::path::PathBuf),
}

/// `reference` as written: a flag or a path.
#[derive(Debug)]
pub(crate) enum RawReference {
    Flag(bool),
    Path(String),
}

impl<'de> Deserialize<'de> for RawReference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawReference;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "true (the bank in the state directory), false, or a bank file path string",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawReference, E> {
                Ok(RawReference::Flag(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawReference, E> {
                Ok(RawReference::Path(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Resolves a `reference` key at `path` (`false` is the same as leaving it out).
fn resolve_reference(
    ctx: &mut Ctx<'_>,
    v: &S<RawReference>,
    path: String,
) -> Option<ReferenceConfig> {
    let v = v.as_ref()?;
    let source = match v.get_ref() {
        RawReference::Flag(false) => return None,
        RawReference::Flag(true) => ReferenceSource::StateDir,
        RawReference::Path(p) if p.trim().is_empty() => {
            ctx.at(
                v,
                path,
                "an empty path: set reference = true (the bank in the state directory) or reference = \"<bank file>\"",
            );
            return None;
        }
        RawReference::Path(p) => ReferenceSource::File(p.into()),
    };
    Some(ReferenceConfig {
        source,
        line: ctx.line_of(v.span().start),
        path,
    })
}

impl RegionConfig {
    /// The region's name as a topic level (`None` for the implicit region).
    pub fn level(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// `[camera.mask]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskConfig {
    /// Publish masks at all.
    pub enabled: bool,
    /// Edge of the square mask in pixels.
    pub size: u32,
    pub kind: MaskKind,
    /// Only for frames whose score is over the threshold.
    pub only_on_anomaly: bool,
    /// Least time between two masks of this camera.
    pub min_interval: Duration,
}

impl Default for MaskConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            size: default_mask_size(),
            kind: default_mask_kind(),
            only_on_anomaly: true,
            min_interval: Duration::from_millis(default_mask_min_interval_ms()),
        }
    }
}

/// One `[[camera]]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    /// `[A-Za-z0-9_-]{1,64}`, unique: the MQTT topic level.
    pub name: String,
    /// Where the frames come from (accepted by [`check_source`]).
    pub source: Source,
    /// Inference rate cap in frames per second; `None` = every frame the engine can take.
    pub max_fps: Option<f64>,
    /// Image score threshold in [0, 1].
    pub threshold: f32,
    /// Pixel threshold in [0, 1] for `area` and binary masks: a pixel counts when
    /// `value >= pixel_threshold`.
    pub pixel_threshold: f32,
    pub alarm: DebounceConfig,
    pub mask: MaskConfig,
    pub retry: RetryConfig,
    /// The regions scored on each frame: the `[[camera.region]]` tables in order, or one
    /// implicit whole-frame region (name `None`) carrying the camera's own `statistic`,
    /// `threshold`, `t1` and `calibration`. Never empty.
    pub regions: Vec<RegionConfig>,
    /// `mode`: stream a result per frame, or score only frames that answer a trigger request.
    pub mode: CameraMode,
}

/// `[camera] mode`: how a camera's frames are scored and published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraMode {
    /// Every frame is scored and published on `result` (and `alarm`, `mask`); trigger requests
    /// are answered too.
    #[default]
    Continuous,
    /// Only frames that answer a pending trigger request on `<prefix>/<camera>/inspect` are
    /// scored; the answer goes to `<prefix>/<camera>/inspection`, nothing to `result`/`alarm`/`mask`.
    Triggered,
}

/// `[camera.retry]`: the camera's reconnect backoff, doubling from `initial` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Delay before the first retry (`initial_ms`, 100 ms to 10 min, default 1 s).
    pub initial: Duration,
    /// Upper bound of the delay (`max_ms`, `initial_ms` to 10 min, default 30 s).
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial: super::DEFAULT_BACKOFF_INITIAL,
            max: super::DEFAULT_BACKOFF_MAX,
        }
    }
}

impl CameraConfig {
    /// The camera stage's settings for this camera, frames scaled in GStreamer to
    /// `size × size` (the model's input size).
    pub fn settings(&self, size: u32) -> CameraSettings {
        let mut s = CameraSettings::new(self.name.clone(), self.source.clone());
        s.max_fps = self.max_fps.filter(|f| *f > 0.0).map(|f| f as f32);
        s.backoff_initial = self.retry.initial;
        s.backoff_max = self.retry.max;
        // Regions are cropped from the full-resolution frame; without them GStreamer scales.
        s.scale = (!self.has_named_regions()).then_some((size, size));
        s
    }

    /// Whether the camera has `[[camera.region]]` tables (else one implicit whole-frame region).
    pub fn has_named_regions(&self) -> bool {
        self.regions.iter().any(|r| r.name.is_some())
    }
}

// Defaults, one function each (referenced from `config/example.toml`).

/// `[camera] max_fps` default (0 = no cap).
pub const fn default_max_fps() -> f64 {
    0.0
}
/// `[camera] threshold` default.
pub const fn default_threshold() -> f64 {
    0.5
}
/// `[camera] pixel_threshold` default.
pub const fn default_pixel_threshold() -> f64 {
    0.5
}
/// `[camera.mask] size` default.
pub const fn default_mask_size() -> u32 {
    128
}
/// `[camera.mask] kind` default.
pub const fn default_mask_kind() -> MaskKind {
    MaskKind::GrayMap
}
/// `[camera.mask] min_interval_ms` default.
pub const fn default_mask_min_interval_ms() -> u64 {
    1000
}

// ---------------------------------------------------------------------------------------------
// The source check
// ---------------------------------------------------------------------------------------------

/// What kind of URI a camera source is; decides the pipeline the camera builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UriKind {
    /// `rtsp://` and its variants (`rtsps`, `rtspt`, `rtspu`, `rtsph`, `rtspsu`, …).
    Rtsp,
    /// `file:///abs/path` or `file://localhost/abs/path`.
    File,
    /// `http://` or `https://` (MJPEG).
    Http,
    /// `/dev/videoN`.
    V4l2,
}

/// A source that passed [`check_source`], trimmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checked<'a> {
    Uri(UriKind, &'a str),
    Pipeline(&'a str),
}

/// Why a camera source cannot work. URIs in messages have their credentials redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("unsupported scheme {scheme:?} (expected rtsp, file, http, https or /dev/video*)")]
    Scheme {
        /// The scheme as written.
        scheme: String,
        /// The whole URI, redacted.
        uri: String,
    },
    #[error("{0:?} is not a URI (expected rtsp, file, http, https or /dev/video*)")]
    NotUri(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("invalid V4L2 device {0:?} (expected /dev/videoN)")]
    Device(String),
    #[error("{0:?}: a file URI needs an absolute path (file:///path/to/video)")]
    RelativeFile(String),
    #[error("the pipeline description is empty")]
    EmptyPipeline,
}

/// The lowercase scheme of `uri` (`rtsp` for `RTSP://h/x`), if it has one.
fn scheme(uri: &str) -> Option<(String, &str)> {
    let (scheme, rest) = uri.split_once("://")?;
    let valid = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then(|| (scheme.to_ascii_lowercase(), rest))
}

/// The one check of a camera source, without GStreamer: the URI's scheme, host, device number
/// or absolute file path; a pipeline description that is not empty. What a pipeline
/// description contains is GStreamer's to judge (see [`build_source`]): with an element named
/// `sink` (an appsink) it is used as is, otherwise the camera appends its standard tail.
pub(crate) fn check_source(source: &Source) -> Result<Checked<'_>, SourceError> {
    let uri = match source {
        Source::Pipeline(description) => {
            let description = description.trim();
            return if description.is_empty() {
                Err(SourceError::EmptyPipeline)
            } else {
                Ok(Checked::Pipeline(description))
            };
        }
        Source::Uri(uri) => uri.trim(),
    };
    if let Some(n) = uri.strip_prefix("/dev/video") {
        return if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Checked::Uri(UriKind::V4l2, uri))
        } else {
            Err(SourceError::Device(uri.to_owned()))
        };
    }
    let Some((scheme, rest)) = scheme(uri) else {
        return Err(SourceError::NotUri(redact_uri(uri)));
    };
    let has_host = || {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        !host.is_empty()
    };
    let kind = match scheme.as_str() {
        "rtsp" | "rtspu" | "rtspt" | "rtsph" | "rtsps" | "rtspsu" | "rtspst" | "rtspsh" => {
            UriKind::Rtsp
        }
        "http" | "https" => UriKind::Http,
        "file" => {
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if path.starts_with('/') && path.len() > 1 {
                return Ok(Checked::Uri(UriKind::File, uri));
            }
            return Err(SourceError::RelativeFile(redact_uri(uri)));
        }
        _ => {
            return Err(SourceError::Scheme {
                scheme: uri[..scheme.len()].to_owned(),
                uri: redact_uri(uri),
            });
        }
    };
    if !has_host() {
        return Err(SourceError::NoHost(redact_uri(uri)));
    }
    Ok(Checked::Uri(kind, uri))
}

impl From<SourceError> for CameraError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Scheme { uri, .. } | SourceError::NotUri(uri) => {
                CameraError::UnsupportedUri(uri)
            }
            SourceError::EmptyPipeline => CameraError::Parse(e.to_string()),
            other => CameraError::Source(other),
        }
    }
}

/// Builds the camera's pipeline with GStreamer exactly as the camera does at each attempt
/// (plan, parse, find the appsink, set the source property) and drops it: elements are created,
/// none is started, nothing is opened. `check-config` uses it to refuse an unknown element, a
/// description that does not link or a missing plugin.
pub(crate) fn build_source(settings: &CameraSettings) -> Result<(), CameraError> {
    super::init()?;
    let plan = pipeline::plan(settings)?;
    pipeline::build(&plan).map(drop)
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) and resolution
// ---------------------------------------------------------------------------------------------

/// `[[camera]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCamera {
    name: S<String>,
    uri: S<String>,
    pipeline: S<String>,
    max_fps: S<f64>,
    threshold: S<f64>,
    pixel_threshold: S<f64>,
    alarm: Option<RawAlarm>,
    mask: Option<RawMask>,
    retry: Option<RawRetry>,
    statistic: S<String>,
    t1: S<f64>,
    calibration: S<bool>,
    reference: S<RawReference>,
    region: Option<Vec<Spanned<RawRegion>>>,
    mode: Option<CameraMode>,
}

/// `[[camera.region]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: S<String>,
    rect: S<Vec<f64>>,
    rect_px: S<Vec<f64>>,
    ignore: S<Vec<Vec<Vec<f64>>>>,
    statistic: S<String>,
    threshold: S<f64>,
    t1: S<f64>,
    calibration: S<bool>,
    reference: S<RawReference>,
}

/// `[camera.retry]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    initial_ms: S<u64>,
    max_ms: S<u64>,
}

/// `[camera.alarm]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlarm {
    raise_count: S<u32>,
    raise_window: S<u32>,
    clear_count: S<u32>,
    latch: Option<bool>,
}

/// `[camera.mask]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    enabled: Option<bool>,
    size: S<u32>,
    kind: Option<MaskKind>,
    only_on_anomaly: Option<bool>,
    min_interval_ms: S<u64>,
}

/// Edge of the frames built by the `check-config` source check (any size builds the same
/// elements; the daemon uses the model's input size).
const CHECK_SCALE: u32 = 224;

/// Checks a source as the camera will, reporting at `at` (`key`: `uri` or `pipeline`).
fn resolve_source(
    ctx: &mut Ctx<'_>,
    p: &str,
    key: &str,
    at: &Spanned<String>,
    source: Source,
) -> Option<Source> {
    let path = format!("{p}.{key}");
    match check_source(&source) {
        Err(e) => {
            ctx.at(at, path, e.to_string());
            return None;
        }
        Ok(Checked::Uri(UriKind::File, uri)) if ctx.fs() => {
            match gstreamer::glib::filename_from_uri(uri) {
                Ok((file, _)) if file.is_file() => {}
                Ok((file, _)) => {
                    ctx.at(
                        at,
                        &path,
                        format!("file {:?} not found", file.display().to_string()),
                    );
                    return None;
                }
                Err(e) => {
                    ctx.at(at, &path, format!("{:?}: {}", redact_uri(uri), e.message()));
                    return None;
                }
            }
        }
        Ok(_) => {}
    }
    if ctx.full() {
        let mut settings = CameraSettings::new("check", source.clone());
        settings.scale = Some((CHECK_SCALE, CHECK_SCALE));
        if let Err(e) = build_source(&settings) {
            ctx.at(at, path, e.to_string());
            return None;
        }
    }
    Some(source)
}

/// Checks one `[[camera]]` and resolves it; `None` (with problems reported) when something is
/// wrong. `names`: the names seen so far, with their index and line, for duplicates.
pub(crate) fn resolve_camera(
    ctx: &mut Ctx<'_>,
    i: usize,
    cam: &Spanned<RawCamera>,
    names: &mut HashMap<String, (usize, usize)>,
) -> Option<CameraConfig> {
    let p = format!("camera[{i}]");
    let c = cam.get_ref();
    let before = ctx.problems.len();

    let name = match &c.name {
        Some(n) if !is_valid_name(n.get_ref()) => {
            ctx.at(
                n,
                format!("{p}.name"),
                name_problem(n.get_ref(), MAX_NAME_LEN),
            );
            String::new()
        }
        Some(n) => {
            let line = ctx.line_of(n.span().start);
            if let Some((first, first_line)) = names.get(n.get_ref()) {
                let msg = format!(
                    "duplicate camera name {:?} (also camera[{first}] at line {first_line}): names must be unique",
                    n.get_ref()
                );
                ctx.at(n, format!("{p}.name"), msg);
            } else {
                names.insert(n.get_ref().clone(), (i, line));
            }
            n.get_ref().clone()
        }
        None => {
            if !ctx.reported(&format!("{p}.name")) {
                ctx.at(
                    cam,
                    format!("{p}.name"),
                    "missing: set name = \"<camera name>\"",
                );
            }
            String::new()
        }
    };

    let source = match (&c.uri, &c.pipeline) {
        (Some(u), Some(_)) => {
            ctx.at(
                u,
                format!("{p}.uri"),
                "set either uri or pipeline, not both",
            );
            None
        }
        (Some(u), None) => resolve_source(ctx, &p, "uri", u, Source::Uri(u.get_ref().clone())),
        (None, Some(pl)) => resolve_source(
            ctx,
            &p,
            "pipeline",
            pl,
            Source::Pipeline(pl.get_ref().clone()),
        ),
        (None, None) => {
            if !ctx.reported(&format!("{p}.uri")) && !ctx.reported(&format!("{p}.pipeline")) {
                ctx.at(
                    cam,
                    &p,
                    "no source: set uri = \"rtsp://…\" (or file://, http(s)://, /dev/videoN) or pipeline = \"…\"",
                );
            }
            None
        }
    };

    let max_fps = match &c.max_fps {
        Some(v) => {
            let x = *v.get_ref();
            if !x.is_finite() || !(0.0..=1000.0).contains(&x) {
                ctx.at(
                    v,
                    format!("{p}.max_fps"),
                    format!("{x} is out of range (expected 0 to 1000; 0 = no cap)"),
                );
            }
            (x > 0.0).then_some(x)
        }
        None => (default_max_fps() > 0.0).then_some(default_max_fps()),
    };
    let threshold = match &c.threshold {
        Some(v) => {
            unit_interval(ctx, v, &format!("{p}.threshold"));
            *v.get_ref()
        }
        None => default_threshold(),
    };
    let pixel_threshold = match &c.pixel_threshold {
        Some(v) => {
            unit_interval(ctx, v, &format!("{p}.pixel_threshold"));
            *v.get_ref()
        }
        None => default_pixel_threshold(),
    };

    // [camera.alarm]
    let mut alarm = DebounceConfig::default();
    if let Some(a) = &c.alarm {
        if let Some(v) = &a.raise_count
            && in_range(
                ctx,
                v,
                &format!("{p}.alarm.raise_count"),
                1,
                alarm::MAX_WINDOW,
            )
        {
            alarm.raise_count = *v.get_ref();
        }
        if let Some(v) = &a.raise_window
            && in_range(
                ctx,
                v,
                &format!("{p}.alarm.raise_window"),
                1,
                alarm::MAX_WINDOW,
            )
        {
            alarm.raise_window = *v.get_ref();
        }
        if let Some(v) = &a.clear_count
            && in_range(ctx, v, &format!("{p}.alarm.clear_count"), 1, 1_000_000)
        {
            alarm.clear_count = *v.get_ref();
        }
        alarm.latch = a.latch.unwrap_or(false);
        if alarm.raise_count > alarm.raise_window {
            let msg = format!(
                "raise_count ({}) is larger than raise_window ({}): N of the last M frames needs N <= M",
                alarm.raise_count, alarm.raise_window
            );
            match (&a.raise_count, &a.raise_window) {
                (Some(v), _) => ctx.at(v, format!("{p}.alarm.raise_count"), msg),
                (None, Some(v)) => ctx.at(v, format!("{p}.alarm.raise_window"), msg),
                (None, None) => {}
            }
        }
    }

    // [camera.mask]
    let mut mask = MaskConfig::default();
    if let Some(m) = &c.mask {
        mask.enabled = m.enabled.unwrap_or(true);
        if let Some(v) = &m.size {
            in_range(ctx, v, &format!("{p}.mask.size"), 16, 512);
            mask.size = *v.get_ref();
        }
        mask.kind = m.kind.unwrap_or(default_mask_kind());
        mask.only_on_anomaly = m.only_on_anomaly.unwrap_or(true);
        if let Some(v) = &m.min_interval_ms {
            in_range(ctx, v, &format!("{p}.mask.min_interval_ms"), 0, 86_400_000);
            mask.min_interval = Duration::from_millis(*v.get_ref());
        }
    }

    // [camera.retry]
    let mut retry = RetryConfig::default();
    if let Some(r) = &c.retry {
        let (lo, hi) = (
            super::MIN_BACKOFF.as_millis() as u64,
            super::MAX_BACKOFF.as_millis() as u64,
        );
        let mut ok = true;
        for (v, key, out) in [
            (&r.initial_ms, "initial_ms", &mut retry.initial),
            (&r.max_ms, "max_ms", &mut retry.max),
        ] {
            if let Some(v) = v {
                ok &= in_range(ctx, v, &format!("{p}.retry.{key}"), lo, hi);
                *out = Duration::from_millis(*v.get_ref());
            }
        }
        if ok && retry.max < retry.initial {
            let msg = format!(
                "max_ms ({}) is below initial_ms ({})",
                retry.max.as_millis(),
                retry.initial.as_millis()
            );
            match (&r.max_ms, &r.initial_ms) {
                (Some(v), _) => ctx.at(v, format!("{p}.retry.max_ms"), msg),
                (None, Some(v)) => ctx.at(
                    v,
                    format!("{p}.retry.initial_ms"),
                    format!("{msg}; max_ms defaults to {}", retry.max.as_millis()),
                ),
                (None, None) => {}
            }
        }
    }

    // The implicit region's decision keys, also the defaults of named regions.
    let statistic = resolve_statistic(ctx, &c.statistic, &p).unwrap_or_default();
    let t1 = resolve_t1(ctx, &c.t1, &p, &c.threshold, threshold);
    let calibrated = c.calibration.as_ref().is_some_and(|v| *v.get_ref());
    if calibrated && let Some(v) = c.threshold.as_ref() {
        ctx.at(
            v,
            format!("{p}.threshold"),
            "set either threshold (hand-set) or calibration = true, not both",
        );
    }
    let reference = resolve_reference(ctx, &c.reference, format!("{p}.reference"));
    if reference.is_some()
        && c.region.as_ref().is_some_and(|l| !l.is_empty())
        && let Some(v) = &c.reference
    {
        ctx.at(
            v,
            format!("{p}.reference"),
            "the camera's reference is the bank of its whole frame, which is not scored once it has [[camera.region]] tables: set reference on each region instead",
        );
    }
    let mut regions = Vec::new();
    match &c.region {
        None => regions.push(RegionConfig {
            name: None,
            shape: RegionShape::full(),
            statistic,
            threshold: threshold as f32,
            t1,
            calibrated,
            reference,
        }),
        Some(list) if list.is_empty() => ctx.at(
            cam,
            format!("{p}.region"),
            "an empty region list: leave it out for the whole frame, or add [[camera.region]] tables",
        ),
        Some(list) => {
            if list.len() > MAX_REGIONS {
                ctx.at(
                    &list[MAX_REGIONS],
                    format!("{p}.region[{MAX_REGIONS}]"),
                    format!("too many regions ({}; at most {MAX_REGIONS} per camera)", list.len()),
                );
            }
            let mut seen: HashMap<String, usize> = HashMap::new();
            for (j, r) in list.iter().enumerate().take(MAX_REGIONS) {
                let defaults = RegionDefaults {
                    statistic,
                    threshold: c.threshold.as_ref().map(|_| threshold),
                    t1,
                    calibrated: c.calibration.as_ref().map(|v| *v.get_ref()),
                };
                if let Some(rc) = resolve_region(ctx, (&p, j), r, &defaults, &mut seen) {
                    regions.push(rc);
                }
            }
        }
    }

    if ctx.problems.len() != before {
        return None;
    }
    Some(CameraConfig {
        name,
        source: source?,
        max_fps,
        threshold: threshold as f32,
        pixel_threshold: pixel_threshold as f32,
        alarm,
        mask,
        retry,
        regions,
        mode: c.mode.unwrap_or_default(),
    })
}

/// What a named region inherits from its camera.
struct RegionDefaults {
    statistic: Statistic,
    /// The camera's explicit `threshold`, if written.
    threshold: Option<f64>,
    t1: Option<f32>,
    calibrated: Option<bool>,
}

fn resolve_statistic(ctx: &mut Ctx<'_>, v: &S<String>, p: &str) -> Option<Statistic> {
    let v = v.as_ref()?;
    match v.get_ref().parse::<Statistic>() {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.at(v, format!("{p}.statistic"), e);
            None
        }
    }
}

/// `t1` in [0, 1] and at most the threshold it goes with.
fn resolve_t1(
    ctx: &mut Ctx<'_>,
    v: &S<f64>,
    p: &str,
    threshold_at: &S<f64>,
    threshold: f64,
) -> Option<f32> {
    let v = v.as_ref()?;
    if !unit_interval(ctx, v, &format!("{p}.t1")) {
        return None;
    }
    let t1 = *v.get_ref();
    if t1 > threshold {
        let from = if threshold_at.is_some() {
            ""
        } else {
            " (the default)"
        };
        ctx.at(
            v,
            format!("{p}.t1"),
            format!("t1 ({t1}) is above threshold ({threshold}{from}): UNKNOWN starts at t1 <= threshold"),
        );
        return None;
    }
    Some(t1 as f32)
}

fn resolve_region(
    ctx: &mut Ctx<'_>,
    (camera_path, j): (&str, usize),
    r: &Spanned<RawRegion>,
    defaults: &RegionDefaults,
    seen: &mut HashMap<String, usize>,
) -> Option<RegionConfig> {
    let p = &format!("{camera_path}.region[{j}]");
    let raw = r.get_ref();
    let before = ctx.problems.len();
    let name = match &raw.name {
        None => {
            ctx.at(
                r,
                format!("{p}.name"),
                "missing: set name = \"<region name>\"",
            );
            String::new()
        }
        Some(n) => {
            let s = n.get_ref();
            if !is_valid_name(s) {
                ctx.at(n, format!("{p}.name"), name_problem(s, MAX_NAME_LEN));
            } else if RESERVED_REGION_NAMES.contains(&s.as_str()) {
                ctx.at(
                    n,
                    format!("{p}.name"),
                    format!(
                        "{s:?} is a camera topic of its own; choose another region name (reserved: {})",
                        RESERVED_REGION_NAMES.join(", ")
                    ),
                );
            } else if let Some(first) = seen.get(s) {
                ctx.at(
                    n,
                    format!("{p}.name"),
                    format!("duplicate region name {s:?} (also region[{first}] of this camera): names must be unique per camera"),
                );
            } else {
                seen.insert(s.clone(), j);
            }
            s.clone()
        }
    };
    let (units, rect_at) = match (&raw.rect, &raw.rect_px) {
        (Some(a), Some(_)) => {
            ctx.at(
                a,
                format!("{p}.rect"),
                "set either rect (fractions) or rect_px (pixels), not both",
            );
            return None;
        }
        (Some(a), None) => (Units::Fraction, a),
        (None, Some(a)) => (Units::Pixel, a),
        (None, None) => {
            ctx.at(
                r,
                format!("{p}.rect"),
                "missing: set rect = [x, y, width, height] in fractions of the frame, or rect_px = [...] in pixels",
            );
            return None;
        }
    };
    let key = if units == Units::Fraction {
        "rect"
    } else {
        "rect_px"
    };
    let v = rect_at.get_ref();
    let Ok(rect) = <[f64; 4]>::try_from(v.as_slice()) else {
        ctx.at(
            rect_at,
            format!("{p}.{key}"),
            format!("expected 4 numbers [x, y, width, height], got {}", v.len()),
        );
        return None;
    };
    let mut ignore = Vec::new();
    if let Some(ig) = &raw.ignore {
        if ig.get_ref().len() > MAX_POLYGONS {
            ctx.at(
                ig,
                format!("{p}.ignore"),
                format!("too many polygons (at most {MAX_POLYGONS})"),
            );
        }
        for (k, poly) in ig.get_ref().iter().enumerate().take(MAX_POLYGONS) {
            if poly.len() > MAX_POLYGON_POINTS {
                ctx.at(
                    ig,
                    format!("{p}.ignore[{k}]"),
                    format!("too many points (at most {MAX_POLYGON_POINTS})"),
                );
                continue;
            }
            let mut pts = Vec::with_capacity(poly.len());
            for pt in poly {
                match <[f64; 2]>::try_from(pt.as_slice()) {
                    Ok(xy) => pts.push(xy),
                    Err(_) => {
                        ctx.at(
                            ig,
                            format!("{p}.ignore[{k}]"),
                            format!("a point is [x, y], got {} numbers", pt.len()),
                        );
                        break;
                    }
                }
            }
            ignore.push(pts);
        }
    }
    let shape = RegionShape {
        units,
        rect,
        ignore,
    };
    for msg in shape.validate() {
        let at = if msg.starts_with("ignore") {
            raw.ignore.as_ref().map_or(rect_at.span(), |i| i.span())
        } else {
            rect_at.span()
        };
        let (field, text) = msg.split_once(": ").unwrap_or((key, msg.as_str()));
        ctx.push(Some(at), format!("{p}.{field}"), text);
    }
    let statistic = resolve_statistic(ctx, &raw.statistic, p).unwrap_or(defaults.statistic);
    let threshold = match &raw.threshold {
        Some(v) => {
            unit_interval(ctx, v, &format!("{p}.threshold"));
            Some(*v.get_ref())
        }
        None => defaults.threshold,
    };
    let t2 = threshold.unwrap_or(default_threshold());
    let t1 = match &raw.t1 {
        Some(_) => resolve_t1(ctx, &raw.t1, p, &raw.threshold, t2),
        None => defaults.t1.filter(|t| f64::from(*t) <= t2),
    };
    let calibrated = raw
        .calibration
        .as_ref()
        .map(|v| *v.get_ref())
        .or(defaults.calibrated)
        .unwrap_or(false);
    if calibrated && let Some(v) = raw.threshold.as_ref() {
        ctx.at(
            v,
            format!("{p}.threshold"),
            "set either threshold (hand-set) or calibration = true, not both",
        );
    }
    let reference = resolve_reference(ctx, &raw.reference, format!("{p}.reference"));
    if ctx.problems.len() != before {
        return None;
    }
    Some(RegionConfig {
        name: Some(name),
        shape,
        statistic,
        threshold: t2 as f32,
        t1,
        calibrated,
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(uri: &str) -> Result<UriKind, SourceError> {
        match check_source(&Source::Uri(uri.into()))? {
            Checked::Uri(kind, _) => Ok(kind),
            Checked::Pipeline(_) => panic!("{uri} is not a pipeline"),
        }
    }

    #[test]
    fn uri_classification() {
        assert_eq!(check("rtsp://cam/stream"), Ok(UriKind::Rtsp));
        assert_eq!(check("rtsps://cam/stream"), Ok(UriKind::Rtsp));
        assert_eq!(check("RTSPT://u:p@cam:554/s"), Ok(UriKind::Rtsp));
        assert_eq!(check("http://cam:8080/mjpg"), Ok(UriKind::Http));
        assert_eq!(check("HTTPS://cam/mjpg"), Ok(UriKind::Http));
        assert_eq!(check("file:///v.mp4"), Ok(UriKind::File));
        assert_eq!(check("file://localhost/v.mp4"), Ok(UriKind::File));
        assert_eq!(check("/dev/video0"), Ok(UriKind::V4l2));
        assert_eq!(check(" /dev/video12 "), Ok(UriKind::V4l2));
        assert_eq!(
            check("ftp://x/y").map_err(|e| e.to_string()),
            Err(
                "unsupported scheme \"ftp\" (expected rtsp, file, http, https or /dev/video*)"
                    .into()
            )
        );
        assert!(matches!(check("/dev/videoX"), Err(SourceError::Device(_))));
        assert!(matches!(check("rtsp:///x"), Err(SourceError::NoHost(_))));
        assert!(matches!(
            check("file://v.mp4"),
            Err(SourceError::RelativeFile(_))
        ));
        assert!(matches!(check("camera1"), Err(SourceError::NotUri(_))));
        assert!(matches!(check("://x"), Err(SourceError::NotUri(_))));
        assert!(matches!(check(""), Err(SourceError::NotUri(_))));
        // Credentials never reach a message.
        let e = check("rtsp://admin:hunter2@/x").expect_err("no host");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_pipeline_needs_only_to_be_non_empty_without_gstreamer() {
        let check = |d: &str| check_source(&Source::Pipeline(d.into())).map(|_| ());
        // Without an appsink the camera appends its own tail: valid.
        assert_eq!(check("videotestsrc"), Ok(()));
        assert_eq!(check("videotestsrc ! appsink name=sink"), Ok(()));
        assert_eq!(check("  "), Err(SourceError::EmptyPipeline));
    }

    #[test]
    fn source_errors_keep_the_camera_messages() {
        let e: CameraError = check("foo://x").expect_err("bad").into();
        assert!(
            e.to_string().contains("unsupported camera uri 'foo://x'"),
            "{e}"
        );
        let e: CameraError = check("/tmp/a.mp4").expect_err("bad").into();
        assert!(e.to_string().contains("unsupported camera uri"), "{e}");
    }
}
