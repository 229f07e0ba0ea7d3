//! The daemon's TOML configuration: parsing, validation and the resolved [`Config`].
//!
//! Input: one TOML file (documented field by field in `config/example.toml`, see
//! [`example_config`]). Output: a validated [`Config`] whose parts feed the stages
//! ([`MqttConfig`] → `mqtt`, [`DebounceConfig`] → `alarm`, [`CameraConfig`] → cameras,
//! [`EngineConfig`] → inference).
//!
//! Failure modes: every problem in the file is reported at once, each as a [`Problem`] with the
//! file, line, TOML path and a message (`config.toml:14: camera[1].uri: unsupported scheme "ftp"
//! (expected rtsp, file, http, https or /dev/video*)`): syntax errors (all that the parser can
//! recover from), unknown keys, wrong types, then semantic checks (ranges, names, sources, files
//! that must be readable). Nothing panics on bad input.
//!
//! How "every problem at once" works with serde: the document is parsed once into a span-carrying
//! tree (`toml::de::DeTable`); the raw structs (`deny_unknown_fields`, all keys optional) are
//! deserialised from it; each serde error's span is traced back to its key in the tree, reported
//! with that key's path, the key is removed and deserialisation is retried. Required keys and
//! ranges are then checked on the raw structs, whose `toml::Spanned` fields give the lines.
//!
//! Relative paths in the file are relative to the working directory of the process.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::alarm::{self, DebounceConfig};
use crate::mqtt::{MqttConfig, Secret, TlsConfig, WhenFull};
use crate::payload::MaskKind;
use crate::scorer::HeadChoice;

/// `config/example.toml`: every field, documented.
pub fn example_config() -> &'static str {
    include_str!("../config/example.toml")
}

// ---------------------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------------------

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file as given by the caller (e.g. `config.toml`).
    pub file: String,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// TOML path (`camera[1].uri`), empty for syntax errors and whole-file problems.
    pub path: String,
    /// What is wrong, lowercase, naming the fix where there is one.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems of a config file; `Display` prints one line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// In file order (by line; problems without a line first).
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Whether validation may look at the file system (password and TLS files, model package,
/// `file://` sources, the ONNX Runtime library). `check-config` and `run` use
/// [`FsChecks::Enabled`]; tests of the example use [`FsChecks::Disabled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsChecks {
    Enabled,
    Disabled,
}

// ---------------------------------------------------------------------------------------------
// Resolved configuration
// ---------------------------------------------------------------------------------------------

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// This daemon's name: MQTT topic level and default client id part.
    pub node_id: String,
    /// Writable directory for the alarm queue, engine cache and other state.
    pub state_dir: PathBuf,
    /// Period of the `stats` message; `None` when disabled.
    pub stats_interval: Option<Duration>,
    pub model: ModelConfig,
    pub engine: EngineConfig,
    pub mqtt: MqttConfig,
    pub cameras: Vec<CameraConfig>,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// Model package directory (see `engines/PACKAGE.md`).
    pub package: PathBuf,
}

/// Inference backend (`[engine] backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// TensorRT, else CUDA, else CPU: the best one that works on this machine.
    Auto,
    Tensorrt,
    Cuda,
    Cpu,
}

/// `[engine]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub backend: Backend,
    /// CPU intra-op threads; 0 = ONNX Runtime's default (all cores).
    pub threads: u32,
    /// Largest batch formed across cameras.
    pub max_batch: u32,
    /// Longest a frame waits for a batch to fill.
    pub max_wait: Duration,
    /// ONNX Runtime shared library; `None` = `ORT_DYLIB_PATH`, then the default install path.
    pub ort_library: Option<PathBuf>,
    /// TensorRT: build FP16 engines (LayerNorm/softmax stay fp32). Ignored by the CPU backend.
    pub fp16: bool,
    /// Where the anomaly head runs (`auto`: the GPU when one is usable).
    pub head: HeadChoice,
}

/// Where a camera's frames come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraSource {
    /// `rtsp://…`
    Rtsp(String),
    /// `http://…` or `https://…` MJPEG stream.
    Http(String),
    /// `file:///…` video file (the path).
    File(PathBuf),
    /// `/dev/videoN` V4L2 device.
    V4l2(PathBuf),
    /// A raw GStreamer pipeline description that contains `appsink name=sink`.
    Pipeline(String),
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

/// One `[[camera]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    /// `[A-Za-z0-9_-]{1,64}`, unique: the MQTT topic level.
    pub name: String,
    pub source: CameraSource,
    /// Inference rate cap in frames per second; `None` = every frame the engine can take.
    pub max_fps: Option<f64>,
    /// Image score threshold in [0, 1].
    pub threshold: f32,
    /// Pixel threshold in [0, 1] for `area` and binary masks: a pixel counts when
    /// `value >= pixel_threshold`.
    pub pixel_threshold: f32,
    pub alarm: DebounceConfig,
    pub mask: MaskConfig,
}

// Defaults, one function each (referenced from `config/example.toml`).

/// `state_dir` default (systemd `StateDirectory=anomalyclip-edge`).
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/anomalyclip-edge")
}
/// `stats_interval_s` default.
pub const fn default_stats_interval_s() -> u64 {
    10
}
/// `[engine] backend` default.
pub const fn default_backend() -> Backend {
    Backend::Auto
}
/// `[engine] threads` default (0 = ONNX Runtime decides).
pub const fn default_threads() -> u32 {
    0
}
/// `[engine] max_batch` default.
pub const fn default_max_batch() -> u32 {
    4
}
/// `[engine] max_wait_ms` default.
pub const fn default_max_wait_ms() -> u64 {
    10
}
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

/// Longest accepted node id / camera name (a topic level; also a PLC string).
pub const MAX_NAME_LEN: usize = 64;

/// Whether `s` is a valid node id / camera name: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) configuration
// ---------------------------------------------------------------------------------------------

type S<T> = Option<Spanned<T>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_id: S<String>,
    state_dir: S<String>,
    stats_interval_s: S<u64>,
    model: S<RawModel>,
    engine: Option<RawEngine>,
    mqtt: S<RawMqtt>,
    camera: S<Vec<Spanned<RawCamera>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    package: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    backend: Option<Backend>,
    threads: S<u32>,
    max_batch: S<u32>,
    max_wait_ms: S<u64>,
    ort_library: S<String>,
    fp16: Option<bool>,
    head: Option<HeadChoice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    host: S<String>,
    port: S<u16>,
    client_id: S<String>,
    topic_prefix: S<String>,
    keep_alive_s: S<u16>,
    username: S<String>,
    password: S<String>,
    password_file: S<String>,
    result_qos: S<u8>,
    mask_qos: S<u8>,
    reconnect_min_ms: S<u64>,
    reconnect_max_ms: S<u64>,
    queue_max_alarms: S<u64>,
    queue_when_full: Option<WhenFull>,
    tls: S<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: S<String>,
    client_cert_file: S<String>,
    client_key_file: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCamera {
    name: S<String>,
    uri: S<String>,
    pipeline: S<String>,
    max_fps: S<f64>,
    threshold: S<f64>,
    pixel_threshold: S<f64>,
    alarm: Option<RawAlarm>,
    mask: Option<RawMask>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlarm {
    raise_count: S<u32>,
    raise_window: S<u32>,
    clear_count: S<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    enabled: Option<bool>,
    size: S<u32>,
    kind: Option<MaskKind>,
    only_on_anomaly: Option<bool>,
    min_interval_ms: S<u64>,
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Reads, parses and validates the config file at `path` (file system checks included).
pub fn load_config(path: impl AsRef<Path>) -> Result<Config, ConfigErrors> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_config(&text, &origin, FsChecks::Enabled),
        Err(e) => Err(ConfigErrors {
            problems: vec![Problem {
                file: origin,
                line: None,
                path: String::new(),
                message: format!("cannot read config file: {e}"),
            }],
        }),
    }
}

/// What `anomalyclip-edge check-config FILE` prints: every problem (empty when the file is good).
pub fn check(path: impl AsRef<Path>) -> Vec<Problem> {
    match load_config(path) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    }
}

/// Parses and validates config text; `origin` names the file in problems.
pub fn parse_config(text: &str, origin: &str, fs: FsChecks) -> Result<Config, ConfigErrors> {
    let mut ctx = Ctx {
        text,
        origin,
        fs,
        problems: Vec::new(),
    };
    let config = parse_inner(&mut ctx);
    if ctx.problems.is_empty()
        && let Some(config) = config
    {
        return Ok(config);
    }
    let mut problems = ctx.problems;
    // Stable: keeps the order of discovery for problems on the same line.
    problems.sort_by_key(|p| p.line.unwrap_or(0));
    if problems.is_empty() {
        // Unreachable in practice: a missing config always comes with a problem.
        problems.push(Problem {
            file: origin.to_owned(),
            line: None,
            path: String::new(),
            message: "invalid configuration".to_owned(),
        });
    }
    Err(ConfigErrors { problems })
}

// ---------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------

struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
    fs: FsChecks,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn push(
        &mut self,
        span: Option<Range<usize>>,
        path: impl Into<String>,
        msg: impl Into<String>,
    ) {
        let line = span.map(|s| self.line_of(s.start));
        self.problems.push(Problem {
            file: self.origin.to_owned(),
            line,
            path: path.into(),
            message: msg.into(),
        });
    }

    fn at<T>(&mut self, v: &Spanned<T>, path: impl Into<String>, msg: impl Into<String>) {
        self.push(Some(v.span()), path, msg);
    }

    /// Whether a problem was already reported at `path` or below it (so a removed bad key is not
    /// reported a second time as missing).
    fn reported(&self, path: &str) -> bool {
        self.problems.iter().any(|p| {
            p.path == path
                || p.path
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }

    fn fs(&self) -> bool {
        self.fs == FsChecks::Enabled
    }
}

fn parse_inner(ctx: &mut Ctx<'_>) -> Option<Config> {
    let (mut root, syntax) = DeTable::parse_recoverable(ctx.text);
    if !syntax.is_empty() {
        for e in syntax {
            ctx.push(e.span(), "", e.message().trim().to_owned());
        }
        // A document with syntax errors is not checked further: its recovered tree would give
        // misleading follow-up problems.
        return None;
    }
    let raw = deserialize_pruning(ctx, &mut root)?;
    resolve(ctx, raw)
}

/// Deserialises, and on each error reports it at its key, removes the key and retries.
fn deserialize_pruning(ctx: &mut Ctx<'_>, root: &mut Spanned<DeTable<'_>>) -> Option<RawConfig> {
    // Each round removes one key, so the number of keys bounds the rounds; the cap is a guard.
    for _ in 0..10_000 {
        let de = toml::de::Deserializer::from(root.clone());
        match RawConfig::deserialize(de) {
            Ok(raw) => return Some(raw),
            Err(e) => {
                let message = e.message().trim().to_owned();
                let located = e.span().and_then(|span| {
                    let mut best = None;
                    locate(root.get_ref(), &span, "", 0, &mut best);
                    best.map(|b| (span, b))
                });
                match located {
                    Some((span, (_, path, key_span))) => {
                        ctx.push(Some(span), path, message);
                        if !remove_key(root.get_mut(), &key_span) {
                            return None;
                        }
                    }
                    None => {
                        ctx.push(e.span(), "", message);
                        return None;
                    }
                }
            }
        }
    }
    None
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && inner.start < outer.end.max(1)
}

/// Finds the deepest key whose key or value span contains `err`: (depth, path, key span).
fn locate(
    table: &DeTable<'_>,
    err: &Range<usize>,
    prefix: &str,
    depth: usize,
    best: &mut Option<(usize, String, Range<usize>)>,
) {
    for (k, v) in table.iter() {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        if (contains(&k.span(), err) || contains(&v.span(), err))
            && best.as_ref().is_none_or(|(d, _, _)| depth >= *d)
        {
            *best = Some((depth, path.clone(), k.span()));
        }
        match v.get_ref() {
            DeValue::Table(t) => locate(t, err, &path, depth + 1, best),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(t) = item.get_ref() {
                        locate(t, err, &format!("{path}[{i}]"), depth + 1, best);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Removes the key with span `key_span` anywhere in the tree.
fn remove_key(table: &mut DeTable<'_>, key_span: &Range<usize>) -> bool {
    let found = table
        .iter()
        .find(|(k, _)| k.span() == *key_span)
        .map(|(k, _)| k.get_ref().to_string());
    if let Some(name) = found {
        return table.remove(name.as_str()).is_some();
    }
    for (_, v) in table.iter_mut() {
        let removed = match v.get_mut() {
            DeValue::Table(t) => remove_key(t, key_span),
            DeValue::Array(items) => items.iter_mut().any(|item| match item.get_mut() {
                DeValue::Table(t) => remove_key(t, key_span),
                _ => false,
            }),
            _ => false,
        };
        if removed {
            return true;
        }
    }
    false
}

fn name_problem(s: &str) -> String {
    format!(
        "invalid name {s:?}: use 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ - \
         (it becomes an MQTT topic level)"
    )
}

/// Checks a value against an inclusive range, reporting at its span.
fn in_range<T: PartialOrd + fmt::Display + Copy>(
    ctx: &mut Ctx<'_>,
    v: &Spanned<T>,
    path: &str,
    lo: T,
    hi: T,
) -> bool {
    let x = *v.get_ref();
    if x < lo || x > hi {
        ctx.at(
            v,
            path,
            format!("{x} is out of range (expected {lo} to {hi})"),
        );
        false
    } else {
        true
    }
}

fn unit_interval(ctx: &mut Ctx<'_>, v: &Spanned<f64>, path: &str) -> bool {
    let x = *v.get_ref();
    if !x.is_finite() || !(0.0..=1.0).contains(&x) {
        ctx.at(v, path, format!("{x} is outside [0, 1]"));
        false
    } else {
        true
    }
}

fn get<T: Copy>(v: &S<T>, default: T) -> T {
    v.as_ref().map_or(default, |s| *s.get_ref())
}

fn resolve(ctx: &mut Ctx<'_>, raw: RawConfig) -> Option<Config> {
    // node_id
    let node_id = match &raw.node_id {
        Some(v) if is_valid_name(v.get_ref()) => Some(v.get_ref().clone()),
        Some(v) => {
            ctx.at(v, "node_id", name_problem(v.get_ref()));
            None
        }
        None => {
            if !ctx.reported("node_id") {
                ctx.push(
                    None,
                    "node_id",
                    "missing: set node_id = \"<name of this station>\"",
                );
            }
            None
        }
    };

    // state_dir
    let state_dir = match &raw.state_dir {
        Some(v) if v.get_ref().is_empty() => {
            ctx.at(v, "state_dir", "must not be empty");
            None
        }
        Some(v) => {
            let p = PathBuf::from(v.get_ref());
            if ctx.fs() && p.exists() && !p.is_dir() {
                ctx.at(
                    v,
                    "state_dir",
                    format!("{:?} exists and is not a directory", v.get_ref()),
                );
            }
            Some(p)
        }
        None => Some(default_state_dir()),
    };

    // stats_interval_s
    let stats_interval = match &raw.stats_interval_s {
        Some(v) => {
            in_range(ctx, v, "stats_interval_s", 0, 86_400);
            (*v.get_ref() > 0).then(|| Duration::from_secs(*v.get_ref()))
        }
        None => Some(Duration::from_secs(default_stats_interval_s())),
    };

    // [model]
    let model = match &raw.model {
        Some(m) => match &m.get_ref().package {
            Some(p) => {
                let path = PathBuf::from(p.get_ref());
                if ctx.fs() {
                    if !path.is_dir() {
                        ctx.at(
                            p,
                            "model.package",
                            format!("model package directory {:?} not found", p.get_ref()),
                        );
                    } else if !path.join("manifest.toml").is_file() {
                        ctx.at(
                            p,
                            "model.package",
                            format!(
                                "{:?} has no manifest.toml (not a model package)",
                                p.get_ref()
                            ),
                        );
                    }
                }
                Some(ModelConfig { package: path })
            }
            None => {
                if !ctx.reported("model.package") {
                    ctx.at(
                        m,
                        "model.package",
                        "missing: set package = \"<model package directory>\"",
                    );
                }
                None
            }
        },
        None => {
            if !ctx.reported("model") {
                ctx.push(
                    None,
                    "model",
                    "missing [model] table with package = \"<model package directory>\"",
                );
            }
            None
        }
    };

    let engine = resolve_engine(ctx, raw.engine.as_ref());
    let mqtt = match &raw.mqtt {
        Some(m) => resolve_mqtt(ctx, m),
        None => {
            if !ctx.reported("mqtt") {
                ctx.push(
                    None,
                    "mqtt",
                    "missing [mqtt] table (at least host = \"<broker>\")",
                );
            }
            None
        }
    };

    // [[camera]]
    let mut cameras = Vec::new();
    let mut names: HashMap<String, (usize, usize)> = HashMap::new();
    match &raw.camera {
        Some(list) if list.get_ref().is_empty() => {
            ctx.at(
                list,
                "camera",
                "no cameras: add at least one [[camera]] table",
            );
        }
        Some(list) => {
            for (i, cam) in list.get_ref().iter().enumerate() {
                if let Some(c) = resolve_camera(ctx, i, cam, &mut names) {
                    cameras.push(c);
                }
            }
        }
        None => {
            if !ctx.reported("camera") {
                ctx.push(
                    None,
                    "camera",
                    "no cameras: add at least one [[camera]] table",
                );
            }
        }
    }

    let all_cameras = raw.camera.as_ref().map_or(0, |l| l.get_ref().len());
    if cameras.len() != all_cameras || !ctx.problems.is_empty() {
        return None;
    }
    Some(Config {
        node_id: node_id?,
        state_dir: state_dir?,
        stats_interval,
        model: model?,
        engine: engine?,
        mqtt: mqtt?,
        cameras,
    })
}

fn resolve_engine(ctx: &mut Ctx<'_>, raw: Option<&RawEngine>) -> Option<EngineConfig> {
    let Some(e) = raw else {
        return Some(EngineConfig {
            backend: default_backend(),
            threads: default_threads(),
            max_batch: default_max_batch(),
            max_wait: Duration::from_millis(default_max_wait_ms()),
            ort_library: None,
            fp16: true,
            head: HeadChoice::Auto,
        });
    };
    let mut ok = true;
    if let Some(v) = &e.threads {
        ok &= in_range(ctx, v, "engine.threads", 0, 1024);
    }
    if let Some(v) = &e.max_batch {
        ok &= in_range(ctx, v, "engine.max_batch", 1, 64);
    }
    if let Some(v) = &e.max_wait_ms {
        ok &= in_range(ctx, v, "engine.max_wait_ms", 0, 10_000);
    }
    let ort_library = e.ort_library.as_ref().map(|v| {
        if ctx.fs() && !Path::new(v.get_ref()).is_file() {
            ctx.at(
                v,
                "engine.ort_library",
                format!("ONNX Runtime library {:?} not found", v.get_ref()),
            );
        }
        PathBuf::from(v.get_ref())
    });
    ok.then(|| EngineConfig {
        backend: e.backend.unwrap_or(default_backend()),
        threads: get(&e.threads, default_threads()),
        max_batch: get(&e.max_batch, default_max_batch()),
        max_wait: Duration::from_millis(get(&e.max_wait_ms, default_max_wait_ms())),
        ort_library,
        fp16: e.fp16.unwrap_or(true),
        head: e.head.unwrap_or_default(),
    })
}

/// Reads a file that must be readable; reports at `v` otherwise. `None` when unreadable or when
/// file system checks are off.
fn read_file(ctx: &mut Ctx<'_>, v: &Spanned<String>, path: &str, what: &str) -> Option<Vec<u8>> {
    if !ctx.fs() {
        return None;
    }
    match std::fs::read(v.get_ref()) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            ctx.at(
                v,
                path,
                format!("cannot read {what} {:?}: {e}", v.get_ref()),
            );
            None
        }
    }
}

fn pem_check(
    ctx: &mut Ctx<'_>,
    v: &Spanned<String>,
    path: &str,
    bytes: &[u8],
    marker: &str,
    what: &str,
) {
    let text = String::from_utf8_lossy(bytes);
    if !text.contains("-----BEGIN") || !text.contains(marker) {
        ctx.at(
            v,
            path,
            format!("{:?} does not look like a PEM {what}", v.get_ref()),
        );
    }
}

/// Topic prefix rules: no wildcards, no empty levels, no `$` start, at most 256 bytes.
fn topic_prefix_problem(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some("must not be empty".into());
    }
    if p.len() > 256 {
        return Some("longer than 256 bytes".into());
    }
    if p.contains(['+', '#', '\0']) {
        return Some(format!("{p:?} contains an MQTT wildcard (+ or #) or NUL"));
    }
    if p.starts_with('$') {
        return Some(format!("{p:?} starts with $ (reserved for the broker)"));
    }
    if p.split('/').any(str::is_empty) {
        return Some(format!(
            "{p:?} has an empty topic level (leading, trailing or double /)"
        ));
    }
    None
}

fn resolve_mqtt(ctx: &mut Ctx<'_>, m: &Spanned<RawMqtt>) -> Option<MqttConfig> {
    let r = m.get_ref();
    let before = ctx.problems.len();
    let defaults = MqttConfig::default();

    let host = match &r.host {
        Some(h) if h.get_ref().trim().is_empty() => {
            ctx.at(h, "mqtt.host", "must not be empty");
            String::new()
        }
        Some(h) => h.get_ref().clone(),
        None => {
            if !ctx.reported("mqtt.host") {
                ctx.at(
                    m,
                    "mqtt.host",
                    "missing: set host = \"<broker host name or address>\"",
                );
            }
            String::new()
        }
    };
    let port = r
        .port
        .as_ref()
        .map_or(if r.tls.is_some() { 8883 } else { 1883 }, |p| {
            if *p.get_ref() == 0 {
                ctx.at(p, "mqtt.port", "port 0 is not valid");
            }
            *p.get_ref()
        });
    if let Some(c) = &r.client_id {
        let s = c.get_ref();
        if s.is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
            ctx.at(c, "mqtt.client_id", "must be 1 to 128 printable characters");
        }
    }
    if let Some(p) = &r.topic_prefix
        && let Some(msg) = topic_prefix_problem(p.get_ref())
    {
        ctx.at(p, "mqtt.topic_prefix", msg);
    }
    let keep_alive = Duration::from_secs(u64::from(get(&r.keep_alive_s, 30)));

    // Credentials.
    if let Some(u) = &r.username
        && u.get_ref().is_empty()
    {
        ctx.at(
            u,
            "mqtt.username",
            "must not be empty (remove it for anonymous access)",
        );
    }
    let mut password = None;
    match (&r.password, &r.password_file) {
        (Some(p), Some(_)) => {
            ctx.at(
                p,
                "mqtt.password",
                "set either password or password_file, not both",
            );
        }
        (Some(p), None) => password = Some(p.get_ref().clone()),
        (None, Some(f)) => {
            if let Some(bytes) = read_file(ctx, f, "mqtt.password_file", "password file") {
                match String::from_utf8(bytes) {
                    Ok(s) => {
                        let s = s.trim_end_matches(['\n', '\r']).to_owned();
                        if s.is_empty() {
                            ctx.at(
                                f,
                                "mqtt.password_file",
                                format!("password file {:?} is empty", f.get_ref()),
                            );
                        }
                        password = Some(s);
                    }
                    Err(_) => ctx.at(
                        f,
                        "mqtt.password_file",
                        format!("password file {:?} is not UTF-8", f.get_ref()),
                    ),
                }
            }
        }
        (None, None) => {}
    }
    if r.username.is_none()
        && let Some(p) = r.password.as_ref().or(r.password_file.as_ref())
    {
        ctx.at(
            p,
            "mqtt.username",
            "a password needs a username: set username = \"…\"",
        );
    }

    // QoS.
    let qos = |ctx: &mut Ctx<'_>, v: &S<u8>, path: &str| -> rumqttc::QoS {
        match v {
            None => rumqttc::QoS::AtMostOnce,
            Some(q) => match *q.get_ref() {
                0 => rumqttc::QoS::AtMostOnce,
                1 => rumqttc::QoS::AtLeastOnce,
                2 => rumqttc::QoS::ExactlyOnce,
                n => {
                    ctx.at(
                        q,
                        path,
                        format!("QoS {n} does not exist (expected 0, 1 or 2)"),
                    );
                    rumqttc::QoS::AtMostOnce
                }
            },
        }
    };
    let result_qos = qos(ctx, &r.result_qos, "mqtt.result_qos");
    let mask_qos = qos(ctx, &r.mask_qos, "mqtt.mask_qos");

    // Reconnect backoff.
    let rmin = get(
        &r.reconnect_min_ms,
        defaults.reconnect_min.as_millis() as u64,
    );
    let rmax = get(
        &r.reconnect_max_ms,
        defaults.reconnect_max.as_millis() as u64,
    );
    let min_ok = r
        .reconnect_min_ms
        .as_ref()
        .is_none_or(|v| in_range(ctx, v, "mqtt.reconnect_min_ms", 1, 3_600_000));
    let max_ok = r
        .reconnect_max_ms
        .as_ref()
        .is_none_or(|v| in_range(ctx, v, "mqtt.reconnect_max_ms", 1, 3_600_000));
    if min_ok && max_ok && rmax < rmin {
        match (&r.reconnect_max_ms, &r.reconnect_min_ms) {
            (Some(v), _) => ctx.at(
                v,
                "mqtt.reconnect_max_ms",
                format!("{rmax} is below reconnect_min_ms ({rmin})"),
            ),
            (None, Some(v)) => ctx.at(
                v,
                "mqtt.reconnect_min_ms",
                format!("{rmin} is above reconnect_max_ms ({rmax}, the default)"),
            ),
            (None, None) => {}
        }
    }

    let queue_max = get(&r.queue_max_alarms, defaults.queue_max_alarms as u64);
    if let Some(v) = &r.queue_max_alarms {
        in_range(ctx, v, "mqtt.queue_max_alarms", 1, 1_000_000);
    }

    // TLS.
    let tls = r.tls.as_ref().map(|t| {
        let tr = t.get_ref();
        let ca_file = match &tr.ca_file {
            Some(ca) => {
                if let Some(bytes) = read_file(ctx, ca, "mqtt.tls.ca_file", "CA file") {
                    pem_check(
                        ctx,
                        ca,
                        "mqtt.tls.ca_file",
                        &bytes,
                        "CERTIFICATE-----",
                        "certificate",
                    );
                }
                PathBuf::from(ca.get_ref())
            }
            None => {
                if !ctx.reported("mqtt.tls.ca_file") {
                    ctx.at(
                        t,
                        "mqtt.tls.ca_file",
                        "missing: set ca_file = \"<CA certificate PEM>\"",
                    );
                }
                PathBuf::new()
            }
        };
        let cert = tr.client_cert_file.as_ref().map(|c| {
            if let Some(bytes) =
                read_file(ctx, c, "mqtt.tls.client_cert_file", "client certificate")
            {
                pem_check(
                    ctx,
                    c,
                    "mqtt.tls.client_cert_file",
                    &bytes,
                    "CERTIFICATE-----",
                    "certificate",
                );
            }
            PathBuf::from(c.get_ref())
        });
        let key = tr.client_key_file.as_ref().map(|k| {
            if let Some(bytes) = read_file(ctx, k, "mqtt.tls.client_key_file", "client key") {
                pem_check(
                    ctx,
                    k,
                    "mqtt.tls.client_key_file",
                    &bytes,
                    "PRIVATE KEY-----",
                    "private key",
                );
            }
            PathBuf::from(k.get_ref())
        });
        match (&tr.client_cert_file, &tr.client_key_file) {
            (Some(c), None) => ctx.at(
                c,
                "mqtt.tls.client_key_file",
                "client_cert_file needs client_key_file",
            ),
            (None, Some(k)) => ctx.at(
                k,
                "mqtt.tls.client_cert_file",
                "client_key_file needs client_cert_file",
            ),
            _ => {}
        }
        TlsConfig {
            ca_file,
            client_cert_file: cert,
            client_key_file: key,
        }
    });

    if ctx.problems.len() != before {
        return None;
    }
    Some(MqttConfig {
        host,
        port,
        client_id: r.client_id.as_ref().map(|c| c.get_ref().clone()),
        topic_prefix: r.topic_prefix.as_ref().map(|c| c.get_ref().clone()),
        keep_alive,
        username: r.username.as_ref().map(|c| c.get_ref().clone()),
        password: password.map(Secret),
        tls,
        result_qos,
        mask_qos,
        reconnect_min: Duration::from_millis(rmin),
        reconnect_max: Duration::from_millis(rmax),
        queue_max_alarms: queue_max as usize,
        queue_when_full: r.queue_when_full.unwrap_or(defaults.queue_when_full),
    })
}

/// Classifies a camera `uri`, or says what is wrong with it.
fn parse_uri(uri: &str) -> Result<CameraSource, String> {
    const EXPECTED: &str = "(expected rtsp, file, http, https or /dev/video*)";
    if let Some(n) = uri.strip_prefix("/dev/video") {
        return if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            Ok(CameraSource::V4l2(PathBuf::from(uri)))
        } else {
            Err(format!(
                "invalid V4L2 device {uri:?} (expected /dev/videoN)"
            ))
        };
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(format!("{uri:?} is not a URI {EXPECTED}"));
    };
    let host = || {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        !host.is_empty()
    };
    match scheme.to_ascii_lowercase().as_str() {
        "rtsp" if host() => Ok(CameraSource::Rtsp(uri.to_owned())),
        "http" | "https" if host() => Ok(CameraSource::Http(uri.to_owned())),
        "rtsp" | "http" | "https" => Err(format!("{uri:?} has no host")),
        "file" => {
            // file:///abs/path or file://localhost/abs/path
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if path.starts_with('/') && path.len() > 1 {
                Ok(CameraSource::File(PathBuf::from(path)))
            } else {
                Err(format!(
                    "{uri:?}: a file URI needs an absolute path (file:///path/to/video)"
                ))
            }
        }
        _ => Err(format!("unsupported scheme {scheme:?} {EXPECTED}")),
    }
}

/// Splits a gst-launch description into elements (on `!` outside quotes) and checks that one of
/// them is `appsink` with `name=sink`.
fn pipeline_problem(p: &str) -> Option<String> {
    if p.trim().is_empty() {
        return Some("empty pipeline".into());
    }
    let mut elements = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    for c in p.chars() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), _) if c == q => {
                quote = None;
                cur.push(c);
            }
            (None, '!') => elements.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    elements.push(cur);
    let mut saw_appsink = false;
    for el in &elements {
        let mut words = el.split_whitespace();
        if words.next() != Some("appsink") {
            continue;
        }
        saw_appsink = true;
        if words
            .any(|w| w.strip_prefix("name=").map(|v| v.trim_matches(['"', '\''])) == Some("sink"))
        {
            return None;
        }
    }
    Some(if saw_appsink {
        "the pipeline's appsink must be named sink: `appsink name=sink`".into()
    } else {
        "pipeline has no appsink: end it with `! appsink name=sink`".into()
    })
}

fn resolve_camera(
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
            ctx.at(n, format!("{p}.name"), name_problem(n.get_ref()));
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
        (Some(u), None) => match parse_uri(u.get_ref()) {
            Ok(CameraSource::File(path)) => {
                if ctx.fs() && !path.is_file() {
                    ctx.at(
                        u,
                        format!("{p}.uri"),
                        format!("file {:?} not found", path.display().to_string()),
                    );
                }
                Some(CameraSource::File(path))
            }
            Ok(s) => Some(s),
            Err(msg) => {
                ctx.at(u, format!("{p}.uri"), msg);
                None
            }
        },
        (None, Some(pl)) => match pipeline_problem(pl.get_ref()) {
            None => Some(CameraSource::Pipeline(pl.get_ref().clone())),
            Some(msg) => {
                ctx.at(pl, format!("{p}.pipeline"), msg);
                None
            }
        },
        (None, None) => {
            if !ctx.reported(&format!("{p}.uri")) && !ctx.reported(&format!("{p}.pipeline")) {
                ctx.at(
                    cam,
                    &p,
                    "no source: set uri = \"rtsp://…\" (or file://, http(s)://, /dev/videoN) or pipeline = \"… ! appsink name=sink\"",
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
    let mut mask = MaskConfig {
        enabled: true,
        size: default_mask_size(),
        kind: default_mask_kind(),
        only_on_anomaly: true,
        min_interval: Duration::from_millis(default_mask_min_interval_ms()),
    };
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let cfg = parse_config(example_config(), "example.toml", FsChecks::Disabled)
            .unwrap_or_else(|e| panic!("example.toml does not parse:\n{e}"));
        assert!(!cfg.cameras.is_empty());
    }

    #[test]
    fn uri_classification() {
        assert!(matches!(
            parse_uri("rtsp://cam/stream"),
            Ok(CameraSource::Rtsp(_))
        ));
        assert!(matches!(
            parse_uri("http://cam:8080/mjpg"),
            Ok(CameraSource::Http(_))
        ));
        assert!(matches!(
            parse_uri("HTTPS://cam/mjpg"),
            Ok(CameraSource::Http(_))
        ));
        assert!(matches!(
            parse_uri("file:///v.mp4"),
            Ok(CameraSource::File(_))
        ));
        assert!(matches!(
            parse_uri("file://localhost/v.mp4"),
            Ok(CameraSource::File(_))
        ));
        assert!(matches!(
            parse_uri("/dev/video0"),
            Ok(CameraSource::V4l2(_))
        ));
        assert_eq!(
            parse_uri("ftp://x/y"),
            Err(
                "unsupported scheme \"ftp\" (expected rtsp, file, http, https or /dev/video*)"
                    .into()
            )
        );
        assert!(parse_uri("/dev/videoX").is_err());
        assert!(parse_uri("rtsp:///x").is_err());
        assert!(parse_uri("file://v.mp4").is_err());
        assert!(parse_uri("camera1").is_err());
    }

    #[test]
    fn pipeline_checks() {
        assert_eq!(pipeline_problem("videotestsrc ! appsink name=sink"), None);
        assert_eq!(
            pipeline_problem("videotestsrc ! appsink name=\"sink\" sync=false"),
            None
        );
        assert_eq!(
            pipeline_problem("videotestsrc ! appsink sync=false name=sink"),
            None
        );
        assert!(
            pipeline_problem("videotestsrc ! fakesink").is_some_and(|m| m.contains("no appsink"))
        );
        assert!(
            pipeline_problem("videotestsrc ! appsink name=out")
                .is_some_and(|m| m.contains("named sink"))
        );
        assert!(
            pipeline_problem(
                "videotestsrc ! textoverlay text=\"a ! appsink name=sink\" ! fakesink"
            )
            .is_some()
        );
        assert!(pipeline_problem("  ").is_some());
    }

    #[test]
    fn names() {
        assert!(is_valid_name("press-1_A"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("+"));
        assert!(is_valid_name(&"x".repeat(64)));
        assert!(!is_valid_name(&"x".repeat(65)));
    }

    #[test]
    fn topic_prefix_rules() {
        assert_eq!(topic_prefix_problem("plant/line1"), None);
        assert!(topic_prefix_problem("").is_some());
        assert!(topic_prefix_problem("a/+/b").is_some());
        assert!(topic_prefix_problem("a/#").is_some());
        assert!(topic_prefix_problem("/a").is_some());
        assert!(topic_prefix_problem("a/").is_some());
        assert!(topic_prefix_problem("a//b").is_some());
        assert!(topic_prefix_problem("$SYS/x").is_some());
    }
}
