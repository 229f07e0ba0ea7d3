//! `[commands]`: whether the daemon takes commands over MQTT, and which (the command stage is
//! [`crate::commands`]).
//!
//! Input: the `[commands]` table. Output: [`CommandsConfig`], or one problem per bad key: an
//! unknown command name in `allow`. Absent table: `None`, nothing is subscribed (commands are
//! off by default).

use serde::Deserialize;

use crate::config::problems::{Ctx, S};

/// Every command the daemon knows, as written in a request's `cmd` and in `allow`.
pub const COMMANDS: [&str; 6] = [
    "set_thresholds",
    "enable_camera",
    "disable_camera",
    "clear_overrides",
    "ack_alarm",
    "start_calibration",
];

/// `[commands]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandsConfig {
    /// The commands carried out; any other is answered `ok: false` ("not allowed").
    pub allow: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCommands {
    allow: S<Vec<String>>,
}

/// Checks `[commands]` and resolves it; `None` when absent or invalid (problems reported).
pub(crate) fn resolve_commands(
    ctx: &mut Ctx<'_>,
    raw: Option<&RawCommands>,
) -> Option<CommandsConfig> {
    let c = raw?;
    let allow = match &c.allow {
        Some(v) => {
            let mut bad = v
                .get_ref()
                .iter()
                .filter(|n| !COMMANDS.contains(&n.as_str()))
                .peekable();
            if let Some(first) = bad.peek() {
                ctx.at(
                    v,
                    "commands.allow",
                    format!(
                        "{first:?} is not a command (expected some of {})",
                        COMMANDS.join(", ")
                    ),
                );
                return None;
            }
            v.get_ref().clone()
        }
        None => COMMANDS.iter().map(|s| (*s).to_owned()).collect(),
    };
    Some(CommandsConfig { allow })
}
