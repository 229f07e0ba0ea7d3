//! The integration tests that need no GPU, as one test binary (one link instead of one per
//! file): each module is one area, in the order a frame travels, then the commands and packaging.
//! Shared helpers (a real mosquitto, an RTSP camera on 127.0.0.1, the daemon binary, fixtures)
//! live in [`common`].
//!
//! A test whose dependency is not installed here shows as *ignored* with the reason (see
//! `build.rs`); `scripts/test` (CI) sets `ANOMALYCLIP_REQUIRE_*` and fails on any ignored test.
//! Run one area with `cargo test --test it camera::`.

mod common;

mod calibrate;
mod camera;
mod commands;
mod config;
mod config_check;
mod daemon;
mod drift;
mod eval_cli;
mod eval_dataset;
mod eval_metrics;
mod field;
mod golden;
mod head;
mod head_non_finite;
mod hostile;
mod hostile_files;
mod hostile_props;
mod image_io;
mod layouts;
mod live;
mod metrics;
mod mqtt;
mod packaging;
mod preprocess;
mod queue;
mod reference;
mod regions;
mod score_cli;
mod sparkplug;
mod speed;
mod statedir;
mod systemd;
mod trigger;
