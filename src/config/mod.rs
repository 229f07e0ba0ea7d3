//! The daemon's TOML configuration: the file, its parsing, and the resolved [`Config`].
//!
//! Input: one TOML file (documented field by field in `config/example.toml`, see
//! [`example_config`]). Output: a validated [`Config`] whose parts belong to the stages and are
//! defined beside them: [`MqttConfig`] (`mqtt::config`), [`CameraConfig`] (`camera::config`,
//! with the one source check the camera itself uses), [`EngineConfig`] (`engine::config`),
//! [`DebounceConfig`](crate::alarm::DebounceConfig) (`alarm`). This module owns the top level
//! (`node_id`, `state_dir`, `stats_interval_s`, `[model]`) and the assembly; [`problems`] (a
//! leaf) owns the problem machinery every stage's resolution shares. The config layer imports
//! only those stage config leaves, the name rules ([`crate::payload`]) and the model package
//! loader ([`crate::package`]): never the engine, scorer, head or GPU code, and no stage imports
//! this module back (a unit test checks the `use` lines).
//!
//! Failure modes: every problem in the file is reported at once, each as a [`Problem`] with the
//! file, line, TOML path and a message (`config.toml:14: camera[1].uri: unsupported scheme "ftp"
//! (expected rtsp, file, http, https or /dev/video*)`): syntax errors (all that the parser can
//! recover from), unknown keys, wrong types, then semantic checks (ranges, names, sources, files
//! that must be readable). A problem at a secret key (`mqtt.password`) never shows the value.
//! Nothing panics on bad input.
//!
//! Levels ([`FsChecks`]): `run` and a SIGHUP reload load with [`FsChecks::Enabled`];
//! `check-config` ([`check`]) with [`FsChecks::Full`], which refuses everything `run` refuses at
//! start and more: a state directory the running user cannot write in (created if missing, as
//! `run` would), a model package whose files do not match their hashes (every file is hashed:
//! seconds for a full-size model), a camera source GStreamer cannot build.
//!
//! How "every problem at once" works with serde: the document is parsed once into a span-carrying
//! tree (`toml::de::DeTable`); the raw structs (`deny_unknown_fields`, all keys optional) are
//! deserialised from it; each serde error's span is traced back to its key in the tree, reported
//! with that key's path, the key is removed and deserialisation is retried. Required keys and
//! ranges are then checked on the raw structs, whose `toml::Spanned` fields give the lines.
//!
//! Relative paths in the file are relative to the working directory of the process.

pub(crate) mod problems;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::camera::config::{RawCamera, resolve_camera};
use crate::commands::config::{RawCommands, resolve_commands};
use crate::engine::config::{RawEngine, resolve_engine};
use crate::live::config::{RawHttp, resolve_http};
use crate::metrics::config::{RawMetrics, resolve_metrics};
use crate::mqtt::config::{RawMqtt, SECRET_KEYS, resolve_mqtt};
use crate::package::{HashCheck, ModelPackage};
use crate::sparkplug::config::{RawSparkplug, resolve_sparkplug};
use problems::{Ctx, S, in_range, name_problem};
use trigger::{RawTrigger, resolve_trigger};

pub use crate::camera::config::{
    CameraConfig, CameraMode, MaskConfig, ReferenceConfig, ReferenceSource, RegionConfig,
    RetryConfig, SourceError, default_mask_kind, default_mask_min_interval_ms, default_mask_size,
    default_max_fps, default_pixel_threshold, default_threshold,
};
pub use crate::commands::config::CommandsConfig;
pub use crate::engine::config::{
    Backend, EngineConfig, HeadChoice, default_backend, default_max_batch, default_max_wait_ms,
    default_threads,
};
pub use crate::live::config::HttpConfig;
pub use crate::metrics::config::MetricsConfig;
pub use crate::mqtt::config::{MqttConfig, Secret, TlsConfig, WhenFull};
pub use crate::payload::{MAX_NAME_LEN, is_valid_name};
pub use crate::sparkplug::config::SparkplugConfig;
pub use problems::{ConfigErrors, FsChecks, Problem};
pub use trigger::{MAX_TRIGGER_TIMEOUT_MS, TriggerConfig};

mod trigger;

/// `config/example.toml`: every field, documented.
pub fn example_config() -> &'static str {
    include_str!("../../config/example.toml")
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
    /// `[trigger]`: triggered inspection (defaults when absent).
    pub trigger: TriggerConfig,
    /// `[http]`: the live view server; `None` = nothing listens.
    pub http: Option<HttpConfig>,
    /// `[metrics]`: the Prometheus endpoint; `None` = nothing listens.
    pub metrics: Option<MetricsConfig>,
    /// `[sparkplug]`: the Sparkplug B edge node; `None` = no Sparkplug connection.
    pub sparkplug: Option<SparkplugConfig>,
    /// `[commands]`: commands over MQTT (and Sparkplug DCMD); `None` = off.
    pub commands: Option<CommandsConfig>,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// Model package directory (see `engines/PACKAGE.md`).
    pub package: PathBuf,
    /// Bound on each few-shot reference bank file the daemon loads, in MiB (`max_bank_mb`).
    pub max_bank_mb: u64,
}

// Defaults, one function each (referenced from `config/example.toml`).

/// `state_dir` default (systemd `StateDirectory=anomalyclip-edge`).
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/anomalyclip-edge")
}
/// `[model] max_bank_mb` default (equal to `reference::DEFAULT_MAX_BANK_MB`, checked by a
/// test; the config layer does not import the inference stack).
pub const fn default_max_bank_mb() -> u64 {
    256
}
/// `stats_interval_s` default.
pub const fn default_stats_interval_s() -> u64 {
    10
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) configuration
// ---------------------------------------------------------------------------------------------

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
    trigger: Option<RawTrigger>,
    http: Option<RawHttp>,
    metrics: Option<RawMetrics>,
    sparkplug: S<RawSparkplug>,
    commands: Option<RawCommands>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    package: S<String>,
    max_bank_mb: S<u64>,
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Reads, parses and validates the config file at `path` with the checks `run` makes before it
/// starts ([`FsChecks::Enabled`]).
pub fn load_config(path: impl AsRef<Path>) -> Result<Config, ConfigErrors> {
    load_with(path.as_ref(), FsChecks::Enabled)
}

/// What `anomalyclip-edge check-config FILE` prints: every problem (empty when the file is
/// good), with the checks of [`FsChecks::Full`]: everything `run` would refuse at start, plus a
/// write probe in the state directory, a full hash of the model package (seconds for a big
/// model) and a GStreamer build of every camera source.
pub fn check(path: impl AsRef<Path>) -> Vec<Problem> {
    match check_loaded(path) {
        Ok(_) => Vec::new(),
        Err(e) => e,
    }
}

/// [`check`], returning the resolved config when there is no problem (for the checks of the
/// stages above the config layer, e.g. the few-shot banks, `daemon::check_references`).
pub fn check_loaded(path: impl AsRef<Path>) -> Result<Config, Vec<Problem>> {
    load_with(path.as_ref(), FsChecks::Full).map_err(|e| e.problems)
}

fn load_with(path: &Path, fs: FsChecks) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    match crate::fsio::read_limited_string(path, crate::fsio::MAX_CONFIG_FILE, "config file") {
        Ok(text) => parse_config(&text, &origin, fs),
        Err(e) => Err(ConfigErrors {
            problems: vec![Problem {
                file: origin,
                line: None,
                path: String::new(),
                message: format!("cannot read config file: {}", e.cause()),
            }],
        }),
    }
}

/// Parses and validates config text; `origin` names the file in problems.
pub fn parse_config(text: &str, origin: &str, fs: FsChecks) -> Result<Config, ConfigErrors> {
    let mut ctx = Ctx::new(text, origin, fs);
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

fn parse_inner(ctx: &mut Ctx<'_>) -> Option<Config> {
    let (mut root, syntax) = DeTable::parse_recoverable(ctx.text);
    if !syntax.is_empty() {
        for e in syntax {
            let mut message = e.message().trim().to_owned();
            // toml says "duplicate key" without the key: name it from the span.
            if message.starts_with("duplicate key")
                && let Some(key) = e
                    .span()
                    .and_then(|r| ctx.text.get(r))
                    .map(|k| k.trim().trim_matches(['[', ']', '"', '\'']).trim())
                    .filter(|k| !k.is_empty() && k.len() <= 100)
            {
                message = format!("{message} `{key}`");
            }
            ctx.push(e.span(), "", message);
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
                        let message = if SECRET_KEYS.contains(&path.as_str()) {
                            // serde's message quotes the value ("invalid type: integer `1234`").
                            "must be a string in quotes (the value is not shown: it is a secret)"
                                .to_owned()
                        } else {
                            message
                        };
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

fn resolve(ctx: &mut Ctx<'_>, raw: RawConfig) -> Option<Config> {
    // node_id
    let node_id = match &raw.node_id {
        Some(v) if is_valid_name(v.get_ref()) => Some(v.get_ref().clone()),
        Some(v) => {
            ctx.at(v, "node_id", name_problem(v.get_ref(), MAX_NAME_LEN));
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
                    } else if ctx.full()
                        && let Err(e) = ModelPackage::load(&path, HashCheck::All)
                    {
                        // The loader's own checks, with every file hashed (`run` hashes only
                        // the files up to 64 MiB at start).
                        ctx.at(p, "model.package", e.to_string());
                    }
                }
                let mut max_bank_mb = default_max_bank_mb();
                if let Some(v) = &m.get_ref().max_bank_mb {
                    in_range(ctx, v, "model.max_bank_mb", 1, 65_536);
                    max_bank_mb = *v.get_ref();
                }
                Some(ModelConfig {
                    package: path,
                    max_bank_mb,
                })
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
    let trigger = resolve_trigger(ctx, raw.trigger.as_ref());
    let http = resolve_http(ctx, raw.http.as_ref());
    let metrics = resolve_metrics(ctx, raw.metrics.as_ref());
    let commands = resolve_commands(ctx, raw.commands.as_ref());
    let sparkplug = resolve_sparkplug(ctx, raw.sparkplug.as_ref(), node_id.as_deref());
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

    // Last, so that the directory is created only for an otherwise good file (as `run` would);
    // with other problems it is only looked at.
    if ctx.full()
        && let Some(dir) = &state_dir
        && !ctx.reported("state_dir")
        && let Err(msg) = probe_state_dir(dir, ctx.problems.is_empty())
    {
        match &raw.state_dir {
            Some(v) => ctx.at(v, "state_dir", msg),
            None => ctx.push(None, "state_dir", format!("{msg} (the default)")),
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
        trigger,
        http,
        metrics,
        sparkplug,
        commands,
    })
}

/// The state directory check of `check-config`, as the user running it (the service's user
/// under `ExecStartPre=`): with `create`, creates the directory if missing (mode 0750, as `run`
/// would), then creates and removes a file in it. Without `create` (the file has other
/// problems, so `run` would create nothing either), a missing directory is not created: the
/// nearest existing parent gets the write probe instead.
fn probe_state_dir(dir: &Path, create: bool) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let shown = dir.display();
    if !dir.exists() {
        if !create {
            let Some(parent) = dir.ancestors().skip(1).find(|a| a.exists()) else {
                return Ok(());
            };
            if !parent.is_dir() {
                return Err(format!(
                    "cannot create the state directory {shown:?}: {:?} is not a directory",
                    parent.display().to_string()
                ));
            }
            return write_probe(parent)
                .map_err(|e| format!("cannot create the state directory {shown:?}: {e}"));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| format!("cannot create the state directory {shown:?}: {e}"))?;
    }
    if !dir.is_dir() {
        return Err(format!("{shown:?} exists and is not a directory"));
    }
    write_probe(dir).map_err(|e| {
        format!(
            "cannot write in the state directory {shown:?}: {e} (the alarm queue and the \
             engine cache live there: give the service's user write access)"
        )
    })
}

/// Creates and removes a file in `dir` (never following a symlink planted at its name).
fn write_probe(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(format!(".check-config.{}.tmp", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&probe)
        .map_err(|e| {
            format!(
                "cannot create a file in {:?}: {e}",
                dir.display().to_string()
            )
        })?;
    std::fs::remove_file(&probe)
        .map_err(|e| format!("cannot remove {:?}: {e}", probe.display().to_string()))
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
    fn names() {
        assert!(is_valid_name("press-1_A"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("+"));
        assert!(is_valid_name(&"x".repeat(64)));
        assert!(!is_valid_name(&"x".repeat(65)));
    }

    /// The `crate::` modules a file's `use` lines name (`use crate::a::b::{…}` → `a::b`).
    fn crate_imports(file: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim_start();
            let line = line.strip_prefix("pub ").unwrap_or(line);
            let line = line.strip_prefix("pub(crate) ").unwrap_or(line);
            let Some(rest) = line.strip_prefix("use crate::") else {
                continue;
            };
            assert!(
                !rest.starts_with('{'),
                "{file:?}: write one `use crate::module::…` per module, not `use crate::{{…}}`"
            );
            let path: String = rest
                .split(['{', ';', ' '])
                .next()
                .unwrap_or("")
                .trim_end_matches("::")
                .to_owned();
            out.push(path);
        }
        out
    }

    fn allowed(import: &str, prefixes: &[&str]) -> bool {
        prefixes.iter().any(|p| {
            import == *p
                || import
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with("::"))
        })
    }

    /// The config layer's imports form no cycle and do not reach the inference stack: the files
    /// of `src/config/` import only the stages' config leaves, the name rules (`payload`) and
    /// the package loader; those, the stage config leaves and `config/problems.rs` never import
    /// `crate::config` (other than the problems leaf), and the non-config modules named here
    /// import nothing from the crate at all.
    #[test]
    fn the_config_layer_imports_only_leaf_config_modules_and_has_no_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut config_files: Vec<PathBuf> = std::fs::read_dir(root.join("config"))
            .expect("src/config")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .collect();
        config_files.sort();
        assert!(config_files.len() >= 2, "{config_files:?}");
        let top = [
            "config::problems",
            "camera::config",
            "mqtt::config",
            "engine::config",
            "live::config",
            "metrics::config",
            "sparkplug::config",
            "commands::config",
            "payload",
            "package",
            "fsio",
            "region",
            "decision",
        ];
        for f in &config_files {
            for import in crate_imports(f) {
                assert!(
                    allowed(&import, &top),
                    "{f:?} imports crate::{import}: the config layer may import only {top:?}"
                );
            }
        }
        // The stage config leaves: the problems leaf, pure leaves, and their own stage (`super`).
        let stage = ["config::problems", "alarm", "payload", "region", "decision"];
        for f in [
            "camera/config.rs",
            "mqtt/config.rs",
            "engine/config.rs",
            "live/config.rs",
            "metrics/config.rs",
            "sparkplug/config.rs",
            "commands/config.rs",
        ] {
            for import in crate_imports(&root.join(f)) {
                assert!(
                    allowed(&import, &stage),
                    "src/{f} imports crate::{import}: a stage config leaf may import only \
                     {stage:?} (importing crate::config would be a cycle)"
                );
            }
        }
        // The problems leaf and the package loader read files through the bounded reader only;
        // the package loader also knows the precisions (a pure leaf of the engine's config).
        for (f, leaves) in [
            ("config/problems.rs", &["fsio"][..]),
            ("package.rs", &["fsio", "engine::config"][..]),
        ] {
            for import in crate_imports(&root.join(f)) {
                assert!(
                    allowed(&import, leaves),
                    "src/{f} imports crate::{import}: it may import only {leaves:?}"
                );
            }
        }
        // True leaves: nothing from the crate.
        for f in [
            "payload.rs",
            "fsio.rs",
            "alarm.rs",
            "region.rs",
            "decision.rs",
        ] {
            let imports = crate_imports(&root.join(f));
            assert!(
                imports.is_empty(),
                "src/{f} is a leaf but imports {imports:?}"
            );
        }
        // The engine config leaf does not look at its own stage either: the TOML parser never
        // depends on ONNX Runtime or the GPU code.
        let engine = std::fs::read_to_string(root.join("engine/config.rs")).expect("read");
        assert!(
            !engine
                .lines()
                .any(|l| l.trim_start().starts_with("use super")),
            "src/engine/config.rs must not import the engine"
        );
    }
}
