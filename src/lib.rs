//! anomalyclip-edge: zero-shot visual anomaly detection (AnomalyCLIP) for factory lines.
//!
//! # Layout
//! The modules below are declared in the order a frame travels through them:
//! - [`config`]: the TOML file, `check-config` validation, the resolved [`config::Config`]; each
//!   stage's own part lives beside the stage (`camera::config`, `mqtt::config`,
//!   `engine::config`), and the config layer imports no inference code.
//! - [`camera`]: GStreamer pipelines per camera into latest-frame slots (frames before the first
//!   keyframe of a connection never get through); reconnect and status.
//! - [`image_io`]: image files → pixels in Pillow's mode → model input, like the reference.
//! - [`preprocess`]: Pillow-exact resampling of frames and the CLIP normalisation.
//! - [`package`]: the model package (ONNX encoder + text constant + manifest) and its checks.
//! - [`engine`]: the vision encoder backends (ONNX Runtime: TensorRT / CUDA / CPU).
//! - [`head`]: the anomaly head interface ([`head::AnomalyHead`]) and the CPU head (score, patch
//!   probabilities, upsampling, Gaussian smoothing, map statistics, mask rendering).
//! - [`simd`]: run-time AVX2 dispatch of the numerical loops (bit-identical results).
//! - [`gpu`]: the same head as CUDA kernels (NVRTC at start-up, cudarc), checked against [`head`].
//! - [`scorer`]: package + engine + head as one object, used by `score`, `eval` and the daemon.
//! - [`region`]: regions of interest: the crop of the full-resolution frame, ignore polygons.
//! - [`decision`]: statistic, thresholds (hand-set or calibrated) and the OK / UNKNOWN / NG
//!   verdict of a region on a frame.
//! - [`alarm`]: per-region alarm debouncer (N of the last M frames over threshold, K to clear).
//! - [`calibration`]: thresholds T1/T2 from good-part scores (order statistics), the calibration
//!   file with its validity fingerprint and rollback, the drift index and the normalised score.
//! - [`payload`]: the versioned MQTT payloads (result, alarm, status, mask PNG, stats).
//! - [`mqtt`]: the publisher task, its topic contract and the on-disk alarm queue.
//! - [`daemon`]: `run(config, control)`: the cameras, the inference worker, health and reload
//!   that tie the stages together, with systemd integration and one stop path.
//!
//! Beside the frame path: [`live`] (the optional live view server), [`metrics`] (the optional
//! Prometheus endpoint), [`sparkplug`] (the optional Sparkplug B edge node), [`commands`]
//! (commands from SCADA, off by default: the request and acknowledgement wire, and the
//! overrides they keep in the state directory), [`statedir`] (the state directory, locked for one daemon; atomic,
//! symlink-safe writes), [`fsio`] (every file read from outside: regular files only, bounded
//! before reading) and [`eval`] (dataset evaluation with the paper's metrics).

pub mod config;

pub mod camera;

pub mod image_io;

pub mod preprocess;

pub mod package;

pub mod engine;

pub mod head;

pub mod simd;

pub mod gpu;

pub mod scorer;

pub mod region;

pub mod decision;

pub mod reference;

pub mod alarm;

pub mod calibration;

pub mod payload;

pub mod mqtt;

pub mod daemon;

pub mod live;

pub mod metrics;

pub mod sparkplug;

pub mod commands;

pub mod statedir;

pub mod fsio;

pub mod eval;
