//! `[http]`: the optional live view server's settings (the server is [`crate::live`]).
//!
//! Input: the `[http]` table. Output: [`HttpConfig`], or problems: an address that is not
//! `IP:port`, a non-loopback address without `token_file` (the pages show the factory floor
//! and can change the config: a LAN bind without a token is refused), a token file that
//! cannot be read or is empty, out-of-range sizes. Absent table: `None`, nothing listens.
//! The token never appears in a problem or in `Debug` output.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::problems::{Ctx, S, get, in_range, read_file};

/// `http.listen` default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8088";
/// `http.max_fps` default: frames per second of the live view.
pub const fn default_live_fps() -> u32 {
    5
}
/// `http.max_width` default: the live view's JPEG width bound in pixels.
pub const fn default_live_width() -> u32 {
    640
}
/// `http.gallery_count` default: NG frames kept per camera.
pub const fn default_gallery_count() -> u32 {
    50
}
/// `http.gallery_mib` default: bytes kept per camera, in MiB.
pub const fn default_gallery_mib() -> u32 {
    20
}

/// The access token (first line of `token_file`); `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpToken(pub String);

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[http]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Where the token came from (re-read at daemon start).
    pub token_file: Option<PathBuf>,
    /// The token, when file system checks are on and `token_file` is set.
    pub token: Option<HttpToken>,
    /// Live view frames per second per camera (1..=30).
    pub max_fps: u32,
    /// Longest edge of a live view JPEG (64..=4096).
    pub max_width: u32,
    /// NG gallery: frames kept per camera (0 = no gallery).
    pub gallery_count: u32,
    /// NG gallery: bytes kept per camera, in MiB.
    pub gallery_mib: u32,
    /// Whether the region editor may write the config file (`http.edit_config`, default true).
    pub edit_config: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    listen: S<String>,
    token_file: S<String>,
    max_fps: S<u32>,
    max_width: S<u32>,
    gallery_count: S<u32>,
    gallery_mib: S<u32>,
    edit_config: S<bool>,
}

/// The token in a token file's bytes: its first line, trimmed; `Err` says why it is unusable
/// (never showing the token).
pub fn parse_token(bytes: &[u8], shown: &str) -> Result<HttpToken, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("token file {shown:?} is not UTF-8 text"))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.chars().count() < 16 {
        return Err(format!(
            "token file {shown:?}: the token (its first line) must be at least 16 characters"
        ));
    }
    Ok(HttpToken(token.to_owned()))
}

/// Checks `[http]` and resolves it; `None` when absent or invalid (problems reported).
pub(crate) fn resolve_http(ctx: &mut Ctx<'_>, raw: Option<&RawHttp>) -> Option<HttpConfig> {
    let h = raw?;
    let mut ok = true;
    let listen = match &h.listen {
        Some(v) => match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                ctx.at(
                    v,
                    "http.listen",
                    format!(
                        "{:?} is not an address (expected IP:port, e.g. \"127.0.0.1:8088\")",
                        v.get_ref()
                    ),
                );
                None
            }
        },
        None => DEFAULT_LISTEN.parse().ok(),
    };
    let token_file = h.token_file.as_ref().map(|v| PathBuf::from(v.get_ref()));
    let mut token = None;
    if let Some(v) = &h.token_file {
        if v.get_ref().is_empty() {
            ctx.at(v, "http.token_file", "must not be empty");
            ok = false;
        } else if ctx.fs() {
            match read_file(ctx, v, "http.token_file", "token file") {
                Some(bytes) => match parse_token(&bytes, v.get_ref()) {
                    Ok(t) => token = Some(t),
                    Err(msg) => {
                        ctx.at(v, "http.token_file", msg);
                        ok = false;
                    }
                },
                None => ok = false,
            }
        }
    }
    if let Some(a) = listen
        && !a.ip().is_loopback()
        && token_file.is_none()
    {
        let msg = format!(
            "{a} is not a loopback address: set http.token_file (a file holding an access token) \
             to serve the live view beyond this machine, or listen on 127.0.0.1"
        );
        match &h.listen {
            Some(v) => ctx.at(v, "http.listen", msg),
            None => ctx.push(None, "http.listen", msg),
        }
        ok = false;
    }
    if let Some(v) = &h.max_fps {
        ok &= in_range(ctx, v, "http.max_fps", 1, 30);
    }
    if let Some(v) = &h.max_width {
        ok &= in_range(ctx, v, "http.max_width", 64, 4096);
    }
    if let Some(v) = &h.gallery_count {
        ok &= in_range(ctx, v, "http.gallery_count", 0, 10_000);
    }
    if let Some(v) = &h.gallery_mib {
        ok &= in_range(ctx, v, "http.gallery_mib", 1, 10_240);
    }
    if !ok {
        return None;
    }
    Some(HttpConfig {
        listen: listen?,
        token_file,
        token,
        max_fps: get(&h.max_fps, default_live_fps()),
        max_width: get(&h.max_width, default_live_width()),
        gallery_count: get(&h.gallery_count, default_gallery_count()),
        gallery_mib: get(&h.gallery_mib, default_gallery_mib()),
        edit_config: get(&h.edit_config, true),
    })
}
