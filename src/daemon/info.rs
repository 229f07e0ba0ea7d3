//! The birth certificate: a retained `<prefix>/info` describing this node, published at every
//! connect and again after a reload.
//!
//! Input: the configuration, the model package's manifest, the engine that runs. Output: one
//! JSON document (not for PLCs: nested, a few hundred bytes per camera):
//! `v`, `node`, `version` (of this program), `started_ms`, `model` {`name`, `tiny`, `files`
//! (file name → SHA-256 from the manifest)}, `engine`, `cameras` [{`name`, `mode`,
//! `threshold`, `regions` [{`name`, `rect`, `units`, `statistic`, `threshold`}]}]: the
//! `[[camera.region]]` tables, or for a camera without them its implicit whole-frame region
//! (`name` null, `rect` [0, 0, 1, 1] in `fraction` units); `t1` where a region has one;
//! `disabled` [names] of the cameras a command disabled (absent when none); `commands`: whether
//! the node takes commands (`[commands]`). Thresholds are the ones in force, commands' overrides
//! included. Nothing here fails.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{CameraMode, Config};
use crate::package::Manifest;
use crate::payload::SCHEMA_VERSION;
use crate::region::Units;

/// What the birth certificate says about the model (kept from start-up; a reload does not
/// change the model).
#[derive(Debug, Clone, Serialize)]
pub(super) struct ModelInfo {
    name: String,
    tiny: bool,
    files: BTreeMap<String, String>,
}

impl ModelInfo {
    pub(super) fn new(m: &Manifest) -> Self {
        Self {
            name: m.name.clone(),
            tiny: m.tiny,
            files: m.files.clone(),
        }
    }
}

#[derive(Serialize)]
struct Region {
    name: Option<String>,
    rect: [f64; 4],
    units: &'static str,
    statistic: &'static str,
    threshold: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    t1: Option<f32>,
}

#[derive(Serialize)]
struct Camera {
    name: String,
    mode: &'static str,
    threshold: f32,
    regions: Vec<Region>,
}

#[derive(Serialize)]
struct Info<'a> {
    v: u32,
    node: &'a str,
    version: &'static str,
    started_ms: u64,
    model: &'a ModelInfo,
    engine: &'a str,
    cameras: Vec<Camera>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    disabled: &'a [String],
    commands: bool,
}

/// The `<prefix>/info` payload.
pub(super) fn birth(
    cfg: &Config,
    disabled: &[String],
    model: &ModelInfo,
    engine: &str,
    started_ms: u64,
) -> Vec<u8> {
    let cameras = cfg
        .cameras
        .iter()
        .map(|c| Camera {
            name: c.name.clone(),
            mode: match c.mode {
                CameraMode::Continuous => "continuous",
                CameraMode::Triggered => "triggered",
            },
            threshold: c.threshold,
            regions: c
                .regions
                .iter()
                .map(|r| Region {
                    name: r.name.clone(),
                    rect: r.shape.rect,
                    units: match r.shape.units {
                        Units::Fraction => "fraction",
                        Units::Pixel => "pixel",
                    },
                    statistic: r.statistic.as_str(),
                    threshold: r.threshold,
                    t1: r.t1,
                })
                .collect(),
        })
        .collect();
    serde_json::to_vec(&Info {
        v: SCHEMA_VERSION,
        node: &cfg.node_id,
        version: env!("CARGO_PKG_VERSION"),
        started_ms,
        model,
        engine,
        cameras,
        disabled,
        commands: cfg.commands.is_some(),
    })
    .unwrap_or_default()
}
