//! The MQTT stage's configuration: `[mqtt]` as written and resolved ([`MqttConfig`], with
//! [`TlsConfig`], [`Secret`] and [`WhenFull`]).
//!
//! Input: the raw `[mqtt]` table (keys optional, `deny_unknown_fields`). Output: an
//! [`MqttConfig`], or problems reported at each key's line: a host that is not a host name or IP
//! address (a URL such as `mqtt://x`, `host:port`, spaces), a topic prefix with wildcards, QoS
//! and ranges, a password file that is unreadable, empty or has more than one line, TLS files
//! that do not hold what rustls will need (a CA with at least one certificate that rustls takes
//! into a root store, a client certificate chain with at least one certificate, exactly one
//! private key that rustls can load). A leaf: it imports only the config problem machinery, so
//! `config` → `mqtt::config` has no cycle and the TOML parser does not pull in the publisher.
//!
//! A password file holds the password on its first line; one trailing line ending (LF or CRLF)
//! is removed, and any further line must be empty: a file with a second non-empty line is
//! refused (it is probably not a password file), so nothing after the first line is ever sent.

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::QoS;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use toml::Spanned;

use crate::config::problems::{Ctx, S, get, in_range, read_file};

/// What to do with a new alarm when the disk queue is full (`[mqtt] queue_when_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Discard the oldest queued alarm (the newest state always gets through).
    DropOldest,
    /// Discard the new alarm (the history is kept as it was).
    DropNewest,
}

/// A secret string whose `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[mqtt.tls]`: TLS is on when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA certificate(s) (PEM) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub client_key_file: Option<PathBuf>,
}

/// `[mqtt]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// `None` = `anomalyclip-<node_id>`.
    pub client_id: Option<String>,
    /// `None` = `anomalyclip/<node_id>`.
    pub topic_prefix: Option<String>,
    /// Zero disables keep-alive pings.
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsConfig>,
    pub result_qos: QoS,
    pub mask_qos: QoS,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub queue_max_alarms: usize,
    pub queue_when_full: WhenFull,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: 1883,
            client_id: None,
            topic_prefix: None,
            keep_alive: Duration::from_secs(30),
            username: None,
            password: None,
            tls: None,
            result_qos: QoS::AtMostOnce,
            mask_qos: QoS::AtMostOnce,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            queue_max_alarms: 10_000,
            queue_when_full: WhenFull::DropOldest,
        }
    }
}

impl MqttConfig {
    /// The topic prefix in use for `node_id`.
    pub fn prefix_for(&self, node_id: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("anomalyclip/{node_id}"))
    }

    /// The client id in use for `node_id`.
    pub fn client_id_for(&self, node_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("anomalyclip-{node_id}"))
    }
}

/// Keys whose values are secrets: a problem at one of them never shows the value.
pub(crate) const SECRET_KEYS: &[&str] = &["mqtt.password"];

/// `[mqtt]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMqtt {
    host: S<String>,
    port: S<u16>,
    client_id: S<String>,
    topic_prefix: S<String>,
    keep_alive_s: S<u16>,
    username: S<String>,
    password: S<String>,
    password_file: S<String>,
    result_qos: S<u8>,
    mask_qos: S<u8>,
    reconnect_min_ms: S<u64>,
    reconnect_max_ms: S<u64>,
    queue_max_alarms: S<u64>,
    queue_when_full: Option<WhenFull>,
    tls: S<RawTls>,
}

/// `[mqtt.tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    ca_file: S<String>,
    client_cert_file: S<String>,
    client_key_file: S<String>,
}

/// Topic prefix rules: no wildcards, no empty levels, no `$` start, at most 256 bytes.
pub(crate) fn topic_prefix_problem(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some("must not be empty".into());
    }
    if p.len() > 256 {
        return Some("longer than 256 bytes".into());
    }
    if p.contains(['+', '#', '\0']) {
        return Some(format!("{p:?} contains an MQTT wildcard (+ or #) or NUL"));
    }
    if p.starts_with('$') {
        return Some(format!("{p:?} starts with $ (reserved for the broker)"));
    }
    if p.split('/').any(str::is_empty) {
        return Some(format!(
            "{p:?} has an empty topic level (leading, trailing or double /)"
        ));
    }
    None
}

/// Host rules: an IP address (v4, or v6 without brackets) or a host name (dot-separated labels
/// of 1 to 63 letters, digits, `-` or `_`, not starting or ending with `-`; 253 bytes at most).
/// The message never repeats the part of a URL before `@` (it may hold credentials).
pub(crate) fn host_problem(h: &str) -> Option<String> {
    const EXPECTED: &str = "expected a host name or IP address";
    if h.trim().is_empty() {
        return Some("must not be empty".into());
    }
    if let Some((scheme, rest)) = h.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        return Some(format!(
            "\"{scheme}://…\" is a URL, not a host: write the host alone (host = {host:?}), \
             the port in port = … and TLS in [mqtt.tls]"
        ));
    }
    if h.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    if let Some(inner) = h.strip_prefix('[').and_then(|s| s.strip_suffix(']'))
        && inner.parse::<std::net::Ipv6Addr>().is_ok()
    {
        return Some(format!(
            "write the IPv6 address without brackets: {inner:?}"
        ));
    }
    if let Some((host, port)) = h.rsplit_once(':')
        && !host.contains(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return Some(format!(
            "{h:?} includes a port: write host = {host:?} and port = {port}"
        ));
    }
    if h.chars().any(char::is_whitespace) {
        return Some(format!("{h:?} contains white space ({EXPECTED})"));
    }
    let name = h.strip_suffix('.').unwrap_or(h);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Some(format!(
            "{h:?} is not a valid host name ({EXPECTED}: letters, digits, '-' and '.')"
        ));
    }
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(format!("{h:?} is not a valid IP address ({EXPECTED})"));
    }
    None
}

/// The password in a password file: the first line without its line ending (LF or CRLF). Every
/// further line must be empty (white space only); otherwise the file is refused, so that a
/// second line is never sent as part of the password.
pub(crate) fn password_from_file(text: &str) -> Result<&str, &'static str> {
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");
    let first = first.strip_suffix('\r').unwrap_or(first);
    if lines.any(|l| !l.trim().is_empty()) {
        return Err("has more than one line (the password is the first and only line)");
    }
    if first.is_empty() {
        return Err("is empty");
    }
    Ok(first)
}

/// What is wrong with a CA file: rustls must find at least one certificate and accept each one
/// into a root store (the same step the connection takes).
pub(crate) fn ca_problem(bytes: &[u8]) -> Option<String> {
    let mut store = rustls::RootCertStore::empty();
    let mut n = 0usize;
    for cert in CertificateDer::pem_slice_iter(bytes) {
        n += 1;
        match cert {
            Ok(der) => {
                if let Err(e) = store.add(der) {
                    return Some(format!(
                        "certificate {n} is not a usable CA certificate: {e}"
                    ));
                }
            }
            Err(e) => return Some(format!("certificate {n} is not valid PEM: {e}")),
        }
    }
    (n == 0).then(|| "does not look like a PEM certificate".to_owned())
}

/// What is wrong with a client certificate file: at least one certificate, each a parseable
/// X.509 certificate.
pub(crate) fn client_cert_problem(bytes: &[u8]) -> Option<String> {
    let mut n = 0usize;
    for cert in CertificateDer::pem_slice_iter(bytes) {
        n += 1;
        match cert {
            Ok(der) => {
                if let Err(e) = rustls::server::ParsedCertificate::try_from(&der) {
                    return Some(format!(
                        "certificate {n} is not a valid X.509 certificate: {e}"
                    ));
                }
            }
            Err(e) => return Some(format!("certificate {n} is not valid PEM: {e}")),
        }
    }
    (n == 0).then(|| "does not look like a PEM certificate".to_owned())
}

/// What is wrong with a client key file: exactly one private key (PKCS#8, PKCS#1 or SEC1), and
/// one that rustls's crypto provider can load.
pub(crate) fn client_key_problem(bytes: &[u8]) -> Option<String> {
    let mut keys = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        match section {
            Ok((
                kind @ (SectionKind::PrivateKey
                | SectionKind::RsaPrivateKey
                | SectionKind::EcPrivateKey),
                der,
            )) => keys.push((kind, der)),
            Ok(_) => {}
            Err(e) => return Some(format!("is not valid PEM: {e}")),
        }
    }
    let (kind, der) = match keys.len() {
        0 => return Some("does not look like a PEM private key".to_owned()),
        1 => keys.remove(0),
        n => {
            return Some(format!("holds {n} private keys (expected exactly one)"));
        }
    };
    let key = match kind {
        SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
        SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
        _ => PrivateKeyDer::Pkcs8(der.into()),
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    match provider.key_provider.load_private_key(key) {
        Ok(_) => None,
        Err(e) => Some(format!("is not a usable private key: {e}")),
    }
}

/// Reads a TLS file and checks its contents with `problem`, reporting at `v`.
fn tls_file(
    ctx: &mut Ctx<'_>,
    v: &Spanned<String>,
    path: &str,
    what: &str,
    problem: fn(&[u8]) -> Option<String>,
) {
    if let Some(bytes) = read_file(ctx, v, path, what)
        && let Some(msg) = problem(&bytes)
    {
        ctx.at(v, path, format!("{what} {:?} {msg}", v.get_ref()));
    }
}

/// Checks `[mqtt]` and resolves it; `None` (with problems reported) when something is wrong.
pub(crate) fn resolve_mqtt(ctx: &mut Ctx<'_>, m: &Spanned<RawMqtt>) -> Option<MqttConfig> {
    let r = m.get_ref();
    let before = ctx.problems.len();
    let defaults = MqttConfig::default();

    let host = match &r.host {
        Some(h) => {
            if let Some(msg) = host_problem(h.get_ref()) {
                ctx.at(h, "mqtt.host", msg);
            }
            h.get_ref().clone()
        }
        None => {
            if !ctx.reported("mqtt.host") {
                ctx.at(
                    m,
                    "mqtt.host",
                    "missing: set host = \"<broker host name or address>\"",
                );
            }
            String::new()
        }
    };
    let port = r
        .port
        .as_ref()
        .map_or(if r.tls.is_some() { 8883 } else { 1883 }, |p| {
            if *p.get_ref() == 0 {
                ctx.at(p, "mqtt.port", "port 0 is not valid");
            }
            *p.get_ref()
        });
    if let Some(c) = &r.client_id {
        let s = c.get_ref();
        if s.is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
            ctx.at(c, "mqtt.client_id", "must be 1 to 128 printable characters");
        }
    }
    if let Some(p) = &r.topic_prefix
        && let Some(msg) = topic_prefix_problem(p.get_ref())
    {
        ctx.at(p, "mqtt.topic_prefix", msg);
    }
    let keep_alive = Duration::from_secs(u64::from(get(&r.keep_alive_s, 30)));

    // Credentials.
    if let Some(u) = &r.username
        && u.get_ref().is_empty()
    {
        ctx.at(
            u,
            "mqtt.username",
            "must not be empty (remove it for anonymous access)",
        );
    }
    let mut password = None;
    match (&r.password, &r.password_file) {
        (Some(p), Some(_)) => {
            ctx.at(
                p,
                "mqtt.password",
                "set either password or password_file, not both",
            );
        }
        (Some(p), None) => password = Some(p.get_ref().clone()),
        (None, Some(f)) => {
            if let Some(bytes) = read_file(ctx, f, "mqtt.password_file", "password file") {
                match String::from_utf8(bytes) {
                    Ok(s) => match password_from_file(&s) {
                        Ok(p) => password = Some(p.to_owned()),
                        Err(msg) => ctx.at(
                            f,
                            "mqtt.password_file",
                            format!("password file {:?} {msg}", f.get_ref()),
                        ),
                    },
                    Err(_) => ctx.at(
                        f,
                        "mqtt.password_file",
                        format!("password file {:?} is not UTF-8", f.get_ref()),
                    ),
                }
            }
        }
        (None, None) => {}
    }
    if r.username.is_none()
        && let Some(p) = r.password.as_ref().or(r.password_file.as_ref())
    {
        ctx.at(
            p,
            "mqtt.username",
            "a password needs a username: set username = \"…\"",
        );
    }

    // QoS.
    let qos = |ctx: &mut Ctx<'_>, v: &S<u8>, path: &str| -> QoS {
        match v {
            None => QoS::AtMostOnce,
            Some(q) => match *q.get_ref() {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                2 => QoS::ExactlyOnce,
                n => {
                    ctx.at(
                        q,
                        path,
                        format!("QoS {n} does not exist (expected 0, 1 or 2)"),
                    );
                    QoS::AtMostOnce
                }
            },
        }
    };
    let result_qos = qos(ctx, &r.result_qos, "mqtt.result_qos");
    let mask_qos = qos(ctx, &r.mask_qos, "mqtt.mask_qos");

    // Reconnect backoff.
    let rmin = get(
        &r.reconnect_min_ms,
        defaults.reconnect_min.as_millis() as u64,
    );
    let rmax = get(
        &r.reconnect_max_ms,
        defaults.reconnect_max.as_millis() as u64,
    );
    let min_ok = r
        .reconnect_min_ms
        .as_ref()
        .is_none_or(|v| in_range(ctx, v, "mqtt.reconnect_min_ms", 1, 3_600_000));
    let max_ok = r
        .reconnect_max_ms
        .as_ref()
        .is_none_or(|v| in_range(ctx, v, "mqtt.reconnect_max_ms", 1, 3_600_000));
    if min_ok && max_ok && rmax < rmin {
        match (&r.reconnect_max_ms, &r.reconnect_min_ms) {
            (Some(v), _) => ctx.at(
                v,
                "mqtt.reconnect_max_ms",
                format!("{rmax} is below reconnect_min_ms ({rmin})"),
            ),
            (None, Some(v)) => ctx.at(
                v,
                "mqtt.reconnect_min_ms",
                format!("{rmin} is above reconnect_max_ms ({rmax}, the default)"),
            ),
            (None, None) => {}
        }
    }

    let queue_max = get(&r.queue_max_alarms, defaults.queue_max_alarms as u64);
    if let Some(v) = &r.queue_max_alarms {
        in_range(ctx, v, "mqtt.queue_max_alarms", 1, 1_000_000);
    }

    // TLS.
    let tls = r.tls.as_ref().map(|t| {
        let tr = t.get_ref();
        let ca_file = match &tr.ca_file {
            Some(ca) => {
                tls_file(ctx, ca, "mqtt.tls.ca_file", "CA file", ca_problem);
                PathBuf::from(ca.get_ref())
            }
            None => {
                if !ctx.reported("mqtt.tls.ca_file") {
                    ctx.at(
                        t,
                        "mqtt.tls.ca_file",
                        "missing: set ca_file = \"<CA certificate PEM>\"",
                    );
                }
                PathBuf::new()
            }
        };
        let cert = tr.client_cert_file.as_ref().map(|c| {
            tls_file(
                ctx,
                c,
                "mqtt.tls.client_cert_file",
                "client certificate",
                client_cert_problem,
            );
            PathBuf::from(c.get_ref())
        });
        let key = tr.client_key_file.as_ref().map(|k| {
            tls_file(
                ctx,
                k,
                "mqtt.tls.client_key_file",
                "client key",
                client_key_problem,
            );
            PathBuf::from(k.get_ref())
        });
        match (&tr.client_cert_file, &tr.client_key_file) {
            (Some(c), None) => ctx.at(
                c,
                "mqtt.tls.client_key_file",
                "client_cert_file needs client_key_file",
            ),
            (None, Some(k)) => ctx.at(
                k,
                "mqtt.tls.client_cert_file",
                "client_key_file needs client_cert_file",
            ),
            _ => {}
        }
        TlsConfig {
            ca_file,
            client_cert_file: cert,
            client_key_file: key,
        }
    });

    if ctx.problems.len() != before {
        return None;
    }
    Some(MqttConfig {
        host,
        port,
        client_id: r.client_id.as_ref().map(|c| c.get_ref().clone()),
        topic_prefix: r.topic_prefix.as_ref().map(|c| c.get_ref().clone()),
        keep_alive,
        username: r.username.as_ref().map(|c| c.get_ref().clone()),
        password: password.map(Secret),
        tls,
        result_qos,
        mask_qos,
        reconnect_min: Duration::from_millis(rmin),
        reconnect_max: Duration::from_millis(rmax),
        queue_max_alarms: queue_max as usize,
        queue_when_full: r.queue_when_full.unwrap_or(defaults.queue_when_full),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_prefix_rules() {
        assert_eq!(topic_prefix_problem("plant/line1"), None);
        assert!(topic_prefix_problem("").is_some());
        assert!(topic_prefix_problem("a/+/b").is_some());
        assert!(topic_prefix_problem("a/#").is_some());
        assert!(topic_prefix_problem("/a").is_some());
        assert!(topic_prefix_problem("a/").is_some());
        assert!(topic_prefix_problem("a//b").is_some());
        assert!(topic_prefix_problem("$SYS/x").is_some());
    }

    #[test]
    fn a_host_must_be_a_host_name_or_an_ip_address() {
        for good in [
            "localhost",
            "broker.plant.local",
            "broker.plant.local.",
            "mqtt_1",
            "10.0.0.5",
            "::1",
            "fe80::1",
            "a-b.c",
        ] {
            assert_eq!(host_problem(good), None, "{good}");
        }
        for (bad, want) in [
            ("mqtt://broker", "is a URL"),
            ("tcp://broker:1883", "host = \"broker\""),
            ("mqtts://user:pw@broker/x", "host = \"broker\""),
            ("broker:1883", "port = 1883"),
            ("[::1]", "without brackets"),
            ("my broker", "white space"),
            ("broker\t", "white space"),
            ("bro/ker", "not a valid host name"),
            ("-broker", "not a valid host name"),
            ("a..b", "not a valid host name"),
            ("256.1.1.1", "not a valid IP address"),
            ("", "must not be empty"),
            ("  ", "must not be empty"),
        ] {
            let msg = host_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(msg.contains(want), "{bad:?}: {msg}");
            assert!(!msg.contains("pw"), "{msg}");
        }
        assert!(host_problem(&format!("{}.com", "a".repeat(64))).is_some());
    }

    #[test]
    fn a_password_file_second_line_is_never_part_of_the_password() {
        assert_eq!(password_from_file("s3cret"), Ok("s3cret"));
        assert_eq!(password_from_file("s3cret\n"), Ok("s3cret"));
        assert_eq!(password_from_file("s3cret\r\n"), Ok("s3cret"));
        assert_eq!(password_from_file("s3cret\n\n  \n"), Ok("s3cret"));
        assert_eq!(password_from_file(" with space \n"), Ok(" with space "));
        assert!(password_from_file("s3cret\nsecond\n").is_err());
        assert!(password_from_file("s3cret\r\nsecond").is_err());
        assert!(password_from_file("\n").is_err());
        assert!(password_from_file("").is_err());
    }
}
