//! - [`scorer`]: package + engine + head as one object, used by `score`, `eval` and the daemon.
//! - [`alarm`]: per-camera alarm debouncer (N of the last M frames over threshold, K to clear).
//! - [`payload`]: the versioned MQTT payloads (result, alarm, status, mask PNG, stats).
//! - [`mqtt`]: the publisher task, its topic contract and the on-disk alarm queue.
//! - [`daemon`]: the `run` loop that ties the stages together, with systemd integration.
//!
//! Off the frame path: [`eval`] (dataset evaluation with the paper's metrics).
pub mod alarm;
pub mod camera;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod eval;
pub mod gpu;
