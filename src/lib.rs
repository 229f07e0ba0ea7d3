//! anomalyclip-edge
//!
//! # Layout
//! - [`config`]: the TOML file, `check-config` validation, the resolved [`config::Config`].
//! - [`alarm`]: per-camera alarm debouncer (N of the last M frames over threshold, K to clear).
//! - [`payload`]: the versioned MQTT payloads (result, alarm, status, mask PNG, stats).
//! - [`mqtt`]: the publisher task, its topic contract and the on-disk alarm queue.

pub mod alarm;
pub mod config;
pub mod mqtt;
pub mod payload;
