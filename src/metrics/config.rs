//! `[metrics]`: the optional Prometheus endpoint's settings (the server is [`crate::metrics`]).
//!
//! Input: the `[metrics]` table. Output: [`MetricsConfig`], or one problem per bad key: an
//! address that is not `IP:port`. Absent table: `None`, nothing listens. A non-loopback address
//! is allowed (the metrics carry no secrets); the daemon logs a warning for it at start.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::problems::{Ctx, S};

/// `metrics.listen` default (9464: the port commonly used by Prometheus exporters of this
/// kind, e.g. the OpenTelemetry Prometheus exporter).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// `[metrics]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served.
    pub listen: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    listen: S<String>,
}

/// Checks `[metrics]` and resolves it; `None` when absent or invalid (problems reported).
pub(crate) fn resolve_metrics(
    ctx: &mut Ctx<'_>,
    raw: Option<&RawMetrics>,
) -> Option<MetricsConfig> {
    let m = raw?;
    let listen = match &m.listen {
        Some(v) => match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                ctx.at(
                    v,
                    "metrics.listen",
                    format!(
                        "{:?} is not an address (expected IP:port, e.g. \"{DEFAULT_LISTEN}\")",
                        v.get_ref()
                    ),
                );
                return None;
            }
        },
        None => DEFAULT_LISTEN.parse().ok()?,
    };
    Some(MetricsConfig { listen })
}
