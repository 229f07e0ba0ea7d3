//! The real `anomalyclip-edge` binary as a child process, for the daemon integration tests.
//!
//! [`Daemon`] writes the config a test gives it into its own temporary directory (with the
//! state directory beside it), starts `anomalyclip-edge run --config …` with its log (stderr)
//! in a file, and SIGKILLs it by PID on drop. Every daemon gets a fake systemd notify socket
//! ([`NotifySocket`]: a Unix datagram socket bound by the test, passed as `NOTIFY_SOCKET`), so a
//! test knows when start-up is over (`READY=1`) before it sends signals. Every wait is bounded.

#![allow(dead_code)] // Each test binary uses a different part of the helpers.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::broker::WAIT;

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

/// The committed tiny random-weight model package.
pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// `ORT_DYLIB_PATH` for the child: the caller's, else the one `scripts/setup` installs.
fn ort_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/onnxruntime/lib/libonnxruntime.so");
    p.exists().then_some(p)
}

/// The log filter every test daemon runs with (the tests read `info` lines).
pub const LOG_FILTER: &str = "warn,anomalyclip_edge=info";

// ---------------------------------------------------------------------------------------------
// Config text
// ---------------------------------------------------------------------------------------------

/// A config for the tiny model on the CPU, publishing to 127.0.0.1:`port` with fast reconnects
/// and stats every second; `cameras` is appended as is (`[[camera]]` tables).
pub fn config(node_id: &str, port: u16, cameras: &str) -> String {
    format!(
        "node_id = \"{node_id}\"\n\
         state_dir = \"state\"\n\
         stats_interval_s = 1\n\
         [model]\n\
         package = \"{model}\"\n\
         [engine]\n\
         backend = \"cpu\"\n\
         threads = 1\n\
         max_batch = 4\n\
         max_wait_ms = 5\n\
         [mqtt]\n\
         host = \"127.0.0.1\"\n\
         port = {port}\n\
         keep_alive_s = 5\n\
         reconnect_min_ms = 100\n\
         reconnect_max_ms = 500\n\
         {cameras}",
        model = tiny_model().display(),
    )
}

/// A `[[camera]]` named `gate` reading the RTSP camera at `url`, without masks, retrying
/// every 100–200 ms (so a restarted camera is back within a fraction of a second).
pub fn rtsp_gate_camera(url: &str) -> String {
    format!(
        "[[camera]]\nname = \"gate\"\nuri = \"{url}\"\n[camera.mask]\nenabled = false\n\
         [camera.retry]\ninitial_ms = 100\nmax_ms = 200\n"
    )
}

/// A `[[camera]]` table with a simulated camera (`videotestsrc`, live, 10 fps), threshold
/// `threshold`, an alarm that raises on one anomalous frame and clears on one normal frame, and
/// masks for every frame (32×32, no rate limit).
pub fn sim_camera(name: &str, threshold: f32) -> String {
    format!(
        "[[camera]]\n\
         name = \"{name}\"\n\
         pipeline = \"videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1 ! appsink name=sink\"\n\
         threshold = {threshold:?}\n\
         [camera.alarm]\n\
         raise_count = 1\n\
         raise_window = 1\n\
         clear_count = 1\n\
         [camera.mask]\n\
         size = 32\n\
         only_on_anomaly = false\n\
         min_interval_ms = 0\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Fake systemd notify socket
// ---------------------------------------------------------------------------------------------

/// One `sd_notify` datagram: when it arrived and its `KEY=value` lines.
#[derive(Debug, Clone)]
pub struct Note {
    pub at: Instant,
    /// Wall clock at arrival, to compare with the daemon's log timestamps.
    pub wall: SystemTime,
    pub lines: Vec<String>,
}

impl Note {
    pub fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

/// A Unix datagram socket standing in for systemd's notify socket; a thread records every
/// datagram.
pub struct NotifySocket {
    pub path: PathBuf,
    notes: Arc<Mutex<Vec<Note>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NotifySocket {
    pub fn bind(path: PathBuf) -> Self {
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let notes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let notes = notes.clone();
            let stop = stop.clone();
            move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        notes.lock().unwrap_or_else(|e| e.into_inner()).push(Note {
                            at: Instant::now(),
                            wall: SystemTime::now(),
                            lines: text.lines().map(str::to_owned).collect(),
                        });
                    }
                }
            }
        });
        Self {
            path,
            notes,
            stop,
            thread: Some(thread),
        }
    }

    /// Every datagram so far, in order.
    pub fn notes(&self) -> Vec<Note> {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Datagrams containing `line` (e.g. `WATCHDOG=1`).
    pub fn with(&self, line: &str) -> Vec<Note> {
        self.notes().into_iter().filter(|n| n.has(line)).collect()
    }

    /// Waits until `count` datagrams contain `line`; returns the last of them.
    pub async fn wait_for(&self, line: &str, count: usize) -> Note {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.with(line);
            if got.len() >= count {
                return got[count - 1].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {count}× {line:?} on the notify socket within {WAIT:?}; got:\n{:#?}",
                self.notes()
                    .iter()
                    .map(|n| n.lines.join(" "))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Daemon guard
// ---------------------------------------------------------------------------------------------

/// A running `anomalyclip-edge run`, SIGKILLed on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Holds `config.toml`, `daemon.log`, `notify.sock` and the state directory `state/`.
    pub dir: tempfile::TempDir,
    pub notify: NotifySocket,
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Starts the daemon on `config_text` (relative paths in it are relative to its directory).
    pub fn start(config_text: &str) -> Daemon {
        Self::start_with_env(config_text, &[])
    }

    /// Same, with extra environment variables for the child.
    pub fn start_with_env(config_text: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let notify = NotifySocket::bind(dir.path().join("notify.sock"));
        let mut d = Daemon {
            child: None,
            dir,
            notify,
            exit: None,
        };
        d.write_config(config_text);
        let log = std::fs::File::create(d.log_path()).expect("daemon log");
        let mut cmd = Command::new(BIN);
        cmd.args(["--log", LOG_FILTER, "run", "--config", "config.toml"])
            .current_dir(d.dir.path())
            .env("NOTIFY_SOCKET", &d.notify.path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove(anomalyclip_edge::daemon::STALL_FILE_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if let Some(ort) = ort_library() {
            cmd.env("ORT_DYLIB_PATH", ort);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        d.child = Some(cmd.spawn().expect("spawn anomalyclip-edge"));
        d
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Replaces the config file atomically (write + rename), as an editor or a deployment would.
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join("config.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("daemon was started")
    }

    /// Sends a signal (`libc::SIGHUP`, `SIGTERM`, `SIGKILL`…).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped (we hold the
        // `Child` and only wait for it in `wait_exit`/drop), so the PID can not be reused.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Lines of the log containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until at least `count` log lines contain all of `needles`; returns them.
    pub async fn wait_log(&mut self, needles: &[&str], count: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = self.log_lines(needles);
            if lines.len() >= count {
                return lines;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "daemon exited ({status}) before logging {count}× {needles:?}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not log {count}× {needles:?} within {WAIT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The wall-clock time of the first log line containing `needle` (tracing's RFC 3339 UTC
    /// timestamp at the start of the line).
    pub fn log_time(&self, needle: &str) -> Option<SystemTime> {
        let log = self.log();
        let line = log.lines().find(|l| l.contains(needle))?;
        parse_rfc3339_utc(line.split_whitespace().next()?)
    }

    /// Waits for `READY=1` (start-up over: model loaded, cameras started, signals handled).
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.notify.with("READY=1").is_empty() {
            if let Some(status) = self.try_exit() {
                panic!(
                    "daemon exited ({status}) during start-up; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no READY=1 within {WAIT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status if the daemon has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            self.exit = Some(status);
        }
        self.exit
    }

    /// Waits (bounded) for the daemon to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {WAIT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails with the log if the daemon is not running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exit() {
            panic!("daemon exited ({status}); log:\n{}", self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.exit.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}", self.log());
        }
    }
}

/// `2026-11-27T13:10:51.729586Z` → SystemTime (UTC, any fraction length).
pub fn parse_rfc3339_utc(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    let nanos: u64 = format!("{frac:0<9}")[..9].parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}
