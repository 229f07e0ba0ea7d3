//! The hostile-input suite (issue 11 item 7): the real `anomalyclip-edge` binary against bad
//! config files, model packages, images, datasets, state files, command lines and signals.
//!
//! Input: a table of cases ([`cases`]), each = a family, a name, a setup that writes the hostile
//! input into the case's own temporary directory and returns the command line, the exit class
//! the product SHOULD give (issue 11: 0 ok, 1 some items failed, 2 bad usage/config/model, or
//! only "no panic, no hang") and message fragments that must appear on stderr or stdout.
//! Output: one line per failing or pending case and a summary line (cases, passed, pending,
//! failed, skipped, per family); the test fails when a case that is not `pending` fails.
//!
//! Every run is bounded: a child that outlives its timeout is SIGKILLed and the case fails as a
//! hang; children run with an address-space limit ([`MEMORY_LIMIT`]) so that a read of
//! `/dev/zero` fails instead of eating the machine. Always a failure, whatever the case expects:
//! a death by signal, exit 101 or `panicked at` (a panic), `NaN`/`inf` or `null` for a number in
//! a JSON line on stdout, running out of memory (an unbounded read), and the sentinel password
//! ([`SECRET`]) anywhere in stdout or stderr.
//!
//! `pending` marks a case whose correct expectation fails today because of a known fault that
//! another change is fixing ("known: …") or a fault this suite found ("new: …"): its failure
//! prints `PENDING (known fault): …` instead of failing the test. A pending case that passes is
//! reported so that its flag can be removed.
//!
//! The binary is `$ANOMALYCLIP_BIN` when set (scripts/test-hostile sets it to the release build,
//! which has no overflow checks), else the test build's. `HOSTILE_FILTER=substring` runs the
//! cases whose `family/name` contains it; `HOSTILE_JOBS` sets the parallelism (default 3);
//! `HOSTILE_VERBOSE=1` prints every case's output. Cases that need ONNX Runtime are skipped
//! (counted) without it, unless `ANOMALYCLIP_REQUIRE_ORT` is set; `run` and signal cases need
//! mosquitto and GStreamer.

use crate::common;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The sentinel password written into configs and password files; never allowed in any output.
const SECRET: &str = "hostile-S3NTINEL-pw-7f3a";

/// Address-space limit of every child (bytes): bounds a read of `/dev/zero` or a decompression
/// bomb, with room for ONNX Runtime and GStreamer.
const MEMORY_LIMIT: u64 = 3 << 30;

/// Numeric fields of `score` JSON lines and MQTT results: never `null` (a NaN serialised).
const NUMERIC_FIELDS: &[&str] = &[
    "score",
    "map_max",
    "area",
    "threshold",
    "ms",
    "width",
    "height",
];

// ---------------------------------------------------------------------------------------------
// The case table's types
// ---------------------------------------------------------------------------------------------

/// The exit class a case expects.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Exit {
    /// 0: everything done.
    Ok,
    /// 1: the job ran, some items failed.
    Items,
    /// 2: bad usage, configuration or model; nothing done.
    Usage,
    /// 1 or 2: refused one way or the other (the item or the whole input).
    Refused,
    /// Any exit code, as long as the process exits by itself without a panic.
    Clean,
    /// 0, or killed by SIGTERM's default action with no output at all: a SIGTERM that arrives
    /// in the exec window (before `main` installs its handlers, see [`LIMIT_EXEC_WINDOW`]) ends
    /// a process that has not started anything yet, and systemd counts a SIGTERM death as a
    /// clean stop. Which of the two happens depends on the machine's load.
    OkOrEarlyTerm,
}

impl Exit {
    fn accepts(self, code: i32) -> bool {
        match self {
            Exit::Ok => code == 0,
            Exit::Items => code == 1,
            Exit::Usage => code == 2,
            Exit::Refused => code == 1 || code == 2,
            Exit::Clean => code != 101,
            Exit::OkOrEarlyTerm => code == 0,
        }
    }
}

/// What a case's setup sees: its own directory (also the child's working directory), the tiny
/// package, and the broker's port (0 when the suite has none).
struct Ctx {
    dir: PathBuf,
    port: u16,
}

type Setup = Box<dyn Fn(&Ctx) -> Vec<OsString> + Send + Sync>;
type Check = Box<dyn Fn(&Ctx, &Outcome) -> Result<(), String> + Send + Sync>;

/// One hostile case.
struct Case {
    family: &'static str,
    name: String,
    setup: Setup,
    expect: Exit,
    fragments: Vec<String>,
    /// Strings that must not appear in stdout or stderr (besides [`SECRET`]).
    absent: Vec<String>,
    pending: Option<&'static str>,
    needs_ort: bool,
    needs_broker: bool,
    /// Signals sent to the child, at these times after it was spawned.
    signals: Vec<(u64, i32)>,
    /// The child must still be running at this time after spawn (then the signals go on).
    alive_at: Option<u64>,
    timeout: Duration,
    /// At most this many lines on stderr (one problem must not flood the log).
    max_lines: Option<usize>,
    check: Option<Check>,
}

fn case(family: &'static str, name: impl Into<String>) -> Case {
    Case {
        family,
        name: name.into(),
        setup: Box::new(|_| Vec::new()),
        expect: Exit::Clean,
        fragments: Vec::new(),
        absent: Vec::new(),
        pending: None,
        needs_ort: false,
        needs_broker: false,
        signals: Vec::new(),
        alive_at: None,
        timeout: Duration::from_secs(20),
        max_lines: None,
        check: None,
    }
}

impl Case {
    fn setup(mut self, f: impl Fn(&Ctx) -> Vec<OsString> + Send + Sync + 'static) -> Self {
        self.setup = Box::new(f);
        self
    }
    fn exit(mut self, e: Exit) -> Self {
        self.expect = e;
        self
    }
    fn msg(mut self, fragment: impl Into<String>) -> Self {
        self.fragments.push(fragment.into());
        self
    }
    fn absent(mut self, s: impl Into<String>) -> Self {
        self.absent.push(s.into());
        self
    }
    fn pending(mut self, why: &'static str) -> Self {
        self.pending = Some(why);
        self
    }
    fn ort(mut self) -> Self {
        self.needs_ort = true;
        self
    }
    fn broker(mut self) -> Self {
        self.needs_broker = true;
        self.needs_ort = true;
        self.timeout = Duration::from_secs(40);
        self
    }
    fn signal(mut self, at_ms: u64, sig: i32) -> Self {
        self.signals.push((at_ms, sig));
        self
    }
    fn alive_at(mut self, ms: u64) -> Self {
        self.alive_at = Some(ms);
        self
    }
    fn timeout(mut self, s: u64) -> Self {
        self.timeout = Duration::from_secs(s);
        self
    }
    fn max_lines(mut self, n: usize) -> Self {
        self.max_lines = Some(n);
        self
    }
    fn check(
        mut self,
        f: impl Fn(&Ctx, &Outcome) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.check = Some(Box::new(f));
        self
    }
    fn id(&self) -> String {
        format!("{}/{}", self.family, self.name)
    }
}

/// How a child ended.
struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    hung: bool,
    dead_before_alive_check: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// A case's result: its index, family, id, verdict and the text to print.
type Report = (usize, &'static str, String, Verdict, String);

/// A table row's `pending` flag.
type Pending = Option<&'static str>;

#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Pass,
    Fail,
    Pending,
    PendingPassed,
    Skipped,
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

/// `$ANOMALYCLIP_BIN` (made absolute: children run in their case directory), else the test
/// build's binary.
fn bin() -> PathBuf {
    std::env::var_os("ANOMALYCLIP_BIN")
        .filter(|p| !p.is_empty())
        .map(|p| std::path::absolute(PathBuf::from(p)).expect("absolute path"))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_anomalyclip-edge")))
}

fn spawn_and_wait(c: &Case, ctx: &Ctx, args: &[OsString], ort: Option<&Path>) -> Outcome {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(&ctx.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET");
    if let Some(lib) = ort {
        cmd.env("ORT_DYLIB_PATH", lib);
    }
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: MEMORY_LIMIT,
                rlim_max: MEMORY_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn the binary");
    let pid = child.id() as libc::pid_t;
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = reader(Box::new(child.stdout.take().expect("stdout")));
    let err_t = reader(Box::new(child.stderr.take().expect("stderr")));
    let mut signals: VecDeque<(u64, i32)> = c.signals.iter().copied().collect();
    let mut alive_checked = c.alive_at.is_none();
    let mut dead_early = false;
    let (status, hung) = loop {
        if let Ok(Some(st)) = child.try_wait() {
            if !alive_checked {
                dead_early = true;
            }
            break (Some(st), false);
        }
        let ms = t0.elapsed().as_millis() as u64;
        if let Some(at) = c.alive_at
            && !alive_checked
            && ms >= at
        {
            alive_checked = true;
        }
        while let Some(&(at, sig)) = signals.front() {
            if ms < at {
                break;
            }
            signals.pop_front();
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
            unsafe {
                libc::kill(pid, sig);
            }
        }
        if t0.elapsed() > c.timeout {
            let _ = child.kill();
            let st = child.wait().ok();
            break (st, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = t0.elapsed();
    Outcome {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        hung,
        dead_before_alive_check: dead_early,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        elapsed,
    }
}

/// Every problem with an outcome (empty = the case passed).
fn judge(c: &Case, ctx: &Ctx, o: &Outcome) -> Vec<String> {
    let mut bad = Vec::new();
    if o.hung {
        bad.push(format!("hang: still running after {:?}, killed", c.timeout));
    } else if let Some(sig) = o.signal {
        let early_term = matches!(c.expect, Exit::OkOrEarlyTerm)
            && sig == libc::SIGTERM
            && o.stdout.is_empty()
            && o.stderr.is_empty();
        if !early_term {
            bad.push(format!("killed by signal {sig}"));
        }
    }
    if o.dead_before_alive_check {
        bad.push(format!(
            "exited after {:?}, before it should have been checked alive at {} ms",
            o.elapsed,
            c.alive_at.unwrap_or(0)
        ));
    }
    let all = format!("{}\n{}", o.stdout, o.stderr);
    if o.code == Some(101) || all.contains("panicked at") {
        bad.push("panic".into());
    }
    if let Some(code) = o.code
        && !o.hung
        && !c.expect.accepts(code)
    {
        bad.push(format!("exit {code}, expected {:?}", c.expect));
    }
    for f in &c.fragments {
        if !all.contains(f.as_str()) {
            bad.push(format!("no {f:?} in the output"));
        }
    }
    // Children run under an address-space limit: running out of memory means an unbounded
    // read or allocation (e.g. /dev/zero read to the end), not a clear refusal.
    if all.contains("out of memory") || all.contains("memory allocation of") {
        bad.push("ran out of memory (an unbounded read or allocation)".into());
    }
    if all.contains(SECRET) {
        bad.push("the secret (sentinel password) is in the output".into());
    }
    for a in &c.absent {
        if all.contains(a.as_str()) {
            bad.push(format!("{a:?} is in the output"));
        }
    }
    if let Some(max) = c.max_lines {
        let n = o.stderr.lines().count();
        if n > max {
            bad.push(format!("{n} lines on stderr, expected at most {max}"));
        }
    }
    if let Some(p) = json_number_problem(&o.stdout) {
        bad.push(p);
    }
    if bad.is_empty()
        && let Some(check) = &c.check
        && let Err(e) = check(ctx, o)
    {
        bad.push(e);
    }
    bad
}

/// A JSON line on stdout with `NaN`/`inf` or a `null` number.
fn json_number_problem(stdout: &str) -> Option<String> {
    for line in stdout.lines() {
        let t = line.trim();
        if !t.starts_with('{') {
            continue;
        }
        for bad in ["NaN", "Infinity", "inf,", ":inf", ":-inf"] {
            if t.contains(bad) {
                return Some(format!("non-finite number in a JSON line: {t}"));
            }
        }
        let Ok(v) = serde_json::from_str::<Value>(t) else {
            return Some(format!("stdout line is not JSON: {t}"));
        };
        for k in NUMERIC_FIELDS {
            if v.get(k).is_some_and(Value::is_null) {
                return Some(format!("`{k}` is null (a NaN?) in: {t}"));
            }
        }
    }
    None
}

/// The last `max` bytes of `s` (errors come last), marked when cut.
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut cut = s.len() - max;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &s[cut..])
}

fn one_line(s: &str, max: usize) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_inputs_never_panic_hang_or_leak_and_get_the_right_exit_and_message() {
    common::init_tracing();
    let filter = std::env::var("HOSTILE_FILTER").unwrap_or_default();
    let verbose = std::env::var_os("HOSTILE_VERBOSE").is_some();
    let jobs: usize = std::env::var("HOSTILE_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let all = cases();
    assert!(all.len() >= 150, "the table has only {} cases", all.len());
    let selected: Vec<Case> = all
        .into_iter()
        .filter(|c| c.id().contains(&filter))
        .collect();
    let ort = common::golden::ort_or_skip("hostile");
    // One broker for the `run` cases, only when one is selected.
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let broker = if selected.iter().any(|c| c.needs_broker) && ort.is_some() {
        Some(rt.block_on(common::broker::Broker::start(None)))
    } else {
        None
    };
    let port = broker.as_ref().map_or(0, |b| b.port);
    let base = tempfile::tempdir().expect("tempdir");
    let queue: Arc<Mutex<VecDeque<(usize, Case)>>> =
        Arc::new(Mutex::new(selected.into_iter().enumerate().collect()));
    let results: Arc<Mutex<Vec<Report>>> = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let queue = queue.clone();
            let results = results.clone();
            let ort = ort.clone();
            let base = base.path().to_owned();
            s.spawn(move || {
                loop {
                    let Some((i, c)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
                    else {
                        return;
                    };
                    let id = c.id();
                    let (verdict, text) = run_case(&c, i, &base, port, ort.as_deref(), verbose);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, c.family, id, verdict, text));
                }
            });
        }
    });
    drop(broker);
    let mut results = Arc::try_unwrap(results)
        .ok()
        .expect("workers done")
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|r| r.0);

    let mut per_family: BTreeMap<&str, [usize; 5]> = BTreeMap::new();
    let mut totals = [0usize; 5];
    for (_, family, _, verdict, text) in &results {
        let k = match verdict {
            Verdict::Pass => 0,
            Verdict::Pending => 1,
            Verdict::PendingPassed => 2,
            Verdict::Fail => 3,
            Verdict::Skipped => 4,
        };
        per_family.entry(family).or_default()[k] += 1;
        totals[k] += 1;
        if !text.is_empty() {
            println!("{text}");
        }
    }
    let fam: Vec<String> = per_family
        .iter()
        .map(|(f, n)| {
            format!(
                "{f} {}/{} passed, {} pending, {} failed{}",
                n[0] + n[2],
                n.iter().sum::<usize>(),
                n[1],
                n[3],
                if n[4] > 0 {
                    format!(", {} skipped", n[4])
                } else {
                    String::new()
                }
            )
        })
        .collect();
    println!(
        "hostile: {} cases, {} passed, {} pending, {} failed, {} skipped ({} pending cases passed: remove their flag) in {:.1} s; {}",
        results.len(),
        totals[0] + totals[2],
        totals[1],
        totals[3],
        totals[4],
        totals[2],
        t0.elapsed().as_secs_f64(),
        fam.join("; ")
    );
    assert_eq!(
        totals[3], 0,
        "{} hostile case(s) failed (see above)",
        totals[3]
    );
}

fn run_case(
    c: &Case,
    i: usize,
    base: &Path,
    port: u16,
    ort: Option<&Path>,
    verbose: bool,
) -> (Verdict, String) {
    let id = c.id();
    if c.needs_ort && ort.is_none() {
        return (
            Verdict::Skipped,
            format!("SKIPPED {id}: needs ONNX Runtime"),
        );
    }
    if c.needs_broker && port == 0 {
        return (Verdict::Skipped, format!("SKIPPED {id}: needs the broker"));
    }
    let dir = base.join(format!("c{i:03}"));
    std::fs::create_dir_all(&dir).expect("case dir");
    let ctx = Ctx { dir, port };
    let args = (c.setup)(&ctx);
    let o = spawn_and_wait(c, &ctx, &args, ort);
    let problems = judge(c, &ctx, &o);
    let detail = format!(
        "exit {:?} signal {:?} in {:.1} s; args {:?}\n    stderr: {}\n    stdout: {}",
        o.code,
        o.signal,
        o.elapsed.as_secs_f64(),
        args.iter()
            .map(|a| one_line(&a.to_string_lossy(), 120))
            .collect::<Vec<_>>(),
        tail(&one_line(&o.stderr, usize::MAX), 700),
        one_line(&o.stdout, 300)
    );
    // Cases with FIFOs or a broker connection leave nothing behind; directories are removed
    // with the suite's tempdir.
    match (problems.is_empty(), c.pending) {
        (true, None) => (
            Verdict::Pass,
            if verbose {
                format!("ok {id}: {detail}")
            } else {
                String::new()
            },
        ),
        (true, Some(why)) => (
            Verdict::PendingPassed,
            format!("PENDING CASE PASSES (remove its flag; was {why}): {id}"),
        ),
        (false, Some(why)) => (
            Verdict::Pending,
            format!(
                "PENDING (known fault): {id} [{why}]: {}{}",
                problems.join("; "),
                if verbose {
                    format!("\n    {detail}")
                } else {
                    format!("\n    {}", one_line(&detail, 400))
                }
            ),
        ),
        (false, None) => (
            Verdict::Fail,
            format!("FAILED {id}: {}\n    {detail}", problems.join("; ")),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------------------------

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(os).collect()
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

fn symlink(target: impl AsRef<Path>, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

fn tiny() -> PathBuf {
    common::golden::tiny_package()
}

fn fixture(sub: &str) -> PathBuf {
    common::fixtures(sub)
}

/// A copy of the tiny package in `ctx.dir/pkg`.
fn pkg(ctx: &Ctx) -> PathBuf {
    let p = ctx.dir.join("pkg");
    std::fs::create_dir_all(&p).expect("mkdir pkg");
    for f in [
        "manifest.toml",
        "model.onnx",
        "text.f32",
        "model.fp16.onnx",
        "model.int8.onnx",
    ] {
        std::fs::copy(tiny().join(f), p.join(f)).expect("copy package file");
    }
    p
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn manifest(p: &Path) -> String {
    std::fs::read_to_string(p.join("manifest.toml")).expect("manifest")
}

/// Replaces `from` by `to` in the package's manifest (which must contain it).
fn edit_manifest(p: &Path, from: &str, to: &str) {
    let m = manifest(p);
    assert!(m.contains(from), "manifest has no {from:?}");
    write(&p.join("manifest.toml"), m.replacen(from, to, 1));
}

/// Replaces a package file and puts its new hash in the manifest (so only the content is bad).
fn replace_with_hash(p: &Path, file: &str, bytes: &[u8]) {
    let old = sha256(&std::fs::read(p.join(file)).expect("read"));
    write(&p.join(file), bytes);
    edit_manifest(p, &old, &sha256(bytes));
}

/// A small valid image to score.
fn good_png(path: &Path) {
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 99])
    });
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    img.save_with_format(path, image::ImageFormat::Png)
        .expect("write png");
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, 7])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .expect("png");
    buf.into_inner()
}

fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 50]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg)
        .expect("jpeg");
    buf.into_inner()
}

fn bmp_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 1]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Bmp)
        .expect("bmp");
    buf.into_inner()
}

fn gray_png(w: u32, h: u32, v: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(w, h, image::Luma([v]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .expect("png");
    buf.into_inner()
}

/// A PNG whose IHDR says `w`×`h` (CRC fixed up) followed by an empty IDAT and IEND.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc_in = kind.to_vec();
        crc_in.extend_from_slice(data);
        out.extend_from_slice(&crc_in);
        out.extend_from_slice(&crc32(&crc_in).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for b in data {
        c ^= u32::from(*b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A 24-bit BMP header declaring `w`×`h` (signed, as BMP stores them) with `pixels` after it.
fn bmp_header(w: i32, h: i32, data_offset: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = b"BM".to_vec();
    out.extend_from_slice(&(54 + pixels.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&data_offset.to_le_bytes());
    out.extend_from_slice(&40u32.to_le_bytes());
    out.extend_from_slice(&w.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&24u16.to_le_bytes());
    out.extend_from_slice(&[0; 24]);
    out.extend_from_slice(pixels);
    out
}

/// `score --model <model> <images…>` (with `--threads 1`, to keep the machine usable).
fn score_args(model: &Path, images: &[&Path], extra: &[&str]) -> Vec<OsString> {
    let mut a = args(&["--log", "warn", "score", "--threads", "1", "--model"]);
    a.push(os(model));
    a.extend(extra.iter().map(os));
    a.extend(images.iter().map(os));
    a
}

/// `score` of one image in the case dir with the tiny package.
fn score_image(ctx: &Ctx, name: &str) -> Vec<OsString> {
    score_args(&tiny(), &[&ctx.dir.join(name)], &[])
}

/// Checks that stdout has one JSON line per image, `n` of them with a score.
fn lines_check(images: usize, scored: usize) -> impl Fn(&Ctx, &Outcome) -> Result<(), String> {
    move |_, o| {
        let lines: Vec<Value> = o
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let with_score = lines.iter().filter(|v| v["score"].is_number()).count();
        let with_error = lines.iter().filter(|v| v["error"].is_string()).count();
        if lines.len() != images || with_score != scored || with_error != images - scored {
            return Err(format!(
                "expected {images} JSON line(s), {scored} scored and {} with error; got {} lines, {with_score} scored, {with_error} with error",
                images - scored,
                lines.len()
            ));
        }
        Ok(())
    }
}

/// A config that `check-config` and `run` accept: the tiny model on the CPU, the broker on
/// 127.0.0.1:`port`, user + sentinel password, one simulated camera.
fn config_text(port: u16) -> String {
    // The daemon tests' config (tiny model on the CPU, fast reconnects) with credentials and
    // one simulated camera appended inside `[mqtt]` / after it.
    let tail = format!(
        "username = \"u\"\n\
         password = \"{SECRET}\"\n\
         [[camera]]\n\
         name = \"cam\"\n\
         pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"\n\
         threshold = 0.5\n\
         pixel_threshold = 0.5\n\
         [camera.alarm]\n\
         raise_count = 1\n\
         raise_window = 1\n\
         clear_count = 1\n"
    );
    common::daemon::config("hostile", if port == 0 { 1883 } else { port }, &tail)
}

/// `check-config config.toml` on the base config after `edit` (text → text).
fn check_cfg(
    edit: impl Fn(&Ctx, String) -> String + Send + Sync + 'static,
) -> impl Fn(&Ctx) -> Vec<OsString> + Send + Sync + 'static {
    move |ctx| {
        let text = edit(ctx, config_text(ctx.port));
        write(&ctx.dir.join("config.toml"), text);
        args(&["check-config", "config.toml"])
    }
}

/// `run --config config.toml` on the base config after `edit`.
fn run_cfg(
    edit: impl Fn(&Ctx, String) -> String + Send + Sync + 'static,
) -> impl Fn(&Ctx) -> Vec<OsString> + Send + Sync + 'static {
    move |ctx| {
        let text = edit(ctx, config_text(ctx.port));
        write(&ctx.dir.join("config.toml"), text);
        args(&["run", "--config", "config.toml"])
    }
}

fn replace(text: String, from: &str, to: &str) -> String {
    assert!(text.contains(from), "config has no {from:?}");
    text.replacen(from, to, 1)
}

/// The password line replaced by a `password_file` line naming `file` (relative to the case dir).
fn with_password_file(text: String, file: &str) -> String {
    replace(
        text,
        &format!("password = \"{SECRET}\""),
        &format!("password_file = \"{file}\""),
    )
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

/// Not a fault we can fix in the binary: a signal that arrives within the first tens of
/// milliseconds after exec, while the dynamic loader is still mapping GLib/GStreamer and before
/// `main` runs, takes the default action. `run` installs its handlers first thing; systemd sends
/// SIGHUP (ExecReload) only to an active unit, i.e. after READY=1.
const LIMIT_EXEC_WINDOW: &str =
    "limit: a signal before main runs (the exec window) takes the default action";

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    config_cases(&mut v);
    package_cases(&mut v);
    image_cases(&mut v);
    dataset_cases(&mut v);
    state_cases(&mut v);
    cli_cases(&mut v);
    signal_cases(&mut v);
    v
}

/// Config files for `check-config` (and a few for `run`, which must refuse the same).
fn config_cases(v: &mut Vec<Case>) {
    let f = "config";
    v.push(
        case(f, "the base config is valid")
            .setup(check_cfg(|_, t| t))
            .exit(Exit::Ok)
            .msg(": ok"),
    );
    // (name, from, to, message fragment, pending)
    #[rustfmt::skip] // One row per case.
    let edits: &[(&str, &str, &str, &str, Pending)] = &[
        ("syntax error: value missing", "node_id = \"hostile\"", "node_id = ", "config.toml:1", None),
        ("syntax error: table header not closed", "[mqtt]", "[mqtt", "config.toml:", None),
        ("syntax error: string not closed", "node_id = \"hostile\"", "node_id = \"hostile", "config.toml:1", None),
        ("duplicate key", "stats_interval_s = 1", "stats_interval_s = 1\nstats_interval_s = 2", "stats_interval_s", None),
        ("duplicate table", "[engine]", "[engine]\nthreads = 1\n[engine]", "engine", None),
        ("unknown top-level key", "stats_interval_s = 1", "stats_intervall_s = 1", "stats_intervall_s", None),
        ("unknown key in [mqtt]", "keep_alive_s = 5", "keepalive_s = 5", "keepalive_s", None),
        ("unknown key in a camera", "threshold = 0.5", "treshold = 0.5", "treshold", None),
        ("unknown table", "[engine]", "[engines]\nx = 1\n[engine]", "engines", None),
        ("wrong type: node_id is a number", "node_id = \"hostile\"", "node_id = 5", "node_id", None),
        ("wrong type: stats_interval_s is a string", "stats_interval_s = 1", "stats_interval_s = \"1\"", "stats_interval_s", None),
        ("wrong type: camera is a table, not an array", "[[camera]]", "[camera]", "camera", None),
        ("wrong type: mqtt is a string", "[mqtt]\nhost = \"127.0.0.1\"", "mqtt = \"127.0.0.1\"\n[mqtt2]\nhost = \"x\"", "mqtt", None),
        ("stats_interval_s negative", "stats_interval_s = 1", "stats_interval_s = -1", "stats_interval_s", None),
        ("stats_interval_s over the range", "stats_interval_s = 1", "stats_interval_s = 86401", "stats_interval_s", None),
        ("stats_interval_s past i64", "stats_interval_s = 1", "stats_interval_s = 99999999999999999999999", "config.toml:3", None),
        ("stats_interval_s is a float", "stats_interval_s = 1", "stats_interval_s = 1.5", "stats_interval_s", None),
        ("threshold nan", "threshold = 0.5", "threshold = nan", "threshold", None),
        ("threshold inf", "threshold = 0.5", "threshold = inf", "threshold", None),
        ("threshold -inf", "threshold = 0.5", "threshold = -inf", "threshold", None),
        ("threshold negative", "threshold = 0.5", "threshold = -0.1", "threshold", None),
        ("threshold just above 1", "threshold = 0.5", "threshold = 1.0000001", "threshold", None),
        ("threshold 1e400 (overflows a float)", "threshold = 0.5", "threshold = 1e400", "threshold", None),
        ("pixel_threshold nan", "pixel_threshold = 0.5", "pixel_threshold = nan", "pixel_threshold", None),
        ("pixel_threshold 2", "pixel_threshold = 0.5", "pixel_threshold = 2", "pixel_threshold", None),
        ("max_fps nan", "threshold = 0.5", "threshold = 0.5\nmax_fps = nan", "max_fps", None),
        ("max_fps inf", "threshold = 0.5", "threshold = 0.5\nmax_fps = inf", "max_fps", None),
        ("max_fps negative", "threshold = 0.5", "threshold = 0.5\nmax_fps = -1.0", "max_fps", None),
        ("max_fps huge", "threshold = 0.5", "threshold = 0.5\nmax_fps = 1e308", "max_fps", None),
        ("engine.threads negative", "threads = 1", "threads = -1", "threads", None),
        ("engine.threads 100000", "threads = 1", "threads = 100000", "threads", None),
        ("engine.threads 1024 on a small machine", "threads = 1", "threads = 1024", "threads", None),
        ("engine.threads a string", "threads = 1", "threads = \"all\"", "threads", None),
        ("engine.max_batch 0", "max_batch = 4", "max_batch = 0", "max_batch", None),
        ("engine.max_batch 65", "max_batch = 4", "max_batch = 65", "max_batch", None),
        ("engine.max_batch 2^40", "max_batch = 4", "max_batch = 1099511627776", "max_batch", None),
        ("engine.max_wait_ms over the range", "max_wait_ms = 5", "max_wait_ms = 10001", "max_wait_ms", None),
        ("engine.backend unknown", "backend = \"cpu\"", "backend = \"gpu\"", "backend", None),
        ("engine.head unknown", "backend = \"cpu\"", "backend = \"cpu\"\nhead = \"fpga\"", "head", None),
        ("engine.fp16 a string", "backend = \"cpu\"", "backend = \"cpu\"\nfp16 = \"yes\"", "fp16", None),
        ("engine.ort_library missing", "backend = \"cpu\"", "backend = \"cpu\"\nort_library = \"/nonexistent/libonnxruntime.so\"", "ort_library", None),
        ("mqtt.port 0", "port = ", "port = 0 # ", "port", None),
        ("mqtt.port 65536", "port = ", "port = 65536 # ", "port", None),
        ("mqtt.port negative", "port = ", "port = -1 # ", "port", None),
        ("mqtt.keep_alive_s 70000", "keep_alive_s = 5", "keep_alive_s = 70000", "keep_alive_s", None),
        ("mqtt.result_qos 3", "keep_alive_s = 5", "keep_alive_s = 5\nresult_qos = 3", "QoS 3", None),
        ("mqtt.mask_qos -1", "keep_alive_s = 5", "keep_alive_s = 5\nmask_qos = -1", "mask_qos", None),
        ("mqtt.reconnect_min_ms 0", "reconnect_min_ms = 100", "reconnect_min_ms = 0", "reconnect_min_ms", None),
        ("mqtt.reconnect min above max", "reconnect_min_ms = 100", "reconnect_min_ms = 1000", "reconnect_m", None),
        ("mqtt.queue_max_alarms 0", "keep_alive_s = 5", "keep_alive_s = 5\nqueue_max_alarms = 0", "queue_max_alarms", None),
        ("mqtt.queue_max_alarms over the range", "keep_alive_s = 5", "keep_alive_s = 5\nqueue_max_alarms = 1000001", "queue_max_alarms", None),
        ("mqtt.queue_when_full unknown", "keep_alive_s = 5", "keep_alive_s = 5\nqueue_when_full = \"drop-all\"", "queue_when_full", None),
        ("mqtt.client_id empty", "keep_alive_s = 5", "keep_alive_s = 5\nclient_id = \"\"", "client_id", None),
        ("mqtt.topic_prefix with a wildcard", "keep_alive_s = 5", "keep_alive_s = 5\ntopic_prefix = \"a/#\"", "topic_prefix", None),
        ("mqtt.topic_prefix starting with $", "keep_alive_s = 5", "keep_alive_s = 5\ntopic_prefix = \"$SYS/x\"", "topic_prefix", None),
        ("mqtt.host empty", "host = \"127.0.0.1\"", "host = \"\"", "mqtt.host", None),
        ("mqtt.host written as a URL (mqtt://)", "host = \"127.0.0.1\"", "host = \"mqtt://127.0.0.1\"", "mqtt.host", None),
        ("mqtt.host written as a URL (tcp:// with port)", "host = \"127.0.0.1\"", "host = \"tcp://127.0.0.1:1883\"", "mqtt.host", None),
        ("mqtt.host with a space", "host = \"127.0.0.1\"", "host = \"broker plant\"", "mqtt.host", None),
        ("mqtt.host missing", "host = \"127.0.0.1\"\n", "", "host", None),
        ("username empty", "username = \"u\"", "username = \"\"", "username", None),
        ("password without username", "username = \"u\"\n", "", "username", None),
        ("node_id empty", "node_id = \"hostile\"", "node_id = \"\"", "node_id", None),
        ("node_id with a slash", "node_id = \"hostile\"", "node_id = \"a/b\"", "node_id", None),
        ("node_id with an MQTT wildcard", "node_id = \"hostile\"", "node_id = \"line#1\"", "node_id", None),
        ("node_id not ASCII", "node_id = \"hostile\"", "node_id = \"stätion\"", "node_id", None),
        ("node_id 65 characters", "node_id = \"hostile\"", "node_id = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "node_id", None),
        ("node_id with a newline escape", "node_id = \"hostile\"", "node_id = \"a\\nb\"", "node_id", None),
        ("node_id missing", "node_id = \"hostile\"\n", "", "node_id", None),
        ("camera name empty", "name = \"cam\"", "name = \"\"", "camera[0].name", None),
        ("camera name with a +", "name = \"cam\"", "name = \"cam+1\"", "camera[0].name", None),
        ("camera name with NUL escape", "name = \"cam\"", "name = \"c\\u0000m\"", "camera[0].name", None),
        ("duplicate camera names", "[camera.alarm]", "[[camera]]\nname = \"cam\"\npipeline = \"videotestsrc ! appsink name=sink\"\n[[camera]]\nname = \"cam2\"\npipeline = \"videotestsrc ! appsink name=sink\"\n[camera.alarm]", "duplicate camera name", None),
        ("no cameras", "[[camera]]", "[[nocamera]]", "nocamera", None),
        ("commands.allow names no command", "[engine]", "[commands]\nallow = [\"reboot\"]\n[engine]", "commands.allow", None),
        ("commands.allow a string", "[engine]", "[commands]\nallow = \"all\"\n[engine]", "allow", None),
        ("unknown key in [commands]", "[engine]", "[commands]\ntopic = \"x\"\n[engine]", "topic", None),
        ("alarm latch a string", "[camera.alarm]", "[camera.alarm]\nlatch = \"yes\"", "latch", None),
        ("camera with uri and pipeline", "name = \"cam\"", "name = \"cam\"\nuri = \"rtsp://h/s\"", "not both", None),
        ("camera with no source", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"\n", "", "no source", None),
        ("uri with ftp scheme", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"ftp://cam/x\"", "unsupported scheme", None),
        ("uri rtsp without host", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"rtsp://\"", "no host", None),
        ("uri http without host", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"http:///x\"", "no host", None),
        ("uri file relative", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"file://video.mp4\"", "absolute path", None),
        ("uri file missing", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"file:///nonexistent/video.mp4\"", "not found", None),
        ("uri /dev/videoX", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"/dev/videoX\"", "/dev/videoN", None),
        ("uri not a URI", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"camera one\"", "not a URI", None),
        ("uri rtsps is accepted like the camera does", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "uri = \"rtsps://cam.local/stream\"", "", None),
        ("pipeline empty", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "pipeline = \"\"", "camera[0].pipeline", None),
        ("pipeline without appsink", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "pipeline = \"videotestsrc ! fakesink\"", "camera[0].pipeline", None),
        ("pipeline appsink with another name", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "pipeline = \"videotestsrc ! appsink name=out\"", "camera[0].pipeline", None),
        ("pipeline with an unknown element", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "pipeline = \"nosuchelementxyz ! appsink name=sink\"", "nosuchelementxyz", None),
        ("pipeline with unbalanced quotes", "pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=10/1 ! appsink name=sink\"", "pipeline = \"videotestsrc ! textoverlay text=\\\"oops ! appsink name=sink\"", "camera[0].pipeline", None),
        ("alarm raise_count above raise_window", "raise_count = 1", "raise_count = 5", "raise_count", None),
        ("alarm raise_count 0", "raise_count = 1", "raise_count = 0", "raise_count", None),
        ("alarm clear_count past u32", "clear_count = 1", "clear_count = 4294967297", "clear_count", None),
        ("mask size 8", "clear_count = 1", "clear_count = 1\n[camera.mask]\nsize = 8", "mask.size", None),
        ("mask size past u32", "clear_count = 1", "clear_count = 1\n[camera.mask]\nsize = 4294967296", "size", None),
        ("mask kind unknown", "clear_count = 1", "clear_count = 1\n[camera.mask]\nkind = \"color\"", "kind", None),
        ("mask min_interval_ms negative", "clear_count = 1", "clear_count = 1\n[camera.mask]\nmin_interval_ms = -5", "min_interval_ms", None),
        ("model package missing", "[model]\npackage = \"", "[model]\npackage = \"/nonexistent/pkg\"\nx_unused = \"", "package", None),
        ("model table missing", "[model]\n", "[modell]\n", "model", None),
        ("state_dir empty", "state_dir = \"state\"", "state_dir = \"\"", "state_dir", None),
        ("state_dir inside /proc (unwritable)", "state_dir = \"state\"", "state_dir = \"/proc/hostile-state\"", "state_dir", None),
        ("tls table without ca_file", "[[camera]]", "[mqtt.tls]\n[[camera]]", "ca_file", None),
        ("tls ca_file missing", "[[camera]]", "[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n[[camera]]", "ca_file", None),
        ("tls ca_file a directory", "[[camera]]", "[mqtt.tls]\nca_file = \"/tmp\"\n[[camera]]", "ca_file", None),
        ("numeric password is not echoed", &format!("password = \"{SECRET}\""), "password = 98765432109", "password", None),
        ("password line with an unclosed string is not echoed", &format!("password = \"{SECRET}\""), &format!("password = \"{SECRET}"), "config.toml:", None),
        ("password as an array is not echoed", &format!("password = \"{SECRET}\""), &format!("password = [\"{SECRET}\"]"), "password", None),
    ];
    for (name, from, to, frag, pending) in edits {
        let (from, to) = (from.to_string(), to.to_string());
        let mut c = case(f, *name)
            .setup(check_cfg(move |_, t| replace(t, &from, &to)))
            .exit(if *name == "uri rtsps is accepted like the camera does" {
                Exit::Ok
            } else {
                Exit::Usage
            });
        if !frag.is_empty() {
            c = c.msg(*frag);
        }
        if *name == "numeric password is not echoed" {
            c = c.absent("98765432109");
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    // Files named by the config.
    v.push(
        case(f, "model package is a file")
            .setup(check_cfg(|ctx, t| {
                write(&ctx.dir.join("pkgfile"), "x");
                replace(t, &tiny().display().to_string(), "pkgfile")
            }))
            .exit(Exit::Usage)
            .msg("package"),
    );
    v.push(
        case(f, "model package with a wrong hash")
            .setup(check_cfg(|ctx, t| {
                let p = pkg(ctx);
                let mut text = std::fs::read(p.join("text.f32")).expect("text");
                text[0] ^= 1;
                write(&p.join("text.f32"), text);
                replace(t, &tiny().display().to_string(), "pkg")
            }))
            .exit(Exit::Usage)
            .msg("SHA-256"),
    );
    v.push(
        case(f, "state_dir is a file")
            .setup(check_cfg(|ctx, t| {
                write(&ctx.dir.join("state"), "not a dir");
                t
            }))
            .exit(Exit::Usage)
            .msg("not a directory"),
    );
    v.push(
        case(f, "state_dir below a file")
            .setup(check_cfg(|ctx, t| {
                write(&ctx.dir.join("afile"), "x");
                replace(t, "state_dir = \"state\"", "state_dir = \"afile/state\"")
            }))
            .exit(Exit::Usage)
            .msg("state_dir"),
    );
    #[rustfmt::skip] // One row per case.
    let pw: &[(&str, Exit, &str, Pending)] = &[
        ("password_file missing", Exit::Usage, "password file", None),
        ("password_file a directory", Exit::Usage, "password file", None),
        ("password_file a FIFO", Exit::Usage, "password", None),
        ("password_file /dev/zero", Exit::Usage, "password", None),
        ("password_file empty", Exit::Usage, "empty", None),
        ("password_file invalid UTF-8", Exit::Usage, "UTF-8", None),
        ("password_file with two lines", Exit::Clean, "", None),
        ("password_file with the password and a newline", Exit::Ok, ": ok", None),
        ("password_file 10 MB", Exit::Usage, "password", None),
        ("password and password_file both", Exit::Usage, "not both", None),
    ];
    for (name, exit, frag, pending) in pw {
        let name = *name;
        let mut c = case(f, name)
            .setup(check_cfg(move |ctx, t| {
                let p = ctx.dir.join("pw");
                match name {
                    "password_file missing" => {}
                    "password_file a directory" => std::fs::create_dir(&p).expect("mkdir"),
                    "password_file a FIFO" => mkfifo(&p),
                    "password_file /dev/zero" => symlink("/dev/zero", &p),
                    "password_file empty" => write(&p, ""),
                    "password_file invalid UTF-8" => write(&p, b"\xff\xfe\x80pw\n"),
                    "password_file with two lines" => {
                        write(&p, format!("{SECRET}\nsecond-line-{SECRET}\n"))
                    }
                    "password_file with the password and a newline" => {
                        write(&p, format!("{SECRET}\n"))
                    }
                    "password_file 10 MB" => write(&p, vec![b'p'; 10 << 20]),
                    _ => {
                        write(&p, SECRET);
                        return replace(
                            t,
                            "username = \"u\"",
                            "username = \"u\"\npassword_file = \"pw\"",
                        );
                    }
                }
                with_password_file(t, "pw")
            }))
            .exit(*exit)
            .timeout(10);
        if !frag.is_empty() {
            c = c.msg(*frag);
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    #[rustfmt::skip] // One row per case.
    let tls: &[(&str, &str, Pending)] = &[
        ("tls ca_file garbage without PEM markers", "PEM", None),
        ("tls ca_file garbage inside PEM markers", "ca_file", None),
        ("tls ca_file a FIFO", "ca_file", None),
        ("tls ca_file empty", "ca_file", None),
        ("tls client cert without key", "client_key_file", None),
        ("tls client key garbage inside PEM markers", "client_key_file", None),
    ];
    for (name, frag, pending) in tls {
        let name = *name;
        let mut c = case(f, name)
            .setup(check_cfg(move |ctx, t| {
                let ca = ctx.dir.join("ca.pem");
                let good_cert = "-----BEGIN CERTIFICATE-----\nMIIBxzCCAW2gAwIBAgIUhostile\n-----END CERTIFICATE-----\n";
                let mut extra = String::from("[mqtt.tls]\nca_file = \"ca.pem\"\n");
                match name {
                    "tls ca_file garbage without PEM markers" => write(&ca, "this is not a certificate\n"),
                    "tls ca_file garbage inside PEM markers" => write(&ca, good_cert),
                    "tls ca_file a FIFO" => mkfifo(&ca),
                    "tls ca_file empty" => write(&ca, ""),
                    "tls client cert without key" => {
                        write(&ca, good_cert);
                        write(&ctx.dir.join("c.pem"), good_cert);
                        extra.push_str("client_cert_file = \"c.pem\"\n");
                    }
                    _ => {
                        write(&ca, good_cert);
                        write(&ctx.dir.join("c.pem"), good_cert);
                        write(
                            &ctx.dir.join("k.pem"),
                            "-----BEGIN PRIVATE KEY-----\nnot base64 at all !!!\n-----END PRIVATE KEY-----\n",
                        );
                        extra.push_str("client_cert_file = \"c.pem\"\nclient_key_file = \"k.pem\"\n");
                    }
                }
                replace(t, "[[camera]]", &format!("{extra}[[camera]]"))
            }))
            .exit(Exit::Usage)
            .msg(*frag)
            .timeout(10);
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    // The config file itself.
    #[rustfmt::skip] // One row per case.
    let file_cases: &[(&str, &str, Pending)] = &[
        ("config file missing", "cannot read", None),
        ("config file is a directory", "config", None),
        ("config file is a FIFO", "config", None),
        ("config file is /dev/zero", "config", None),
        ("config file empty", "node_id", None),
        ("config file 10 MB of garbage", "config", None),
        ("config file invalid UTF-8", "UTF-8", None),
        ("config file with NUL bytes", "config.toml", None),
        ("config file nested arrays 100000 deep", "config.toml", None),
        ("config file nested inline tables 100000 deep", "config.toml", None),
        ("config file 1 MB of garbage lines (25000 problems)", "config.toml", None),
        ("config file a dangling symlink", "cannot read", None),
    ];
    for (name, frag, pending) in file_cases {
        let name = *name;
        let mut c = case(f, name)
            .setup(move |ctx| {
                let p = ctx.dir.join("config.toml");
                match name {
                    "config file missing" => {}
                    "config file is a directory" => std::fs::create_dir(&p).expect("mkdir"),
                    "config file is a FIFO" => mkfifo(&p),
                    "config file is /dev/zero" => return args(&["check-config", "/dev/zero"]),
                    "config file empty" => write(&p, ""),
                    "config file 10 MB of garbage" => write(
                        &p,
                        vec![b'#'; 10 << 20]
                            .iter()
                            .enumerate()
                            .map(|(i, b)| {
                                if i % 100 == 99 {
                                    b'\n'
                                } else if i % 100 == 0 {
                                    b'x'
                                } else {
                                    *b
                                }
                            })
                            .collect::<Vec<u8>>(),
                    ),
                    "config file invalid UTF-8" => write(&p, b"node_id = \"\xff\xfe\"\n"),
                    "config file with NUL bytes" => write(&p, b"node_id = \"a\0b\"\n\0\0\0"),
                    "config file 1 MB of garbage lines (25000 problems)" => {
                        write(&p, format!("x{}\n", "#".repeat(38)).repeat(25_000))
                    }
                    "config file nested arrays 100000 deep" => {
                        write(&p, format!("x = {}", "[".repeat(100_000)))
                    }
                    "config file nested inline tables 100000 deep" => {
                        write(&p, format!("x = {}", "{a = ".repeat(100_000)))
                    }
                    _ => symlink("/nonexistent/config.toml", &p),
                }
                args(&["check-config", "config.toml"])
            })
            .exit(Exit::Usage)
            .msg(*frag)
            .timeout(10);
        if name.contains("deep") {
            c = c.max_lines(100);
        }
        if name.contains("garbage lines") {
            // 25000 one-line problems in 1 MB: a linear checker needs well under a second.
            c = c.timeout(5);
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    v.push(
        case(f, "config file with a UTF-8 BOM")
            .setup(|ctx| {
                write(
                    &ctx.dir.join("config.toml"),
                    format!("\u{feff}{}", config_text(ctx.port)),
                );
                args(&["check-config", "config.toml"])
            })
            .exit(Exit::Clean),
    );
    v.push(
        case(f, "config file valid but padded to 10 MB with comments")
            .setup(|ctx| {
                let mut t = config_text(ctx.port);
                let line = format!("# {}\n", "c".repeat(97));
                for _ in 0..(10 << 20) / line.len() {
                    t.push_str(&line);
                }
                write(&ctx.dir.join("config.toml"), t);
                args(&["check-config", "config.toml"])
            })
            .exit(Exit::Clean),
    );
    // `run` must refuse what `check-config` refuses, with the same message, and exit 2 at once.
    #[rustfmt::skip] // One row per case.
    let run_edits: &[(&str, &str, &str, &str, Pending)] = &[
        ("run: threshold nan", "threshold = 0.5", "threshold = nan", "threshold", None),
        ("run: unknown key", "keep_alive_s = 5", "keepalive_s = 5", "keepalive_s", None),
        ("run: duplicate cameras", "[camera.alarm]", "[[camera]]\nname = \"cam\"\npipeline = \"videotestsrc ! appsink name=sink\"\n[camera.alarm]", "duplicate camera name", None),
        ("run: host written as a URL", "host = \"127.0.0.1\"", "host = \"mqtt://127.0.0.1\"", "mqtt.host", None),
        ("run: numeric password is not echoed", &format!("password = \"{SECRET}\""), "password = 98765432109", "password", None),
    ];
    for (name, from, to, frag, pending) in run_edits {
        let (from, to) = (from.to_string(), to.to_string());
        let mut c = case(f, *name)
            .setup(run_cfg(move |_, t| replace(t, &from, &to)))
            .exit(Exit::Usage)
            .msg(*frag)
            .absent("98765432109")
            .timeout(15);
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    v.push(
        case(f, "run: state_dir is a file")
            .setup(run_cfg(|ctx, t| {
                write(&ctx.dir.join("state"), "x");
                t
            }))
            .exit(Exit::Usage)
            .msg("state")
            .timeout(15),
    );
    v.push(
        case(f, "run: config file is a FIFO")
            .setup(|ctx| {
                mkfifo(&ctx.dir.join("config.toml"));
                args(&["run", "--config", "config.toml"])
            })
            .exit(Exit::Usage)
            .msg("config")
            .timeout(10),
    );
    v.push(
        case(f, "run: password_file is a FIFO")
            .setup(run_cfg(|ctx, t| {
                mkfifo(&ctx.dir.join("pw"));
                with_password_file(t, "pw")
            }))
            .exit(Exit::Usage)
            .msg("password")
            .timeout(10),
    );
    v.push(
        case(f, "run: config file missing")
            .setup(|_| args(&["run", "--config", "nonexistent.toml"]))
            .exit(Exit::Usage)
            .msg("nonexistent.toml"),
    );
}

/// Model packages for `score --model`.
fn package_cases(v: &mut Vec<Case>) {
    let f = "package";
    type Damage = fn(&Ctx, &Path);
    #[rustfmt::skip] // One row per case.
    let table: &[(&str, Damage, Exit, &str, Pending)] = &[
        ("intact copy scores (sanity)", |_, _| {}, Exit::Ok, "\"score\"", None),
        ("directory missing", |_, p| std::fs::remove_dir_all(p).expect("rm"), Exit::Usage, "no such directory", None),
        ("model path is a file", |_, p| {
            std::fs::remove_dir_all(p).expect("rm");
            write(p, "x");
        }, Exit::Usage, "pkg", None),
        ("manifest missing", |_, p| std::fs::remove_file(p.join("manifest.toml")).expect("rm"), Exit::Usage, "manifest.toml", None),
        ("manifest empty", |_, p| write(&p.join("manifest.toml"), ""), Exit::Usage, "format_version", None),
        ("manifest invalid TOML", |_, p| write(&p.join("manifest.toml"), "format_version = 1\n[input\n"), Exit::Usage, "invalid manifest", None),
        ("manifest invalid UTF-8", |_, p| write(&p.join("manifest.toml"), b"format_version = 1\nname = \"\xff\"\n"), Exit::Usage, "manifest.toml", None),
        ("manifest with a BOM", |_, p| {
            let m = manifest(p);
            write(&p.join("manifest.toml"), format!("\u{feff}{m}"));
        }, Exit::Clean, "", None),
        ("manifest a directory", |_, p| {
            std::fs::remove_file(p.join("manifest.toml")).expect("rm");
            std::fs::create_dir(p.join("manifest.toml")).expect("mkdir");
        }, Exit::Usage, "manifest.toml", None),
        ("manifest a FIFO", |_, p| {
            std::fs::remove_file(p.join("manifest.toml")).expect("rm");
            mkfifo(&p.join("manifest.toml"));
        }, Exit::Usage, "manifest.toml", None),
        ("manifest /dev/zero", |_, p| {
            std::fs::remove_file(p.join("manifest.toml")).expect("rm");
            symlink("/dev/zero", &p.join("manifest.toml"));
        }, Exit::Usage, "manifest.toml", None),
        ("manifest 10 MB", |_, p| {
            let mut m = manifest(p);
            m.push_str(&format!("# {}\n", "p".repeat(10 << 20)));
            write(&p.join("manifest.toml"), m);
        }, Exit::Clean, "", None),
        ("format_version 2", |_, p| edit_manifest(p, "format_version = 1", "format_version = 2"), Exit::Usage, "format_version 2", None),
        ("format_version past u32", |_, p| edit_manifest(p, "format_version = 1", "format_version = 99999999999"), Exit::Usage, "format_version 99999999999", None),
        ("format_version negative", |_, p| edit_manifest(p, "format_version = 1", "format_version = -1"), Exit::Usage, "format_version -1", None),
        ("format_version a string", |_, p| edit_manifest(p, "format_version = 1", "format_version = \"1\""), Exit::Usage, "format_version", None),
        ("unknown key", |_, p| edit_manifest(p, "tiny = true", "tiny = true\ncolour = 1"), Exit::Usage, "colour", None),
        ("duplicate key", |_, p| edit_manifest(p, "tiny = true", "tiny = true\ntiny = false"), Exit::Usage, "duplicate", None),
        ("tau nan", |_, p| edit_manifest(p, "tau = 0.07", "tau = nan"), Exit::Usage, "tau", None),
        ("tau inf", |_, p| edit_manifest(p, "tau = 0.07", "tau = inf"), Exit::Usage, "tau", None),
        ("tau negative", |_, p| edit_manifest(p, "tau = 0.07", "tau = -0.07"), Exit::Usage, "tau", None),
        ("tau zero", |_, p| edit_manifest(p, "tau = 0.07", "tau = 0.0"), Exit::Usage, "tau", None),
        ("tau denormal", |_, p| edit_manifest(p, "tau = 0.07", "tau = 1e-45"), Exit::Usage, "tau", None),
        ("tau 1e400", |_, p| edit_manifest(p, "tau = 0.07", "tau = 1e400"), Exit::Usage, "tau", None),
        ("mean nan", |_, p| edit_manifest(p, "mean = [0.48145466", "mean = [nan"), Exit::Usage, "mean", None),
        ("mean inf", |_, p| edit_manifest(p, "mean = [0.48145466", "mean = [inf"), Exit::Usage, "mean", None),
        ("mean with two values", |_, p| edit_manifest(p, "mean = [0.48145466, ", "mean = ["), Exit::Usage, "mean", None),
        ("std nan", |_, p| edit_manifest(p, "std = [0.26862954", "std = [nan"), Exit::Usage, "std", None),
        ("std inf", |_, p| edit_manifest(p, "std = [0.26862954", "std = [inf"), Exit::Usage, "std", None),
        ("std zero", |_, p| edit_manifest(p, "std = [0.26862954", "std = [0.0"), Exit::Usage, "std", None),
        ("std negative", |_, p| edit_manifest(p, "std = [0.26862954", "std = [-1.0"), Exit::Usage, "std", None),
        ("std denormal", |_, p| edit_manifest(p, "std = [0.26862954", "std = [1e-45"), Exit::Usage, "std", None),
        ("grid zero", |_, p| edit_manifest(p, "grid = 8", "grid = 0"), Exit::Usage, "grid", None),
        ("grid negative", |_, p| edit_manifest(p, "grid = 8", "grid = -8"), Exit::Usage, "grid", None),
        ("grid × patch overflows", |_, p| {
            edit_manifest(p, "grid = 8", "grid = 4294967296");
            edit_manifest(p, "patch = 14", "patch = 4294967296");
        }, Exit::Usage, "grid", None),
        ("grid × grid overflows (size = grid)", |_, p| {
            edit_manifest(p, "grid = 8", "grid = 4294967296");
            edit_manifest(p, "patch = 14", "patch = 1");
            edit_manifest(p, "size = 112", "size = 4294967296");
            edit_manifest(p, "[\"batch\", 64, 32]", "[\"batch\", 0, 32]");
        }, Exit::Usage, "manifest.toml", None),
        ("size 2^40 with a matching grid", |_, p| {
            edit_manifest(p, "grid = 8", "grid = 1048576");
            edit_manifest(p, "patch = 14", "patch = 1048576");
            edit_manifest(p, "size = 112", "size = 1099511627776");
        }, Exit::Usage, "size", None),
        ("embed_dim huge: text bytes overflow", |_, p| {
            let huge = "4611686018427387904";
            edit_manifest(p, "embed_dim = 32", &format!("embed_dim = {huge}"));
            edit_manifest(p, "shape = [2, 32]", &format!("shape = [2, {huge}]"));
            edit_manifest(p, "[\"batch\", 32]", &format!("[\"batch\", {huge}]"));
            edit_manifest(p, "[\"batch\", 64, 32]", &format!("[\"batch\", 64, {huge}]"));
        }, Exit::Usage, "embed_dim", None),
        ("embed_dim zero", |_, p| edit_manifest(p, "embed_dim = 32", "embed_dim = 0"), Exit::Usage, "embed_dim", None),
        ("feature_layers empty", |_, p| edit_manifest(p, "feature_layers = [4]", "feature_layers = []"), Exit::Usage, "feature_layers", None),
        ("feature_layers block 0", |_, p| edit_manifest(p, "feature_layers = [4]", "feature_layers = [0]"), Exit::Usage, "feature_layers", None),
        ("feature_layers past layers", |_, p| edit_manifest(p, "feature_layers = [4]", "feature_layers = [99]"), Exit::Usage, "feature_layers", None),
        ("text.shape wrong", |_, p| edit_manifest(p, "shape = [2, 32]", "shape = [3, 32]"), Exit::Usage, "text.shape", None),
        ("text.shape with three dims", |_, p| edit_manifest(p, "shape = [2, 32]", "shape = [2, 32, 1]"), Exit::Usage, "shape", None),
        ("output global missing", |_, p| edit_manifest(p, "name = \"global\"", "name = \"globl\""), Exit::Usage, "global", None),
        ("output shape wrong", |_, p| edit_manifest(p, "[\"batch\", 64, 32]", "[\"batch\", 65, 32]"), Exit::Usage, "outputs.local_4.shape", None),
        ("output shape past u64", |_, p| edit_manifest(p, "[\"batch\", 64, 32]", "[\"batch\", 18446744073709551616, 32]"), Exit::Usage, "manifest", None),
        ("files: model.onnx entry missing", |_, p| {
            let m = manifest(p);
            let line = m.lines().find(|l| l.starts_with("\"model.onnx\"")).expect("line").to_owned();
            edit_manifest(p, &line, "");
        }, Exit::Usage, "model.onnx", None),
        ("files: entry for a file that is not there", |_, p| edit_manifest(p, "[files]", "[files]\n\"extra.bin\" = \"00\""), Exit::Usage, "extra.bin", None),
        ("files: ../ path outside the package", |ctx, p| {
            let bytes = b"outside";
            write(&ctx.dir.join("outside.bin"), bytes);
            edit_manifest(p, "[files]", &format!("[files]\n\"../outside.bin\" = \"{}\"", sha256(bytes)));
        }, Exit::Usage, "../outside.bin", None),
        ("files: absolute path", |_, p| {
            let bytes = std::fs::read("/etc/hostname").unwrap_or_default();
            edit_manifest(p, "[files]", &format!("[files]\n\"/etc/hostname\" = \"{}\"", sha256(&bytes)));
        }, Exit::Usage, "/etc/hostname", None),
        ("text.file ../ outside the package", |ctx, p| {
            let t = std::fs::read(p.join("text.f32")).expect("text");
            write(&ctx.dir.join("t.f32"), &t);
            edit_manifest(p, "file = \"text.f32\"", "file = \"../t.f32\"");
            edit_manifest(p, "\"text.f32\" =", "\"../t.f32\" =");
        }, Exit::Usage, "../t.f32", None),
        ("model.onnx a symlink out of the package", |_, p| {
            std::fs::remove_file(p.join("model.onnx")).expect("rm");
            symlink(tiny().join("model.onnx"), &p.join("model.onnx"));
        }, Exit::Usage, "model.onnx", None),
        ("hash mismatch text.f32", |_, p| {
            let mut t = std::fs::read(p.join("text.f32")).expect("text");
            t[5] ^= 0x40;
            write(&p.join("text.f32"), t);
        }, Exit::Usage, "SHA-256 mismatch", None),
        ("hash mismatch model.onnx (one byte appended)", |_, p| {
            let mut m = std::fs::read(p.join("model.onnx")).expect("onnx");
            m.push(0);
            write(&p.join("model.onnx"), m);
        }, Exit::Usage, "SHA-256 mismatch", None),
        ("hash not hex", |_, p| {
            let t = sha256(&std::fs::read(p.join("text.f32")).expect("text"));
            edit_manifest(p, &t, "zz");
        }, Exit::Usage, "text.f32", None),
        ("hash in upper case still matches", |_, p| {
            let t = sha256(&std::fs::read(p.join("text.f32")).expect("text"));
            edit_manifest(p, &t, &t.to_uppercase());
        }, Exit::Ok, "\"score\"", None),
        ("text.f32 truncated", |_, p| {
            let t = std::fs::read(p.join("text.f32")).expect("text");
            replace_with_hash(p, "text.f32", &t[..200]);
        }, Exit::Usage, "expected 256 bytes", None),
        ("text.f32 empty", |_, p| replace_with_hash(p, "text.f32", b""), Exit::Usage, "expected 256 bytes", None),
        ("text.f32 with NaN", |_, p| {
            let mut t = std::fs::read(p.join("text.f32")).expect("text");
            t[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            replace_with_hash(p, "text.f32", &t);
        }, Exit::Usage, "NaN", None),
        ("text.f32 with inf", |_, p| {
            let mut t = std::fs::read(p.join("text.f32")).expect("text");
            t[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes());
            replace_with_hash(p, "text.f32", &t);
        }, Exit::Usage, "infinite", None),
        ("text.f32 all zeros (normal = anomalous prompt)", |_, p| replace_with_hash(p, "text.f32", &[0u8; 256]), Exit::Usage, "text.f32", None),
        ("text.f32 missing", |_, p| std::fs::remove_file(p.join("text.f32")).expect("rm"), Exit::Usage, "text.f32", None),
        ("text.f32 a FIFO", |_, p| {
            std::fs::remove_file(p.join("text.f32")).expect("rm");
            mkfifo(&p.join("text.f32"));
        }, Exit::Usage, "text.f32", None),
        ("text.f32 /dev/zero", |_, p| {
            std::fs::remove_file(p.join("text.f32")).expect("rm");
            symlink("/dev/zero", &p.join("text.f32"));
        }, Exit::Usage, "text.f32", None),
        ("model.onnx garbage", |_, p| replace_with_hash(p, "model.onnx", b"this is not protobuf at all"), Exit::Usage, "model.onnx", None),
        ("model.onnx empty", |_, p| replace_with_hash(p, "model.onnx", b""), Exit::Usage, "model.onnx", None),
        ("model.onnx truncated", |_, p| {
            let m = std::fs::read(p.join("model.onnx")).expect("onnx");
            replace_with_hash(p, "model.onnx", &m[..m.len() / 2]);
        }, Exit::Usage, "model.onnx", None),
        ("model.onnx missing", |_, p| std::fs::remove_file(p.join("model.onnx")).expect("rm"), Exit::Usage, "model.onnx", None),
        ("model.onnx a directory", |_, p| {
            std::fs::remove_file(p.join("model.onnx")).expect("rm");
            std::fs::create_dir(p.join("model.onnx")).expect("mkdir");
        }, Exit::Usage, "model.onnx", None),
        ("model.onnx a FIFO", |_, p| {
            std::fs::remove_file(p.join("model.onnx")).expect("rm");
            mkfifo(&p.join("model.onnx"));
        }, Exit::Usage, "model.onnx", None),
        ("model.onnx /dev/zero", |_, p| {
            std::fs::remove_file(p.join("model.onnx")).expect("rm");
            symlink("/dev/zero", &p.join("model.onnx"));
        }, Exit::Usage, "model.onnx", None),
        ("model.onnx is the fp16 graph under the fp32 name", |_, p| {
            let m = std::fs::read(p.join("model.fp16.onnx")).expect("fp16");
            replace_with_hash(p, "model.onnx", &m);
        }, Exit::Ok, "\"score\"", None),
        ("model.onnx input name differs from the manifest", |_, p| edit_manifest(p, "name = \"image\"", "name = \"pixels\""), Exit::Usage, "pixels", None),
    ];
    for (name, damage, exit, frag, pending) in table {
        let damage = *damage;
        let mut c = case(f, *name)
            .setup(move |ctx| {
                let p = pkg(ctx);
                damage(ctx, &p);
                good_png(&ctx.dir.join("img.png"));
                score_args(&p, &[&ctx.dir.join("img.png")], &[])
            })
            .exit(*exit)
            .ort()
            .timeout(20);
        if !frag.is_empty() {
            c = c.msg(*frag);
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    v.push(
        case(f, "--fast-load still checks a small file's hash")
            .setup(|ctx| {
                let p = pkg(ctx);
                let mut t = std::fs::read(p.join("text.f32")).expect("text");
                t[0] ^= 1;
                write(&p.join("text.f32"), t);
                good_png(&ctx.dir.join("img.png"));
                score_args(&p, &[&ctx.dir.join("img.png")], &["--fast-load"])
            })
            .exit(Exit::Usage)
            .msg("SHA-256 mismatch")
            .ort(),
    );
}

/// Images for `score`.
fn image_cases(v: &mut Vec<Case>) {
    let f = "image";
    type Make = fn(&Path);
    #[rustfmt::skip] // One row per case.
    let table: &[(&str, &str, Make, Exit, &str, Pending)] = &[
        ("empty file", "e.png", |p| write(p, b""), Exit::Items, "empty file", None),
        ("PNG signature only", "s.png", |p| write(p, b"\x89PNG\r\n\x1a\n"), Exit::Items, "corrupt or truncated", None),
        ("truncated PNG", "t.png", |p| {
            let b = png_bytes(64, 64);
            write(p, &b[..b.len() / 2]);
        }, Exit::Items, "corrupt or truncated", None),
        ("truncated JPEG", "t.jpg", |p| {
            let b = jpeg_bytes(64, 64);
            write(p, &b[..b.len() / 2]);
        }, Exit::Items, "t.jpg", None),
        ("JPEG SOI marker only", "soi.jpg", |p| write(p, b"\xff\xd8\xff"), Exit::Items, "soi.jpg", None),
        ("truncated BMP", "t.bmp", |p| {
            let b = bmp_bytes(64, 64);
            write(p, &b[..b.len() / 2]);
        }, Exit::Items, "t.bmp", None),
        ("BMP header only", "h.bmp", |p| write(p, &bmp_bytes(4, 4)[..20]), Exit::Items, "h.bmp", None),
        ("PNG with a bad CRC", "corrupt.png", |p| {
            std::fs::copy(fixture("images/bad/corrupt.png"), p).expect("copy");
        }, Exit::Items, "corrupt", None),
        ("PNG declaring 20000x20000 (decompression bomb)", "huge.png", |p| {
            std::fs::copy(fixture("images/bad/huge.png"), p).expect("copy");
        }, Exit::Items, "megapixels", None),
        ("JPEG declaring a huge size", "huge.jpg", |p| {
            std::fs::copy(fixture("images/bad/huge.jpg"), p).expect("copy");
        }, Exit::Items, "megapixels", None),
        ("BMP declaring a huge size", "huge.bmp", |p| {
            std::fs::copy(fixture("images/bad/huge.bmp"), p).expect("copy");
        }, Exit::Items, "megapixels", None),
        ("PNG declaring 2^31-1 x 2^31-1", "max.png", |p| write(p, png_header_only(0x7fff_ffff, 0x7fff_ffff)), Exit::Items, "max.png", None),
        ("PNG declaring 4294967295 x 1 (past the spec)", "wide.png", |p| write(p, png_header_only(u32::MAX, 1)), Exit::Items, "wide.png", None),
        ("PNG with zero width", "zw.png", |p| write(p, png_header_only(0, 16)), Exit::Items, "zw.png", None),
        ("PNG with zero height", "zh.png", |p| write(p, png_header_only(16, 0)), Exit::Items, "zh.png", None),
        ("BMP with zero width", "zw.bmp", |p| write(p, bmp_header(0, 4, 54, &[])), Exit::Items, "zw.bmp", None),
        ("BMP with negative width", "nw.bmp", |p| write(p, bmp_header(-4, 4, 54, &[0; 48])), Exit::Items, "corrupt", None),
        ("BMP with i32::MIN height", "minh.bmp", |p| write(p, bmp_header(4, i32::MIN, 54, &[0; 48])), Exit::Items, "minh.bmp", None),
        ("BMP declaring 2^31-1 x 2^31-1", "big.bmp", |p| write(p, bmp_header(i32::MAX, i32::MAX, 54, &[0; 48])), Exit::Items, "big.bmp", None),
        ("BMP with a data offset past the end", "off.bmp", |p| write(p, bmp_header(4, 4, u32::MAX, &[0; 48])), Exit::Items, "off.bmp", None),
        ("BMP top-down (negative height) is scored", "td.bmp", |p| write(p, bmp_header(4, -4, 54, &[90; 48])), Exit::Ok, "\"score\"", None),
        ("PNG named .jpg is scored by content", "png.jpg", |p| write(p, png_bytes(32, 32)), Exit::Ok, "\"score\"", None),
        ("JPEG named .png is scored by content", "jpg.png", |p| write(p, jpeg_bytes(32, 32)), Exit::Ok, "\"score\"", None),
        ("JPEG named .bmp is scored by content", "jpg.bmp", |p| write(p, jpeg_bytes(32, 32)), Exit::Ok, "\"score\"", None),
        ("text named .png", "text.png", |p| write(p, "hello, this is not an image\n"), Exit::Items, "unsupported format", None),
        ("GIF", "g.gif", |p| {
            std::fs::copy(fixture("images/bad/gif.gif"), p).expect("copy");
        }, Exit::Items, "unsupported format", None),
        ("directory", "dir.png", |p| std::fs::create_dir(p).expect("mkdir"), Exit::Items, "dir.png", None),
        ("FIFO", "fifo.png", mkfifo, Exit::Items, "fifo.png", None),
        ("/dev/zero via a symlink", "zero.png", |p| symlink("/dev/zero", p), Exit::Items, "zero.png", None),
        ("/dev/urandom via a symlink", "random.png", |p| symlink("/dev/urandom", p), Exit::Items, "random.png", None),
        ("dangling symlink", "dangling.png", |p| symlink("/nonexistent/x.png", p), Exit::Items, "dangling.png", None),
        ("missing file", "missing.png", |_| {}, Exit::Items, "missing.png", None),
        ("16-bit grayscale PNG", "gray16.png", |p| {
            std::fs::copy(fixture("images/files/gray16.png"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("16-bit gray+alpha PNG", "la16.png", |p| {
            std::fs::copy(fixture("images/files/la16.png"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("palette PNG", "palette.png", |p| {
            std::fs::copy(fixture("images/files/palette.png"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("1-bit palette PNG", "palette1.png", |p| {
            std::fs::copy(fixture("images/files/palette1.png"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("grayscale+alpha PNG", "la.png", |p| {
            std::fs::copy(fixture("images/files/la.png"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("CMYK JPEG", "cmyk.jpg", |p| {
            std::fs::copy(fixture("images/files/cmyk.jpg"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("progressive JPEG", "prog.jpg", |p| {
            std::fs::copy(fixture("images/files/q85_420_progressive.jpg"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("palette BMP", "palette.bmp", |p| {
            std::fs::copy(fixture("images/files/palette.bmp"), p).expect("copy");
        }, Exit::Ok, "\"score\"", None),
        ("1x1 PNG", "one.png", |p| write(p, png_bytes(1, 1)), Exit::Ok, "\"score\"", None),
        ("1x5000 PNG (extreme aspect ratio)", "thin.png", |p| write(p, png_bytes(1, 5000)), Exit::Ok, "\"score\"", None),
        ("uniform black PNG", "black.png", |p| write(p, gray_png(64, 64, 0)), Exit::Ok, "\"score\"", None),
        ("PNG with garbage after IEND", "trail.png", |p| {
            let mut b = png_bytes(16, 16);
            b.extend_from_slice(&[0xAB; 4096]);
            write(p, b);
        }, Exit::Clean, "", None),
        ("PNG with a 16 MB tEXt chunk", "text.png", |p| {
            let b = png_bytes(16, 16);
            let mut out = b[..33].to_vec();
            let data = vec![b'a'; 16 << 20];
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut crc_in = b"tEXt".to_vec();
            crc_in.extend_from_slice(&data);
            out.extend_from_slice(&crc_in);
            out.extend_from_slice(&crc32(&crc_in).to_be_bytes());
            out.extend_from_slice(&b[33..]);
            write(p, out);
        }, Exit::Clean, "", None),
    ];
    for (name, file, make, exit, frag, pending) in table {
        let (file, make) = (*file, *make);
        let scored = usize::from(*exit == Exit::Ok);
        let mut c = case(f, *name)
            .setup(move |ctx| {
                make(&ctx.dir.join(file));
                score_image(ctx, file)
            })
            .exit(*exit)
            .ort()
            .timeout(20);
        if matches!(exit, Exit::Ok | Exit::Items) {
            c = c.check(lines_check(1, scored));
        }
        if !frag.is_empty() {
            c = c.msg(*frag);
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    v.push(
        case(f, "one good and one bad image: the good one is scored")
            .setup(|ctx| {
                good_png(&ctx.dir.join("good.png"));
                write(&ctx.dir.join("bad.png"), b"nope");
                score_args(
                    &tiny(),
                    &[&ctx.dir.join("bad.png"), &ctx.dir.join("good.png")],
                    &[],
                )
            })
            .exit(Exit::Items)
            .ort()
            .check(lines_check(2, 1)),
    );
    v.push(
        case(f, "the same image twice gives two lines")
            .setup(|ctx| {
                good_png(&ctx.dir.join("a.png"));
                score_args(
                    &tiny(),
                    &[&ctx.dir.join("a.png"), &ctx.dir.join("a.png")],
                    &[],
                )
            })
            .exit(Exit::Ok)
            .ort()
            .check(lines_check(2, 2)),
    );
    v.push(
        case(
            f,
            "file name with a newline and a quote: still one JSON line",
        )
        .setup(|ctx| {
            let name = "new\nline\".png";
            good_png(&ctx.dir.join(name));
            score_image(ctx, name)
        })
        .exit(Exit::Ok)
        .ort()
        .check(lines_check(1, 1)),
    );
    v.push(
        case(f, "file name that is not UTF-8")
            .setup(|ctx| {
                let name = OsString::from_vec(b"bad\xff\xfename.png".to_vec());
                good_png(&ctx.dir.join(&name));
                score_args(&tiny(), &[&ctx.dir.join(&name)], &[])
            })
            .exit(Exit::Ok)
            .ort()
            .check(lines_check(1, 1)),
    );
    v.push(
        case(
            f,
            "same stem in two folders with --map-png: two maps, none overwritten",
        )
        .setup(|ctx| {
            good_png(&ctx.dir.join("a/x.png"));
            good_png(&ctx.dir.join("b/x.png"));
            score_args(
                &tiny(),
                &[&ctx.dir.join("a/x.png"), &ctx.dir.join("b/x.png")],
                &["--map-png", "maps"],
            )
        })
        .exit(Exit::Ok)
        .ort()
        .check(|ctx, _| {
            let n = std::fs::read_dir(ctx.dir.join("maps"))
                .map(|d| d.count())
                .unwrap_or(0);
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} map file(s), expected 2"))
            }
        }),
    );
    for (opt, out) in [
        // Every name the output may have (`<stem>.map.png`, `<stem>.overlay.png`, …).
        ("--map-png", ["img.png", "img.map.png"]),
        ("--overlay", ["img.png", "img.overlay.png"]),
        ("--raw-map", ["img.map.f32", "img.f32"]),
    ] {
        v.push(
            case(
                f,
                format!("{opt} write fails: the image's JSON line has the error"),
            )
            .setup(move |ctx| {
                good_png(&ctx.dir.join("img.png"));
                // A directory where the output file goes makes the write fail.
                for name in out {
                    std::fs::create_dir_all(ctx.dir.join("out").join(name)).expect("mkdir");
                }
                score_args(&tiny(), &[&ctx.dir.join("img.png")], &[opt, "out"])
            })
            .exit(Exit::Items)
            .msg("img")
            .ort()
            .check(|_, o| {
                // The image was scored; its line must carry the write error (it may keep the
                // score).
                let lines: Vec<Value> = o
                    .stdout
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                if lines.len() == 1 && lines[0]["error"].is_string() {
                    Ok(())
                } else {
                    Err(format!(
                        "expected one JSON line with `error`, got {lines:?}"
                    ))
                }
            }),
        );
        v.push(
            case(f, format!("{opt} into a path that is a file"))
                .setup(move |ctx| {
                    good_png(&ctx.dir.join("img.png"));
                    write(&ctx.dir.join("out"), "x");
                    score_args(&tiny(), &[&ctx.dir.join("img.png")], &[opt, "out"])
                })
                .exit(Exit::Usage)
                .msg("cannot create output directory")
                .ort(),
        );
    }
}

/// A small MVTec-style tree: class `widget`, 2 good + 2 anomalous images (32x32) with masks.
fn mvtec(root: &Path, masks: bool) {
    for (species, i) in [("good", 0), ("good", 1), ("crack", 0), ("crack", 1)] {
        let p = root.join(format!("widget/test/{species}/00{i}.png"));
        write(&p, png_bytes(32 + i, 32));
        if masks && species != "good" {
            let mut m = vec![0u8; 32 * 32];
            m[..100].fill(255);
            let img = image::GrayImage::from_raw(32, 32, m).expect("mask");
            let mp = root.join(format!("widget/ground_truth/{species}/00{i}_mask.png"));
            std::fs::create_dir_all(mp.parent().expect("parent")).expect("mkdir");
            img.save(&mp).expect("mask png");
        }
    }
}

/// `eval` of `data` with the tiny package (`--threads 1` unless `extra` sets it).
fn eval_args(ctx: &Ctx, extra: &[&str]) -> Vec<OsString> {
    let mut a = args(&["--log", "warn", "eval", "--no-progress"]);
    if !extra.contains(&"--threads") {
        a.extend(args(&["--threads", "1"]));
    }
    a.push(os("--model"));
    a.push(os(tiny()));
    a.extend(args(&["--data", "data", "--out", "out"]));
    a.extend(extra.iter().map(os));
    let _ = ctx;
    a
}

fn meta_json(items: &str) -> String {
    format!("{{\"train\": {{}}, \"test\": {{\"widget\": [{items}]}}}}")
}

fn meta_item(img: &str, mask: &str, anomaly: i64) -> String {
    format!(
        "{{\"img_path\": \"{img}\", \"mask_path\": \"{mask}\", \"cls_name\": \"widget\", \"specie_name\": \"{}\", \"anomaly\": {anomaly}}}",
        if anomaly == 0 { "good" } else { "crack" }
    )
}

/// Datasets for `eval` and `dataset-meta`.
fn dataset_cases(v: &mut Vec<Case>) {
    let f = "dataset";
    // dataset-meta
    v.push(
        case(f, "dataset-meta on an empty tree: exit 2, nothing written")
            .msg("data")
            .setup(|ctx| {
                std::fs::create_dir_all(ctx.dir.join("data")).expect("mkdir");
                args(&["dataset-meta", "data"])
            })
            .exit(Exit::Usage)
            .check(|ctx, _| {
                if ctx.dir.join("data/meta.json").exists() {
                    Err("meta.json was written".into())
                } else {
                    Ok(())
                }
            }),
    );
    v.push(
        case(f, "dataset-meta on a tree of empty class folders")
            .setup(|ctx| {
                std::fs::create_dir_all(ctx.dir.join("data/widget/test/good")).expect("mkdir");
                args(&["dataset-meta", "data"])
            })
            .exit(Exit::Usage),
    );
    v.push(
        case(f, "dataset-meta on a missing root")
            .setup(|_| args(&["dataset-meta", "nonexistent"]))
            .exit(Exit::Usage)
            .msg("nonexistent"),
    );
    v.push(
        case(f, "dataset-meta on a file")
            .setup(|ctx| {
                write(&ctx.dir.join("data"), "x");
                args(&["dataset-meta", "data"])
            })
            .exit(Exit::Usage)
            .msg("data"),
    );
    v.push(
        case(f, "dataset-meta on a good tree writes meta.json")
            .setup(|ctx| {
                mvtec(&ctx.dir.join("data"), true);
                args(&["dataset-meta", "data"])
            })
            .exit(Exit::Ok)
            .check(|ctx, _| {
                let text = std::fs::read_to_string(ctx.dir.join("data/meta.json"))
                    .map_err(|e| e.to_string())?;
                let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                let n = v["test"]["widget"].as_array().map_or(0, Vec::len);
                if n == 4 {
                    Ok(())
                } else {
                    Err(format!("{n} items in meta.json, expected 4"))
                }
            }),
    );
    v.push(
        case(f, "dataset-meta does not overwrite without --force")
            .setup(|ctx| {
                mvtec(&ctx.dir.join("data"), true);
                write(&ctx.dir.join("data/meta.json"), "precious");
                args(&["dataset-meta", "data"])
            })
            .exit(Exit::Usage)
            .msg("--force")
            .check(|ctx, _| {
                if std::fs::read_to_string(ctx.dir.join("data/meta.json")).unwrap_or_default()
                    == "precious"
                {
                    Ok(())
                } else {
                    Err("meta.json was overwritten".into())
                }
            }),
    );
    v.push(
        case(f, "dataset-meta --output into a missing directory")
            .setup(|ctx| {
                mvtec(&ctx.dir.join("data"), true);
                args(&["dataset-meta", "data", "--output", "no/such/dir/meta.json"])
            })
            .exit(Exit::Usage)
            .msg("meta.json"),
    );
    v.push(
        case(
            f,
            "dataset-meta with a FIFO and a directory named like images",
        )
        .setup(|ctx| {
            mvtec(&ctx.dir.join("data"), true);
            mkfifo(&ctx.dir.join("data/widget/test/good/fifo.png"));
            std::fs::create_dir_all(ctx.dir.join("data/widget/test/good/dir.png")).expect("mkdir");
            args(&["dataset-meta", "data"])
        })
        .exit(Exit::Clean)
        .timeout(10),
    );
    v.push(
        case(f, "dataset-meta --layout bogus")
            .setup(|ctx| {
                mvtec(&ctx.dir.join("data"), true);
                args(&["dataset-meta", "data", "--layout", "bogus"])
            })
            .exit(Exit::Usage)
            .msg("bogus"),
    );
    // eval
    type Make = fn(&Ctx);
    /// (name, make the tree, extra `eval` options, exit, message fragment, pending).
    type Row = (
        &'static str,
        Make,
        &'static [&'static str],
        Exit,
        &'static str,
        Pending,
    );
    #[rustfmt::skip] // One row per case.
    let table: &[Row] = &[
        ("good tree evaluates (sanity)", |ctx| mvtec(&ctx.dir.join("data"), true), &[], Exit::Ok, "widget", None),
        ("empty root", |ctx| std::fs::create_dir_all(ctx.dir.join("data")).expect("mkdir"), &[], Exit::Usage, "data", None),
        ("root missing", |_| {}, &[], Exit::Usage, "data", None),
        ("root is a file", |ctx| write(&ctx.dir.join("data"), "x"), &[], Exit::Usage, "data", None),
        ("no masks at all: image metrics only", |ctx| mvtec(&ctx.dir.join("data"), false), &[], Exit::Ok, "widget", None),
        ("one mask missing: warning, still a report", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            std::fs::remove_file(ctx.dir.join("data/widget/ground_truth/crack/001_mask.png")).expect("rm");
        }, &[], Exit::Ok, "001", None),
        ("one mask missing with --strict", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            std::fs::remove_file(ctx.dir.join("data/widget/ground_truth/crack/001_mask.png")).expect("rm");
        }, &["--strict"], Exit::Usage, "001", None),
        ("mask of the wrong size", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/widget/ground_truth/crack/000_mask.png"), gray_png(7, 3, 255));
        }, &[], Exit::Ok, "000", None),
        ("mask garbage", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/widget/ground_truth/crack/000_mask.png"), "garbage");
        }, &[], Exit::Ok, "cannot read mask", None),
        // An unreadable mask is a warning (image metrics only), as for "mask garbage": no hang.
        ("mask a FIFO", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            let m = ctx.dir.join("data/widget/ground_truth/crack/000_mask.png");
            std::fs::remove_file(&m).expect("rm");
            mkfifo(&m);
        }, &[], Exit::Ok, "000_mask.png", None),
        ("image garbage: skipped, others scored", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/widget/test/good/001.png"), "garbage");
        }, &[], Exit::Items, "001.png", None),
        ("image a FIFO: skipped, no hang", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            let p = ctx.dir.join("data/widget/test/good/001.png");
            std::fs::remove_file(&p).expect("rm");
            mkfifo(&p);
        }, &[], Exit::Items, "001.png", None),
        ("image a directory named .png", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            std::fs::create_dir_all(ctx.dir.join("data/widget/test/good/dir.png")).expect("mkdir");
        }, &[], Exit::Ok, "", None),
        ("image a dangling symlink", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            symlink("/nonexistent/x.png", &ctx.dir.join("data/widget/test/good/002.png"));
        }, &[], Exit::Items, "002.png", None),
        ("meta.json malformed", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/meta.json"), "{\"test\": {\"widget\": [");
        }, &[], Exit::Usage, "meta.json", None),
        ("meta.json invalid UTF-8", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/meta.json"), b"{\"test\": {\"w\xff\": []}}");
        }, &[], Exit::Usage, "meta.json", None),
        ("meta.json empty object (no items)", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/meta.json"), "{}");
        }, &[], Exit::Usage, "nothing to evaluate", None),
        ("meta.json nested 100000 deep", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/meta.json"), "[".repeat(100_000));
        }, &[], Exit::Usage, "meta.json", None),
        ("meta.json 20 MB of whitespace", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            let mut t = " ".repeat(20 << 20);
            t.push_str("{}");
            write(&ctx.dir.join("data/meta.json"), t);
        }, &[], Exit::Usage, "nothing to evaluate", None),
        ("meta.json a FIFO", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            mkfifo(&ctx.dir.join("data/meta.json"));
        }, &[], Exit::Usage, "meta.json", None),
        ("meta.json /dev/zero", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            symlink("/dev/zero", &ctx.dir.join("data/meta.json"));
        }, &[], Exit::Usage, "meta.json", None),
        ("meta.json anomaly -1", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("data/meta.json"), meta_json(&meta_item("widget/test/good/000.png", "", -1)));
        }, &[], Exit::Usage, "meta.json", None),
        ("meta.json anomaly 7", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            let items = [
                meta_item("widget/test/good/000.png", "", 0),
                meta_item("widget/test/crack/000.png", "", 7),
            ];
            write(&ctx.dir.join("data/meta.json"), meta_json(&items.join(",")));
        }, &[], Exit::Refused, "widget/test/crack/000.png", None),
        ("meta.json image path outside the root (../)", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("outside.png"), png_bytes(32, 32));
            let items = [
                meta_item("widget/test/good/000.png", "", 0),
                meta_item("../outside.png", "", 0),
                meta_item("widget/test/crack/000.png", "widget/ground_truth/crack/000_mask.png", 1),
            ];
            write(&ctx.dir.join("data/meta.json"), meta_json(&items.join(",")));
        }, &[], Exit::Refused, "../outside.png", None),
        ("meta.json absolute image path inside the root (official br35 and others write them)", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            let abs = ctx.dir.join("data/widget/test/good/001.png").display().to_string();
            let items = [
                meta_item("widget/test/good/000.png", "", 0),
                meta_item(&abs, "", 0),
                meta_item("widget/test/crack/000.png", "widget/ground_truth/crack/000_mask.png", 1),
            ];
            write(&ctx.dir.join("data/meta.json"), meta_json(&items.join(",")));
        }, &[], Exit::Ok, "widget", None),
        ("meta.json absolute image path outside the root", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("outside.png"), png_bytes(32, 32));
            let abs = ctx.dir.join("data/../outside.png").display().to_string();
            let items = [
                meta_item("widget/test/good/000.png", "", 0),
                meta_item(&abs, "", 0),
                meta_item("widget/test/crack/000.png", "widget/ground_truth/crack/000_mask.png", 1),
            ];
            write(&ctx.dir.join("data/meta.json"), meta_json(&items.join(",")));
        }, &[], Exit::Refused, "outside.png", None),
        ("meta.json mask path outside the root", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("outside_mask.png"), gray_png(32, 32, 255));
            let items = [
                meta_item("widget/test/good/000.png", "", 0),
                meta_item("widget/test/crack/000.png", "../outside_mask.png", 1),
            ];
            write(&ctx.dir.join("data/meta.json"), meta_json(&items.join(",")));
        }, &[], Exit::Refused, "outside_mask.png", None),
        ("--batch 0", |ctx| mvtec(&ctx.dir.join("data"), true), &["--batch", "0"], Exit::Usage, "batch", None),
        ("--batch 1000000 (over the bound)", |ctx| mvtec(&ctx.dir.join("data"), true), &["--batch", "1000000"], Exit::Usage, "--batch 1000000", None),
        ("--batch past u64", |ctx| mvtec(&ctx.dir.join("data"), true), &["--batch", "18446744073709551616"], Exit::Usage, "batch", None),
        ("--threads 100000", |ctx| mvtec(&ctx.dir.join("data"), true), &["--threads", "100000"], Exit::Usage, "threads", None),
        ("--classes unknown", |ctx| mvtec(&ctx.dir.join("data"), true), &["--classes", "nosuch"], Exit::Usage, "nosuch", None),
        ("--layout sdd on an mvtec tree", |ctx| mvtec(&ctx.dir.join("data"), true), &["--layout", "sdd"], Exit::Usage, "data", None),
        ("--out is a file", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("out"), "x");
        }, &[], Exit::Usage, "out", None),
        ("--dump-maps is a file", |ctx| {
            mvtec(&ctx.dir.join("data"), true);
            write(&ctx.dir.join("maps"), "x");
        }, &["--dump-maps", "maps"], Exit::Usage, "maps", None),
        ("--meta names a missing file", |ctx| mvtec(&ctx.dir.join("data"), true), &["--meta", "nosuch.json"], Exit::Usage, "nosuch.json", None),
    ];
    for (name, make, extra, exit, frag, pending) in table {
        let (make, extra) = (*make, *extra);
        let mut c = case(f, format!("eval: {name}"))
            .setup(move |ctx| {
                make(ctx);
                eval_args(ctx, extra)
            })
            .exit(*exit)
            .ort()
            .timeout(40);
        if !frag.is_empty() {
            c = c.msg(*frag);
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    v.push(
        case(f, "eval report has no NaN")
            .setup(|ctx| {
                mvtec(&ctx.dir.join("data"), true);
                eval_args(ctx, &[])
            })
            .exit(Exit::Ok)
            .ort()
            .timeout(40)
            .check(|ctx, _| {
                let t = std::fs::read_to_string(ctx.dir.join("out/eval-report.json"))
                    .map_err(|e| format!("eval-report.json: {e}"))?;
                if t.contains("NaN") || t.contains("Infinity") {
                    return Err("eval-report.json has NaN/Infinity".into());
                }
                Ok(())
            }),
    );
}

/// Queue and alarm-state files in the state directory, for `run` (a real broker; SIGTERM after
/// a few seconds).
fn state_cases(v: &mut Vec<Case>) {
    let f = "state";
    let alarm = |id: u64, active: bool| {
        format!(
            "{{\"op\":\"add\",\"id\":{id},\"alarm\":{{\"camera\":\"cam\",\"active\":{active},\"seq\":{id},\"ts_ms\":1700000000000,\"score\":0.9}}}}\n"
        )
    };
    let a1 = alarm(1, true);
    let a2 = alarm(2, false);
    type Make = Box<dyn Fn(&Path) + Send + Sync>;
    #[rustfmt::skip] // One row per case.
    let table: Vec<(&str, Make, Exit, &str, Pending)> = vec![
        ("clean start (sanity)", Box::new(|_: &Path| {}), Exit::Ok, "", None),
        ("queue file garbage", Box::new(|s: &Path| write(&s.join("alarm-queue.v1.jsonl"), "garbage\nmore garbage\n")), Exit::Ok, "alarm queue", None),
        ("queue file torn last record", { let a1 = a1.clone(); Box::new(move |s: &Path| write(&s.join("alarm-queue.v1.jsonl"), format!("{a1}{{\"op\":\"add\",\"id\":2,\"al"))) }, Exit::Ok, "torn", None),
        ("queue file invalid UTF-8 before good records", { let (a1, a2) = (a1.clone(), a2.clone()); Box::new(move |s: &Path| {
            let mut b = a1.as_bytes().to_vec();
            b.extend_from_slice(b"\xff\xfe garbage\n");
            b.extend_from_slice(a2.as_bytes());
            write(&s.join("alarm-queue.v1.jsonl"), b);
        }) }, Exit::Ok, "alarms=2", None),
        ("queue record id u64::MAX", Box::new(|s: &Path| write(&s.join("alarm-queue.v1.jsonl"), "{\"op\":\"add\",\"id\":18446744073709551615,\"alarm\":{\"camera\":\"cam\",\"active\":true,\"seq\":1,\"ts_ms\":1,\"score\":0.9}}\n")), Exit::Ok, "alarms=1", None),
        ("queue record id past u64", Box::new(|s: &Path| write(&s.join("alarm-queue.v1.jsonl"), "{\"op\":\"add\",\"id\":18446744073709551616,\"alarm\":{\"camera\":\"cam\",\"active\":true,\"seq\":1,\"ts_ms\":1,\"score\":0.9}}\n")), Exit::Ok, "alarm queue", None),
        ("queue file a directory", Box::new(|s: &Path| std::fs::create_dir_all(s.join("alarm-queue.v1.jsonl")).expect("mkdir")), Exit::Clean, "alarm-queue", None),
        ("queue file a FIFO", Box::new(|s: &Path| mkfifo(&s.join("alarm-queue.v2"))), Exit::Clean, "alarm-queue", None),
        ("queue file /dev/zero", Box::new(|s: &Path| symlink("/dev/zero", &s.join("alarm-queue.v1.jsonl"))), Exit::Clean, "alarm-queue", None),
        ("alarm state garbage", Box::new(|s: &Path| write(&s.join("alarm-state.v1.json"), "garbage")), Exit::Ok, "alarm state", None),
        ("alarm state invalid UTF-8", Box::new(|s: &Path| write(&s.join("alarm-state.v1.json"), b"{\"cam\": \xff}")), Exit::Ok, "alarm state", None),
        ("alarm state a directory", Box::new(|s: &Path| std::fs::create_dir_all(s.join("alarm-state.v1.json")).expect("mkdir")), Exit::Clean, "alarm", None),
        ("overrides garbage", Box::new(|s: &Path| write(&s.join("overrides.v1.json"), "garbage")), Exit::Ok, "overrides unreadable", None),
        ("overrides invalid UTF-8", Box::new(|s: &Path| write(&s.join("overrides.v1.json"), b"{\"cameras\": \xff}")), Exit::Ok, "overrides unreadable", None),
        ("overrides a directory", Box::new(|s: &Path| std::fs::create_dir_all(s.join("overrides.v1.json")).expect("mkdir")), Exit::Ok, "overrides unreadable", None),
        ("overrides /dev/zero", Box::new(|s: &Path| symlink("/dev/zero", &s.join("overrides.v1.json"))), Exit::Ok, "overrides unreadable", None),
        ("overrides threshold out of range", Box::new(|s: &Path| write(&s.join("overrides.v1.json"), "{\"cameras\":{\"cam\":{\"thresholds\":{\"\":{\"t2\":5.0,\"t1\":-1}}}}}")), Exit::Ok, "not applied", None),
        ("overrides threshold 1e400", Box::new(|s: &Path| write(&s.join("overrides.v1.json"), "{\"cameras\":{\"cam\":{\"thresholds\":{\"\":{\"t2\":1e400}}}}}")), Exit::Ok, "overrides", None),
        ("overrides disable an unknown camera", Box::new(|s: &Path| write(&s.join("overrides.v1.json"), "{\"cameras\":{\"ghost\":{\"enabled\":false}}}")), Exit::Ok, "no such camera", None),
    ];
    for (name, make, exit, frag, pending) in table {
        let mut c = case(f, format!("run: {name}"))
            .setup(run_cfg(move |ctx, t| {
                let s = ctx.dir.join("state");
                std::fs::create_dir_all(&s).expect("mkdir state");
                make(&s);
                replace(
                    t,
                    &format!("port = {}", ctx.port),
                    &format!(
                        "port = {}\nclient_id = \"hostile-{}\"",
                        ctx.port,
                        ctx.dir
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    ),
                )
            }))
            .exit(exit)
            .broker()
            .signal(4000, libc::SIGTERM);
        if !frag.is_empty() {
            c = c.msg(frag);
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
    v.push(
        case(
            f,
            "run: symlinks planted at the state files' temporary names are not followed",
        )
        .setup(run_cfg(|ctx, t| {
            let s = ctx.dir.join("state");
            std::fs::create_dir_all(&s).expect("mkdir state");
            for tmp in [
                "alarm-queue.v1.jsonl.tmp",
                "alarm-state.v1.json.tmp",
                "alarm-queue.v2.tmp",
                "alarm-state.v2.json.tmp",
            ] {
                let target = ctx.dir.join(format!("precious-{tmp}"));
                write(&target, "precious");
                symlink(&target, &s.join(tmp));
            }
            // Threshold 0: every frame is anomalous, so the alarm is raised and saved.
            replace(
                replace(t, "threshold = 0.5", "threshold = 0.0"),
                &format!("port = {}", ctx.port),
                &format!("port = {}\nclient_id = \"hostile-symlink\"", ctx.port),
            )
        }))
        .exit(Exit::Ok)
        .broker()
        .signal(5000, libc::SIGTERM)
        .check(|ctx, _| {
            for e in std::fs::read_dir(&ctx.dir).map_err(|e| e.to_string())? {
                let p = e.map_err(|e| e.to_string())?.path();
                if p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("precious-"))
                    && std::fs::read_to_string(&p).unwrap_or_default() != "precious"
                {
                    return Err(format!(
                        "{} outside the state directory was overwritten",
                        p.display()
                    ));
                }
            }
            Ok(())
        }),
    );
}

/// Command-line options.
fn cli_cases(v: &mut Vec<Case>) {
    let f = "cli";
    type Make = fn(&Ctx) -> Vec<OsString>;
    #[rustfmt::skip] // One row per case.
    let table: &[(&str, Make, Exit, &str, bool, Pending)] = &[
        ("score --threads 0 (all cores)", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = score_image(ctx, "i.png"); a.splice(3..5, [os("--threads"), os("0")]); a }, Exit::Ok, "\"score\"", true, None),
        ("score --threads 100000", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = score_image(ctx, "i.png"); a.splice(3..5, [os("--threads"), os("100000")]); a }, Exit::Usage, "threads", true, None),
        ("score --threads -1", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = score_image(ctx, "i.png"); a.splice(3..5, [os("--threads"), os("-1")]); a }, Exit::Usage, "-1", false, None),
        ("score --threads abc", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = score_image(ctx, "i.png"); a.splice(3..5, [os("--threads"), os("abc")]); a }, Exit::Usage, "abc", false, None),
        ("score --threads past u64", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = score_image(ctx, "i.png"); a.splice(3..5, [os("--threads"), os("18446744073709551616")]); a }, Exit::Usage, "threads", false, None),
        ("score --threads given twice", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = score_image(ctx, "i.png"); a.splice(3..3, [os("--threads"), os("2")]); a }, Exit::Usage, "threads", false, None),
        ("score --threshold nan", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--threshold", "nan"]) }, Exit::Usage, "--threshold", false, None),
        ("score --threshold inf", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--threshold", "inf"]) }, Exit::Usage, "--threshold", false, None),
        ("score --threshold -0.5", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--threshold=-0.5"]) }, Exit::Usage, "--threshold", false, None),
        ("score --threshold 1e39 (past f32)", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--threshold", "1e39"]) }, Exit::Usage, "--threshold", false, None),
        ("score --pixel-threshold 2", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--pixel-threshold", "2"]) }, Exit::Usage, "--pixel-threshold", false, None),
        ("score --threshold 0 and 1 (edges) are accepted", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--threshold", "0", "--pixel-threshold", "1"]) }, Exit::Ok, "\"anomaly\":true", true, None),
        ("score --backend fpga", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--backend", "fpga"]) }, Exit::Usage, "fpga", false, None),
        ("score --head gpu without a GPU", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--head", "gpu"]) }, Exit::Clean, "", true, None),
        ("score --backend tensorrt without TensorRT", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--backend", "tensorrt"]) }, Exit::Clean, "", true, None),
        ("score --ort-library missing", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--ort-library", "/nonexistent/libonnxruntime.so"]) }, Exit::Usage, "ONNX Runtime library", false, None),
        ("score --ort-library a text file", |ctx| { good_png(&ctx.dir.join("i.png")); write(&ctx.dir.join("lib.so"), "not a library"); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--ort-library", "lib.so"]) }, Exit::Usage, "ONNX Runtime library", false, None),
        ("score --ort-library /dev/zero", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--ort-library", "/dev/zero"]) }, Exit::Usage, "ONNX Runtime library", false, None),
        ("score --ort-library a directory", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--ort-library", "/tmp"]) }, Exit::Usage, "ONNX Runtime library", false, None),
        ("score unknown flag", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--frobnicate"]) }, Exit::Usage, "--frobnicate", false, None),
        ("score --model without a value", |_| args(&["score", "--model"]), Exit::Usage, "--model", false, None),
        ("score without images", |_| { let mut a = args(&["score", "--model"]); a.push(os(tiny())); a }, Exit::Usage, "IMAGES", false, None),
        ("score without --model", |ctx| { good_png(&ctx.dir.join("i.png")); args(&["score", "i.png"]) }, Exit::Usage, "--model", false, None),
        ("score --model path with a newline", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = args(&["score", "--model", "no\nsuch"]); a.push(os("i.png")); a }, Exit::Usage, "no such directory", true, None),
        ("score --fast-load given twice", |ctx| { good_png(&ctx.dir.join("i.png")); score_args(&tiny(), &[&ctx.dir.join("i.png")], &["--fast-load", "--fast-load"]) }, Exit::Usage, "fast-load", false, None),
        ("score argument that is not UTF-8", |ctx| { good_png(&ctx.dir.join("i.png")); let mut a = score_image(ctx, "i.png"); a.insert(2, OsString::from_vec(b"--thr\xffeshold".to_vec())); a }, Exit::Usage, "", false, None),
        ("no subcommand", |_| Vec::new(), Exit::Usage, "Usage", false, None),
        ("unknown subcommand", |_| args(&["frobnicate"]), Exit::Usage, "frobnicate", false, None),
        ("--help", |_| args(&["--help"]), Exit::Ok, "Usage", false, None),
        ("--version", |_| args(&["--version"]), Exit::Ok, "anomalyclip-edge", false, None),
        ("--log with a garbage filter", |_| args(&["--log", "[[[=x=", "check-config", "nonexistent.toml"]), Exit::Usage, "nonexistent.toml", false, None),
        ("check-config without a file", |_| args(&["check-config"]), Exit::Usage, "FILE", false, None),
        ("check-config with two files", |_| args(&["check-config", "a.toml", "b.toml"]), Exit::Usage, "b.toml", false, None),
        ("check-config path with a newline", |_| args(&["check-config", "no\nsuch.toml"]), Exit::Usage, "cannot read", false, None),
        ("run without --config", |_| args(&["run"]), Exit::Usage, "--config", false, None),
        ("run --config without a value", |_| args(&["run", "--config"]), Exit::Usage, "--config", false, None),
        ("build-engine on a missing config", |_| args(&["build-engine", "--config", "nonexistent.toml"]), Exit::Usage, "nonexistent.toml", false, None),
        ("build-engine on a CPU config", |ctx| { write(&ctx.dir.join("config.toml"), config_text(ctx.port)); args(&["build-engine", "--config", "config.toml"]) }, Exit::Ok, "nothing to build", false, None),
        ("eval without --data", |_| { let mut a = args(&["eval", "--model"]); a.push(os(tiny())); a }, Exit::Usage, "--data", false, None),
        ("dataset-meta --layout given twice", |ctx| { std::fs::create_dir_all(ctx.dir.join("d")).expect("mkdir"); args(&["dataset-meta", "d", "--layout", "mvtec", "--layout", "sdd"]) }, Exit::Usage, "layout", false, None),
    ];
    for (name, make, exit, frag, ort, pending) in table {
        let mut c = case(f, *name).setup(*make).exit(*exit).timeout(20);
        if !frag.is_empty() {
            c = c.msg(*frag);
        }
        if *ort {
            c = c.ort();
        }
        if let Some(p) = pending {
            c = c.pending(p);
        }
        v.push(c);
    }
}

/// Signals around start-up (a real broker; the daemon must end with exit 0 after SIGTERM).
fn signal_cases(v: &mut Vec<Case>) {
    let f = "signal";
    let with_id = |name: &'static str| {
        run_cfg(move |ctx, t| {
            replace(
                t,
                &format!("port = {}", ctx.port),
                &format!("port = {}\nclient_id = \"hostile-{name}\"", ctx.port),
            )
        })
    };
    v.push(
        case(f, "SIGHUP right after start does not kill the daemon")
            .setup(with_id("hup0"))
            .broker()
            .signal(30, libc::SIGHUP)
            .alive_at(2500)
            .signal(3000, libc::SIGTERM)
            .exit(Exit::Ok)
            .pending(LIMIT_EXEC_WINDOW),
    );
    v.push(
        case(f, "SIGHUP while the model loads does not kill the daemon")
            .setup(with_id("hup1"))
            .broker()
            .signal(300, libc::SIGHUP)
            .alive_at(2500)
            .signal(3000, libc::SIGTERM)
            .exit(Exit::Ok),
    );
    v.push(
        case(f, "two SIGHUPs after start-up reload and keep running")
            .setup(with_id("hup2"))
            .broker()
            .signal(3000, libc::SIGHUP)
            .signal(3100, libc::SIGHUP)
            .alive_at(4500)
            .signal(5000, libc::SIGTERM)
            .exit(Exit::Ok),
    );
    v.push(
        case(f, "SIGTERM right after start exits cleanly")
            .setup(with_id("term0"))
            .broker()
            .signal(50, libc::SIGTERM)
            .exit(Exit::OkOrEarlyTerm),
    );
    v.push(
        case(f, "SIGTERM during start exits cleanly")
            .setup(with_id("term1"))
            .broker()
            .signal(400, libc::SIGTERM)
            .exit(Exit::Ok),
    );
    v.push(
        case(f, "SIGINT during start exits cleanly")
            .setup(with_id("int1"))
            .broker()
            .signal(400, libc::SIGINT)
            .exit(Exit::Ok),
    );
    v.push(
        case(f, "two SIGTERMs exit cleanly")
            .setup(with_id("term2"))
            .broker()
            .signal(2500, libc::SIGTERM)
            .signal(2520, libc::SIGTERM)
            // A second signal quits at once (exit 130, by design).
            .exit(Exit::Clean),
    );
    v.push(
        case(f, "SIGTERM with the broker unreachable exits cleanly")
            .setup(run_cfg(|ctx, t| {
                let dead = common::broker::free_port();
                replace(
                    t,
                    &format!("port = {}", ctx.port),
                    &format!("port = {dead}"),
                )
            }))
            .broker()
            .signal(3000, libc::SIGTERM)
            .exit(Exit::Ok),
    );
}
