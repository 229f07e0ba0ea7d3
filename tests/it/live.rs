//! The live view (`[http]`, src/live.rs) against the real daemon: a simulated camera, the tiny
//! random-weight model (wiring only: its scores mean nothing), a real mosquitto, plain HTTP
//! over TCP, and Debian's Chromium (headless) for the pages.
//!
//! The browser test saves its screenshot as `target/test-artifacts/live-view.png`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::broker::{Broker, free_port};
use crate::common::daemon::{BIN, Daemon, config, sim_camera};

/// One HTTP/1.1 response (also used by the metrics tests).
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends one request (`Connection: close`) and reads the whole response. `target` is sent as
/// is (so traversal attempts reach the server unnormalised).
pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).expect("send");
    s.write_all(body).expect("send body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Resp { status, head, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
}

fn get(addr: SocketAddr, target: &str) -> Resp {
    request(addr, "GET", target, &[], b"")
}

/// A daemon with a simulated camera `sim` and `[http]` (`http_extra` appended to the table).
async fn start(http_extra: &str, camera: &str) -> (Broker, Daemon, SocketAddr) {
    let broker = Broker::start(None).await;
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let text = http_first(
        &config("live", broker.port, camera),
        &format!("listen = \"{addr}\"\n{http_extra}"),
    );
    let d = Daemon::start(&text);
    assert!(
        common::wait_until(Duration::from_secs(20), || TcpStream::connect(addr).is_ok()),
        "live view never listened on {addr}; log:\n{}",
        d.log()
    );
    (broker, d, addr)
}

/// The config with an `[http]` table holding `body`, placed before the first `[[camera]]`
/// (after it, TOML would read the keys as the camera's).
fn http_first(config_text: &str, body: &str) -> String {
    let (top, cams) = config_text
        .split_once("[[camera]]")
        .expect("a camera table");
    format!("{top}[http]\n{body}\n[[camera]]{cams}")
}

/// Waits until the camera has a scored frame on `/api/cameras`.
fn wait_scored(addr: SocketAddr, d: &Daemon) {
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            let r = request(addr, "GET", "/api/cameras", &[], b"");
            r.status == 200 && r.json()[0]["last"].is_object()
        }),
        "no scored frame on /api/cameras; log:\n{}",
        d.log()
    );
}

fn stats(addr: SocketAddr) -> serde_json::Value {
    get(addr, "/api/stats").json()
}

fn is_jpeg(b: &[u8]) -> bool {
    b.len() > 100 && b.starts_with(&[0xFF, 0xD8]) && b.ends_with(&[0xFF, 0xD9])
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_jpeg_is_encoded_without_a_viewer_and_a_viewer_gets_changing_overlaid_frames() {
    let (_broker, d, addr) = start("gallery_count = 0", &sim_camera("sim", 0.5)).await;
    tokio::task::spawn_blocking(move || {
        wait_scored(addr, &d);
        std::thread::sleep(Duration::from_secs(1));
        let s = stats(addr);
        assert!(s["offered"].as_u64().unwrap_or(0) >= 5, "{s}");
        assert_eq!(s["live_encodes"], 0, "encoded with nobody watching: {s}");
        assert_eq!(s["copied"], 0, "copied frames with nobody watching: {s}");

        let a = get(addr, "/live/sim/frame.jpg");
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.header("content-type").as_deref(), Some("image/jpeg"));
        assert!(is_jpeg(&a.body));
        std::thread::sleep(Duration::from_millis(300));
        let b = get(addr, "/live/sim/frame.jpg");
        assert!(is_jpeg(&b.body));
        assert_ne!(a.body, b.body, "two live frames 300 ms apart are identical");
        let img = image::load_from_memory(&a.body).expect("decodes");
        // The sim camera is 160x120: not upscaled.
        assert_eq!((img.width(), img.height()), (160, 120));
        let watched = stats(addr);
        assert!(
            watched["live_encodes"].as_u64().unwrap_or(0) >= 2,
            "{watched}"
        );
        // At most max_fps (5) encodes per second while watched.
        // The lease (3 s) runs out: encoding stops.
        std::thread::sleep(Duration::from_secs(5));
        let before = stats(addr)["live_encodes"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_secs(2));
        let after = stats(addr);
        assert_eq!(
            after["live_encodes"].as_u64().unwrap_or(0),
            before,
            "{after}"
        );
        assert_eq!(after["viewers"], 0, "{after}");
        assert!(
            !d.log().contains("panicked"),
            "daemon log has a panic:\n{}",
            d.log()
        );
    })
    .await
    .expect("test thread");
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listens_when_http_is_absent() {
    let broker = Broker::start(None).await;
    let d = Daemon::start(&config("nohttp", broker.port, &sim_camera("sim", 0.5)));
    tokio::task::spawn_blocking(move || {
        assert!(
            common::wait_until(Duration::from_secs(30), || d
                .log()
                .contains("anomalyclip-edge running")),
            "daemon did not start; log:\n{}",
            d.log()
        );
        let listening = listening_sockets(d.pid());
        assert!(
            listening.is_empty(),
            "the daemon listens on {listening:?} without [http]"
        );
        assert!(!d.log().contains("live view listening"), "{}", d.log());
    })
    .await
    .expect("test thread");
}

/// The TCP ports process `pid` listens on (its socket inodes matched against /proc/net/tcp*).
pub(crate) fn listening_sockets(pid: i32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A = LISTEN), inode
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                out.push(f[1].to_owned());
            }
        }
    }
    out
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_bind_without_a_token_refuses_to_start() {
    let port = free_port();
    let text = http_first(
        &config("lan", 1, &sim_camera("sim", 0.5)),
        &format!("listen = \"0.0.0.0:{port}\""),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).expect("config");
    let out = std::process::Command::new(BIN)
        .args(["check-config"])
        .arg(&path)
        .output()
        .expect("check-config");
    let stdout =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("http.listen") && stdout.contains("token_file"),
        "check-config does not say why: {stdout}"
    );
    let mut d = Daemon::start(&text);
    let status = d.wait_exit().await;
    assert_eq!(status.code(), Some(2), "log:\n{}", d.log());
    assert!(d.log().contains("http.token_file"), "{}", d.log());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on {port}"
    );
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_protects_every_page_and_is_never_logged() {
    let token = "correct-horse-battery-staple-42";
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    let (_broker, d, addr) = start(
        &format!("token_file = {:?}", token_file.display().to_string()),
        &sim_camera("sim", 0.5),
    )
    .await;
    tokio::task::spawn_blocking(move || {
        for path in ["/", "/api/cameras", "/live/sim/frame.jpg", "/gallery/sim"] {
            let r = get(addr, path);
            assert_eq!(r.status, 401, "{path} without a token: {}", r.text());
            assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
            let r = request(
                addr,
                "GET",
                path,
                &[("Authorization", "Bearer wrong-token-of-some-length")],
                b"",
            );
            assert_eq!(r.status, 401, "{path} with a wrong token");
        }
        let good = format!("Bearer {token}");
        let r = request(
            addr,
            "GET",
            "/api/cameras",
            &[("Authorization", &good)],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()[0]["name"], "sim");
        // The login page is open; a wrong token gets no cookie, the right one does.
        assert_eq!(get(addr, "/login").status, 200);
        let form = [("Content-Type", "application/x-www-form-urlencoded")];
        let r = request(addr, "POST", "/login", &form, b"token=nope");
        assert_eq!(r.status, 401);
        assert!(r.header("set-cookie").is_none());
        let body = format!("token={}", token.replace('-', "%2D"));
        let r = request(addr, "POST", "/login", &form, body.as_bytes());
        assert_eq!(r.status, 303, "{}", r.text());
        let cookie = r.header("set-cookie").expect("session cookie");
        assert!(
            cookie.contains("HttpOnly") && !cookie.contains(token),
            "{cookie}"
        );
        let session = cookie.split(';').next().expect("cookie").to_owned();
        let r = request(addr, "GET", "/", &[("Cookie", &session)], b"");
        assert_eq!(r.status, 200);
        assert!(r.text().contains("/live/sim"), "{}", r.text());
        let forged = "ace_session=00000000000000000000000000000000000000000000000000000000000000ff";
        assert_eq!(
            request(addr, "GET", "/", &[("Cookie", forged)], b"").status,
            401
        );
        // Oversized bodies are refused.
        let big = vec![b'a'; 64 << 10];
        assert_eq!(request(addr, "POST", "/login", &form, &big).status, 413);
        assert!(!d.log().contains(token), "the token is in the log");
    })
    .await
    .expect("test thread");
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_and_unknown_names_are_404_and_ng_frames_land_in_a_bounded_gallery() {
    // Threshold 0: every frame is NG, so the gallery fills (one frame per second at most).
    let (_broker, d, addr) = start("gallery_count = 2", &sim_camera("sim", 0.0)).await;
    let state = d.dir.path().join("state");
    std::fs::write(d.dir.path().join("secret.txt"), "do-not-serve").expect("secret");
    tokio::task::spawn_blocking(move || {
        wait_scored(addr, &d);
        for target in [
            "/gallery/sim/../../secret.txt",
            "/gallery/sim/..%2F..%2Fsecret.txt",
            "/gallery/sim/%2e%2e%2f%2e%2e%2fsecret.txt",
            "/gallery/..%2F..%2F/secret.txt",
            "/gallery/sim/.%2e/config.toml",
            "/live/..%2Fconfig.toml",
            "/live/nosuchcamera",
            "/live/nosuchcamera/frame.jpg",
            "/static/../config.toml",
            "/../secret.txt",
            "/gallery/sim/1-2.jpg",
        ] {
            let r = get(addr, target);
            assert_eq!(r.status, 404, "{target}: {} {}", r.status, r.text());
            assert!(!r.text().contains("do-not-serve"), "{target}");
        }
        let dir = state.join("gallery/sim");
        assert!(
            common::wait_until(Duration::from_secs(15), || count_jpg(&dir) >= 2),
            "gallery did not fill; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            count_jpg(&dir) <= 2,
            "gallery over its bound: {}",
            count_jpg(&dir)
        );
        let page = get(addr, "/gallery/sim");
        assert_eq!(page.status, 200);
        let name = page
            .text()
            .split("/gallery/sim/")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(str::to_owned)
            .expect("a gallery link");
        let r = get(addr, &format!("/gallery/sim/{name}"));
        assert_eq!(r.status, 200, "{name}");
        assert!(is_jpeg(&r.body));
        assert!(
            r.header("content-disposition")
                .is_some_and(|v| v.contains("attachment"))
        );
    })
    .await
    .expect("test thread");
}

fn count_jpg(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jpg"))
                .count()
        })
        .unwrap_or(0)
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_never_reads_does_not_slow_scoring() {
    // 640x480 frames at 10 fps, JPEGs at full width: the stream fills a socket that is never
    // read within seconds.
    let cam = sim_camera("sim", 0.5).replace("width=160,height=120", "width=640,height=480");
    let (_broker, d, addr) = start("gallery_count = 0\nmax_width = 640\nmax_fps = 10", &cam).await;
    tokio::task::spawn_blocking(move || {
        wait_scored(addr, &d);
        let offered = || stats(addr)["offered"].as_u64().unwrap_or(0);
        let t0 = (Instant::now(), offered());
        std::thread::sleep(Duration::from_secs(4));
        let base_rate = (offered() - t0.1) as f64 / t0.0.elapsed().as_secs_f64();

        let mut stuck = TcpStream::connect(addr).expect("connect");
        stuck
            .write_all(
                format!("GET /live/sim/stream.mjpeg HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
            )
            .expect("send");
        // Never read from `stuck`.
        assert!(
            common::wait_until(Duration::from_secs(5), || stats(addr)["viewers"] == 1),
            "stream not counted as a viewer"
        );
        let t1 = (Instant::now(), offered());
        std::thread::sleep(Duration::from_secs(6));
        let stuck_rate = (offered() - t1.1) as f64 / t1.0.elapsed().as_secs_f64();
        let s = stats(addr);
        assert!(s["live_encodes"].as_u64().unwrap_or(0) > 20, "{s}");
        assert!(
            stuck_rate >= 0.8 * base_rate,
            "scoring slowed from {base_rate:.1} to {stuck_rate:.1} frames/s with a stuck viewer"
        );
        // Other viewers are still served.
        let r = get(addr, "/live/sim/frame.jpg");
        assert_eq!(r.status, 200);
        drop(stuck);
        assert!(
            common::wait_until(Duration::from_secs(15), || stats(addr)["viewers"] == 0),
            "the closed stream is still counted as a viewer: {}",
            stats(addr)
        );
    })
    .await
    .expect("test thread");
}

/// Where the browser test leaves its screenshot.
fn artifact_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts")
}

fn chromium(args: &[&str], profile: &Path) -> std::process::Output {
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args);
    let out = cmd.output().expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[cfg_attr(
    not(have_chromium),
    ignore = "needs Debian's chromium package: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_lists_the_camera_and_sees_the_live_view_change() {
    let (_broker, d, addr) = start("gallery_count = 0", &sim_camera("sim", 0.5)).await;
    tokio::task::spawn_blocking(move || {
        wait_scored(addr, &d);
        let profile = tempfile::tempdir().expect("profile");
        let dom = chromium(
            &[
                "--virtual-time-budget=3000",
                "--dump-dom",
                &format!("http://{addr}/"),
            ],
            profile.path(),
        );
        let dom = String::from_utf8_lossy(&dom.stdout);
        assert!(
            dom.contains("href=\"/live/sim\""),
            "overview lists no camera: {dom}"
        );
        assert!(
            dom.contains("online"),
            "camera not online in the overview: {dom}"
        );

        std::fs::create_dir_all(artifact_dir()).expect("artifact dir");
        let shot = |name: &str| {
            let path = artifact_dir().join(name);
            let _ = std::fs::remove_file(&path);
            chromium(
                &[
                    "--window-size=640,480",
                    "--virtual-time-budget=2000",
                    &format!("--screenshot={}", path.display()),
                    &format!("http://{addr}/live/sim"),
                ],
                profile.path(),
            );
            std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
        };
        let a = shot("live-view-1.png");
        std::thread::sleep(Duration::from_millis(700));
        let b = shot("live-view.png");
        let (ia, ib) = (
            image::load_from_memory(&a).expect("png").to_rgb8(),
            image::load_from_memory(&b).expect("png").to_rgb8(),
        );
        assert_eq!(ia.dimensions(), ib.dimensions());
        let differing = ia.pixels().zip(ib.pixels()).filter(|(p, q)| p != q).count();
        assert!(
            differing > 500,
            "the live view did not change between two screenshots ({differing} pixels differ)"
        );
        eprintln!(
            "screenshot: {}",
            artifact_dir().join("live-view.png").display()
        );
    })
    .await
    .expect("test thread");
}

// ---------------------------------------------------------------------------------------------
// Region editor

fn post_json(addr: SocketAddr, target: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(extra);
    request(addr, "POST", target, &h, body.as_bytes())
}

/// `check-config` on the daemon's config file, as the plant engineer would run it.
fn check_config_ok(d: &Daemon) {
    let o = std::process::Command::new(BIN)
        .args(["check-config", "config.toml"])
        .current_dir(d.dir.path())
        .output()
        .expect("run check-config");
    assert!(
        o.status.success(),
        "check-config refuses the edited file: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_editor_writes_only_checked_edits_and_the_daemon_reloads_them() {
    let (broker, d, addr) = start("gallery_count = 0", &sim_camera("sim", 0.5)).await;
    let mut plc = common::broker::Watcher::start(broker.port, "anomalyclip/live/sim/#").await;
    let cfg = d.config_path();
    let original = std::fs::read(&cfg).expect("config");
    let api = "/api/regions/sim";
    let (base, first) = tokio::task::block_in_place(|| {
        wait_scored(addr, &d);
        let r = get(addr, api);
        assert_eq!(r.status, 200, "{}", r.text());
        (
            r.json()["base"].as_str().expect("base").to_owned(),
            r.json(),
        )
    });
    assert_eq!(first["regions"], serde_json::json!([]));
    assert_eq!(first["editable"], true);
    assert_eq!(
        first["frame"],
        serde_json::json!({"width": 160, "height": 120})
    );

    let good = |base: &str| {
        serde_json::json!({"base": base, "regions": [{"name": "left", "rect": [0.0, 0.0, 0.5, 1.0],
            "ignore": [[[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]]}]})
        .to_string()
    };
    tokio::task::block_in_place(|| {
        let unchanged = |what: &str| {
            assert_eq!(
                std::fs::read(&cfg).expect("config"),
                original,
                "{what} changed the config file"
            );
        };
        // A page of another site posting to this loopback server.
        let r = post_json(
            addr,
            api,
            &good(&base),
            &[("Origin", "http://evil.example")],
        );
        assert_eq!(r.status, 403, "{}", r.text());
        let r = post_json(addr, api, &good(&base), &[("Sec-Fetch-Site", "cross-site")]);
        assert_eq!(r.status, 403, "{}", r.text());
        // A form post cannot be JSON.
        let r = request(
            addr,
            "POST",
            api,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            good(&base).as_bytes(),
        );
        assert_eq!(r.status, 415, "{}", r.text());
        let r = post_json(addr, api, "{\"base\": 1", &[]);
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            r.json()["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("bad request"))
        );
        let r = post_json(addr, api, &good("0000"), &[]);
        assert_eq!(r.status, 409, "{}", r.text());
        unchanged("refused requests");
        // What check-config refuses: a rectangle past the frame, a reserved name.
        for (name, rect, needle) in [
            ("right", [0.5, 0.5, 0.7, 0.2], "rect"),
            ("status", [0.0, 0.0, 0.5, 0.5], "status"),
        ] {
            let body = serde_json::json!({"base": base, "regions": [{"name": name, "rect": rect}]});
            let r = post_json(addr, api, &body.to_string(), &[]);
            assert_eq!(r.status, 422, "{}", r.text());
            let problems = r.json()["problems"].clone();
            let first = problems[0].as_str().unwrap_or("");
            assert!(
                first.starts_with(&format!("{}:", cfg.display()))
                    || first.starts_with("config.toml:"),
                "a problem names the file: {problems}"
            );
            assert!(
                problems.to_string().contains(needle),
                "{needle} not in {problems}"
            );
            unchanged("an edit refused by the checks");
        }
        let r = post_json(addr, api, &good(&base), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        let text = std::fs::read_to_string(&cfg).expect("config");
        // Everything else is as it was: the original text is a prefix-wise subset of the new.
        for line in String::from_utf8_lossy(&original).lines() {
            assert!(text.contains(line), "lost line {line:?}:\n{text}");
        }
        assert!(
            text.contains("[[camera.region]]\nname = \"left\""),
            "{text}"
        );
        check_config_ok(&d);
        // A second edit made on the same (now stale) view of the file: refused, not merged.
        let r = post_json(addr, api, &good(&base), &[]);
        assert_eq!(r.status, 409, "{}", r.text());
        // An oversized body.
        let big = format!(
            "{{\"base\": \"{}\", \"regions\": []}}",
            "x".repeat(70 << 10)
        );
        assert_eq!(post_json(addr, api, &big, &[]).status, 413);
        let backup = d.dir.path().join("state/live/config.previous.toml");
        assert_eq!(
            std::fs::read(&backup).expect("previous config kept"),
            original
        );
    });
    // The daemon reloaded the file: the region publishes its own results.
    let m = plc.next_on("anomalyclip/live/sim/left/result").await;
    assert_eq!(m.json()["region"], "left", "{}", m.describe());
    // A camera with regions still has a live frame (its regions drawn on it).
    tokio::task::block_in_place(|| {
        let r = get(addr, "/live/sim/frame.jpg");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(is_jpeg(&r.body));
    });

    // Rename and move, keeping its keys; then the page's view of the file follows.
    tokio::task::block_in_place(|| {
        let now = get(addr, api).json();
        assert_ne!(now["base"], base.as_str());
        assert_eq!(now["regions"][0]["name"], "left");
        let body = serde_json::json!({"base": now["base"], "regions": [
            {"name": "left2", "from": "left"},
            {"name": "right", "rect": [0.5, 0.25, 0.5, 0.75]}]});
        let r = post_json(addr, api, &body.to_string(), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        let regions = get(addr, api).json()["regions"].clone();
        assert_eq!(regions[0]["name"], "left2");
        assert_eq!(regions[0]["rect"], serde_json::json!([0.0, 0.0, 0.5, 1.0]));
        assert_eq!(regions[0]["ignore"][0][2], serde_json::json!([0.2, 0.2]));
        assert_eq!(
            regions[1]["rect"],
            serde_json::json!([0.5, 0.25, 0.5, 0.75])
        );
        check_config_ok(&d);
    });
    plc.next_on("anomalyclip/live/sim/right/result").await;
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_edit_config_off_the_editor_is_read_only() {
    let (_broker, d, addr) = start("edit_config = false", &sim_camera("sim", 0.5)).await;
    tokio::task::block_in_place(|| {
        wait_scored(addr, &d);
        let before = std::fs::read(d.config_path()).expect("config");
        let r = get(addr, "/api/regions/sim");
        assert_eq!(r.json()["editable"], false);
        let body = serde_json::json!({"base": r.json()["base"],
            "regions": [{"name": "a", "rect": [0.0, 0.0, 0.5, 0.5]}]});
        let r = post_json(addr, "/api/regions/sim", &body.to_string(), &[]);
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(r.text().contains("edit_config"), "{}", r.text());
        assert_eq!(std::fs::read(d.config_path()).expect("config"), before);
        assert_eq!(get(addr, "/api/regions/nope").status, 404);
    });
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[cfg_attr(
    not(have_chromium),
    ignore = "needs Debian's chromium package: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_drawn_with_the_mouse_in_a_real_browser_lands_in_the_config_and_on_mqtt() {
    let (broker, d, addr) = start("gallery_count = 0", &sim_camera("sim", 0.5)).await;
    let mut plc = common::broker::Watcher::start(broker.port, "anomalyclip/live/sim/#").await;
    let rect = tokio::task::block_in_place(|| {
        wait_scored(addr, &d);
        let mut b = common::cdp::Browser::start(1100, 800);
        b.navigate(&format!("http://{addr}/regions/sim"));
        b.wait_for(
            "window.EDITOR_READY === true && document.getElementById('frame').naturalWidth > 0",
            Duration::from_secs(30),
        );
        // A point at fractions (x, y) of the frame, in viewport pixels (after any scrolling).
        let at = |b: &mut common::cdp::Browser, x: f64, y: f64| {
            let r = b.eval(
                "(() => { const r = document.getElementById('frame').getBoundingClientRect(); \
                 return [r.left, r.top, r.width, r.height]; })()",
            );
            let [l, t, w, h] = [0, 1, 2, 3].map(|k| r[k].as_f64().expect("rect"));
            assert!(w > 100.0 && h > 50.0, "frame shown at {w}x{h}");
            (l + x * w, t + y * h)
        };
        // Draw from 10 %/20 % to 60 %/80 % of the frame with the mouse.
        let (from, to) = (at(&mut b, 0.1, 0.2), at(&mut b, 0.6, 0.8));
        b.drag(from, to);
        b.wait_for(
            "document.getElementById('list').textContent.includes('region-1')",
            Duration::from_secs(5),
        );
        // Move it right by 10 % of the frame, then add an ignore polygon inside it.
        let (from, to) = (at(&mut b, 0.35, 0.5), at(&mut b, 0.45, 0.5));
        b.drag(from, to);
        let poly = b.centre_of("#poly");
        b.click(poly);
        for (x, y) in [(0.3, 0.3), (0.4, 0.3), (0.4, 0.4)] {
            let p = at(&mut b, x, y);
            b.click(p);
        }
        let done = b.centre_of("#polydone");
        b.click(done);
        b.wait_for(
            "document.getElementById('list').textContent.includes('1 ignore polygon')",
            Duration::from_secs(5),
        );
        let save = b.centre_of("#save");
        b.click(save);
        let status = b.wait_for(
            "(() => { const s = document.getElementById('status').textContent; \
             return s.startsWith('saved') || s.startsWith('HTTP') || \
             document.getElementById('problems').textContent ? s + ' ' + \
             document.getElementById('problems').textContent : ''; })()",
            Duration::from_secs(30),
        );
        assert!(
            status.as_str().is_some_and(|s| s.starts_with("saved")),
            "save failed: {status}"
        );
        let text = std::fs::read_to_string(d.config_path()).expect("config");
        let regions = anomalyclip_edge::live::editor::regions_of(&text, "sim").expect("regions");
        assert_eq!(regions.len(), 1, "{text}");
        assert_eq!(regions[0].name, "region-1");
        check_config_ok(&d);
        // A screenshot of the editor with the saved region, as a test artifact.
        std::fs::create_dir_all(artifact_dir()).expect("artifact dir");
        let path = artifact_dir().join("region-editor.png");
        b.eval("window.scrollTo(0, 0); true");
        let png = b.screenshot();
        let shot = image::load_from_memory(&png).expect("a PNG screenshot");
        assert_eq!((shot.width(), shot.height()), (1100, 800));
        std::fs::write(&path, &png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        (
            regions[0].rect.expect("rect in fractions"),
            regions[0].ignore.clone(),
        )
    });
    let (rect, ignore) = rect;
    // One screen pixel of a 640 px wide frame is 0.0016 of it.
    for (got, want) in rect.iter().zip([0.2, 0.2, 0.5, 0.6]) {
        assert!(
            (got - want).abs() < 0.01,
            "drawn and moved {rect:?}, expected ≈ [0.2, 0.2, 0.5, 0.6]"
        );
    }
    assert_eq!(ignore.len(), 1, "{ignore:?}");
    for (got, want) in ignore[0].iter().zip([[0.3, 0.3], [0.4, 0.3], [0.4, 0.4]]) {
        assert!(
            (got[0] - want[0]).abs() < 0.01 && (got[1] - want[1]).abs() < 0.01,
            "polygon {ignore:?}"
        );
    }
    let m = plc.next_on("anomalyclip/live/sim/region-1/result").await;
    assert_eq!(m.json()["region"], "region-1", "{}", m.describe());
}

// ---------------------------------------------------------------------------------------------
// Calibration from the page

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[cfg_attr(
    not(have_chromium),
    ignore = "needs Debian's chromium package: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibration_captured_and_accepted_in_a_real_browser_is_what_the_camera_decides_with() {
    let camera = sim_camera("sim", 0.5).replace("threshold = 0.5\n", "calibration = true\n");
    assert!(camera.contains("calibration = true"));
    let (broker, d, addr) = start("gallery_count = 0", &camera).await;
    let mut plc =
        common::broker::Watcher::start(broker.port, "anomalyclip/live/sim/calibration").await;
    let first = plc.next_on("anomalyclip/live/sim/calibration").await;
    assert_eq!(
        first.json()["state"],
        "uncalibrated",
        "{}",
        first.describe()
    );
    let id = tokio::task::block_in_place(|| {
        wait_scored(addr, &d);
        let api = "/api/calibration/sim";
        // Refusals: bad options, another site's page, nothing to accept.
        let start_body = |frames: usize| {
            serde_json::json!({"frames": frames, "rate": 0.05, "min_interval_ms": 0}).to_string()
        };
        let r = post_json(addr, &format!("{api}/start"), &start_body(5), &[]);
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("frames 5"), "{}", r.text());
        let r = post_json(
            addr,
            &format!("{api}/start"),
            &start_body(20),
            &[("Origin", "http://evil.example")],
        );
        assert_eq!(r.status, 403, "{}", r.text());
        let r = post_json(addr, &format!("{api}/accept"), "{}", &[]);
        assert_eq!(r.status, 409, "{}", r.text());
        assert_eq!(get(addr, api).json()["state"], "idle");

        let mut b = common::cdp::Browser::start(1000, 900);
        b.navigate(&format!("http://{addr}/calibrate/sim"));
        b.wait_for("window.CALIBRATE_READY === true", Duration::from_secs(30));
        b.eval(
            "document.getElementById('frames').value = 20; \
             document.getElementById('rate').value = 0.05; \
             document.getElementById('interval').value = 0; true",
        );
        let go = b.centre_of("#go");
        b.click(go);
        let progress = b.wait_for(
            "(() => { const t = document.getElementById('progress').textContent; \
             return t.startsWith('done') || t.startsWith('capture failed') ? t : ''; })()",
            Duration::from_secs(60),
        );
        assert!(
            progress.as_str().is_some_and(|t| t.starts_with("done: 20")),
            "{progress}"
        );
        let bars = b.eval("document.querySelectorAll('#hist rect').length");
        assert_eq!(
            bars.as_u64(),
            Some(anomalyclip_edge::calibration::HIST_BINS as u64),
            "one bar per histogram bin"
        );
        let t2 = b.eval("document.getElementById('numbers').textContent");
        assert!(
            t2.as_str()
                .is_some_and(|t| t.contains("T2 (NG at or above)")),
            "{t2}"
        );
        let accept = b.centre_of("#accept");
        b.click(accept);
        let result = b.wait_for(
            "document.getElementById('result').textContent",
            Duration::from_secs(20),
        );
        let text = result.as_str().unwrap_or("").to_owned();
        assert!(text.starts_with("saved calibration "), "{text}");
        text.split_whitespace().nth(2).unwrap_or("").to_owned()
    });
    let file = d.dir.path().join("state/calibration/sim/_frame.json");
    let cal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("calibration file")).expect("json");
    assert_eq!(cal["id"], id.as_str());
    assert_eq!(cal["stats"]["n"], 20);
    assert_eq!(cal["source"], "camera");
    // The daemon reloaded and decides with it.
    let m = plc
        .until(|m| m.topic.ends_with("/calibration") && m.json()["state"] == "calibrated")
        .await;
    assert_eq!(m.json()["id"], id.as_str(), "{}", m.describe());
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[cfg_attr(
    not(have_chromium),
    ignore = "needs Debian's chromium package: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_shot_bank_captured_in_a_real_browser_is_what_the_camera_then_scores_with() {
    let camera =
        sim_camera("sim", 0.5).replace("threshold = 0.5\n", "threshold = 0.5\nreference = true\n");
    assert!(camera.contains("reference = true"));
    let (broker, d, addr) = start("gallery_count = 0", &camera).await;
    let mut plc =
        common::broker::Watcher::start(broker.port, "anomalyclip/live/sim/calibration").await;
    // No bank yet: the camera decides nothing (UNKNOWN), and says why.
    let first = plc.next_on("anomalyclip/live/sim/calibration").await;
    assert_eq!(
        first.json()["state"],
        "uncalibrated",
        "{}",
        first.describe()
    );
    assert!(
        first.json()["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("reference:")),
        "{}",
        first.describe()
    );
    tokio::task::block_in_place(|| {
        wait_scored(addr, &d);
        let r = post_json(
            addr,
            "/api/calibration/sim/reference-start",
            &serde_json::json!({"frames": 17}).to_string(),
            &[],
        );
        assert_eq!(r.status, 400, "{}", r.text());
        let mut b = common::cdp::Browser::start(1000, 1400);
        b.navigate(&format!("http://{addr}/calibrate/sim"));
        b.wait_for("window.CALIBRATE_READY === true", Duration::from_secs(30));
        b.eval(
            "document.getElementById('refk').value = 2; \
             document.getElementById('refinterval').value = 0; true",
        );
        let go = b.centre_of("#refgo");
        b.click(go);
        // Built, failed, or refused at the start (an error line in red): whichever comes, the
        // assertion below shows it.
        let progress = b.wait_for(
            "(() => { const e = document.getElementById('refprogress'); const t = e.textContent; \
             return t.startsWith('built') || t.startsWith('failed') || e.className.includes('bad') \
             ? t : ''; })()",
            Duration::from_secs(60),
        );
        assert!(
            progress
                .as_str()
                .is_some_and(|t| t.starts_with("built: K = 2")),
            "{progress}"
        );
        let accept = b.centre_of("#refaccept");
        b.click(accept);
        let result = b.wait_for(
            "document.getElementById('refresult').textContent",
            Duration::from_secs(20),
        );
        assert!(
            result
                .as_str()
                .is_some_and(|t| t.starts_with("saved bank sha256:")),
            "{result}"
        );
    });
    let bank = d.dir.path().join("state/reference/sim/_frame.bank");
    assert!(bank.is_file(), "no bank at {}", bank.display());
    // The reload loaded it: the camera decides with its hand-set threshold again.
    let m = plc.until(|m| m.json()["state"] == "manual").await;
    assert_eq!(m.json()["state"], "manual", "{}", m.describe());
    assert!(
        d.log().contains("few-shot reference bank loaded"),
        "the daemon did not load the bank:\n{}",
        d.log()
    );
}
