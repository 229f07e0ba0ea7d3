//! `[sparkplug]`: the optional Sparkplug B edge node's settings (the node is
//! [`crate::sparkplug`]).
//!
//! Input: the `[sparkplug]` table and the top-level `node_id` (the default edge node id).
//! Output: [`SparkplugConfig`], or one problem per bad key: a missing `group_id`, an id that
//! breaks the Sparkplug rules ([`id_problem`]: empty, longer than [`MAX_ID_LEN`] characters, or
//! holding `/`, `+`, `#` or a control character), a `data_interval_ms` out of range. Absent
//! table: `None`, no Sparkplug connection. The broker (host, port, TLS, credentials, keep-alive,
//! reconnect backoff) is `[mqtt]`'s.

use std::time::Duration;

use serde::Deserialize;

use crate::config::problems::{Ctx, S, in_range};

/// Longest group id or edge node id, in characters.
pub const MAX_ID_LEN: usize = 64;

/// `sparkplug.data_interval_ms` default: DDATA as often as frames are scored.
pub const fn default_data_interval_ms() -> u64 {
    0
}

/// `[sparkplug]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugConfig {
    /// The Sparkplug group id (`spBv1.0/<group_id>/…`).
    pub group_id: String,
    /// The edge node id (default: the config's `node_id`).
    pub edge_node_id: String,
    /// Shortest time between two DDATA of one camera (zero: once per scored frame at most).
    pub data_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSparkplug {
    group_id: S<String>,
    edge_node_id: S<String>,
    data_interval_ms: S<u64>,
}

/// Why `s` is not a Sparkplug id (group, edge node or device id), or `None` when it is one:
/// a topic level of `spBv1.0/…` must be non-empty, at most [`MAX_ID_LEN`] characters, and hold
/// none of the MQTT separators and wildcards `/`, `+`, `#` nor a control character.
pub fn id_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".to_owned());
    }
    let n = s.chars().count();
    if n > MAX_ID_LEN {
        return Some(format!(
            "{n} characters: a Sparkplug id has at most {MAX_ID_LEN}"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control())
    {
        return Some(format!(
            "{s:?} holds {c:?}: a Sparkplug id must not contain '/', '+', '#' or control characters"
        ));
    }
    None
}

/// Checks `[sparkplug]` and resolves it; `None` when absent or invalid (problems reported).
/// `node_id`: the config's valid `node_id`, if any (the default edge node id).
pub(crate) fn resolve_sparkplug(
    ctx: &mut Ctx<'_>,
    raw: Option<&toml::Spanned<RawSparkplug>>,
    node_id: Option<&str>,
) -> Option<SparkplugConfig> {
    let table = raw?;
    let s = table.get_ref();
    let group_id = match &s.group_id {
        Some(v) => match id_problem(v.get_ref()) {
            None => Some(v.get_ref().clone()),
            Some(msg) => {
                ctx.at(v, "sparkplug.group_id", msg);
                None
            }
        },
        None => {
            if !ctx.reported("sparkplug.group_id") {
                ctx.at(
                    table,
                    "sparkplug.group_id",
                    "missing: set group_id = \"<Sparkplug group of this line>\"",
                );
            }
            None
        }
    };
    let edge_node_id = match &s.edge_node_id {
        Some(v) => match id_problem(v.get_ref()) {
            None => Some(v.get_ref().clone()),
            Some(msg) => {
                ctx.at(v, "sparkplug.edge_node_id", msg);
                None
            }
        },
        None => match node_id {
            Some(n) => match id_problem(n) {
                None => Some(n.to_owned()),
                Some(msg) => {
                    ctx.at(
                        table,
                        "sparkplug.edge_node_id",
                        format!("the default (node_id) is not a Sparkplug id: {msg}"),
                    );
                    None
                }
            },
            // node_id itself is reported.
            None => None,
        },
    };
    let mut data_interval_ms = default_data_interval_ms();
    if let Some(v) = &s.data_interval_ms {
        if !in_range(ctx, v, "sparkplug.data_interval_ms", 0, 3_600_000) {
            return None;
        }
        data_interval_ms = *v.get_ref();
    }
    Some(SparkplugConfig {
        group_id: group_id?,
        edge_node_id: edge_node_id?,
        data_interval: Duration::from_millis(data_interval_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkplug_ids() {
        assert_eq!(id_problem("line-1"), None);
        assert_eq!(id_problem("Linie Süd"), None);
        assert_eq!(id_problem(&"é".repeat(64)), None);
        for bad in ["", "a/b", "a+", "#", "a\u{0}b", "tab\t"] {
            assert!(id_problem(bad).is_some(), "{bad:?}");
        }
        assert!(id_problem(&"x".repeat(65)).is_some());
    }
}
