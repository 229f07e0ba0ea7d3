//! The whole daemon's throughput and latency on this machine: the real `anomalyclip-edge`
//! binary, N simulated cameras (GStreamer `videotestsrc`, live, 30 fps each, no `max_fps` cap),
//! a real mosquitto and a subscriber receiving what a PLC would. For the identity model
//! (`tests/fixtures/identity`: an ONNX graph that costs next to nothing, so the numbers are the
//! daemon's own cost: capture, scaling, preprocessing, batching, head, masks, MQTT) and the tiny
//! random-weight model (`tests/fixtures/tiny`), N = 1, 2, 4.
//!
//! Not a criterion benchmark: a plain `main` that prints one table (harness = false).
//!
//! ```text
//! source scripts/env.sh && cargo bench --bench daemon
//! BENCH_SECONDS=20 BENCH_CAMERAS=1,2,4,8 BENCH_FRAME=1280x720 BENCH_THREADS=1 \
//!     BENCH_MAX_WAIT_MS=0 cargo bench --bench daemon -- tiny
//! ```
//! Columns: `in fps` frames the cameras delivered (from the daemon's stats); `out fps` results
//! the subscriber received (in total; per camera on average, and for the camera that got the
//! fewest, in parentheses); `drop %` frames not scored (the latest-frame slot was overwritten
//! while the worker was busy); `lat p50/p99` the results' `latency_ms` (capture → handed to the
//! publisher); `e2e p50/p99` capture time (`ts_ms`) → received by the subscriber; `cpu %` the
//! daemon's CPU time over the window (100 % = one core; it includes the `videotestsrc` sources,
//! which run in the daemon's own GStreamer pipelines, but not mosquitto or the subscriber).
//!
//! Under `cargo test --benches` (no `--bench` argument) it only runs a smoke check: one camera,
//! the identity model, one second, results must arrive.

// The integration tests' helpers (`daemon` refers to `super::broker`).
#[path = "../tests/it/common/broker.rs"]
mod broker;
#[path = "../tests/it/common/daemon.rs"]
mod daemon;

use std::path::Path;
use std::time::{Duration, Instant};

use broker::{Broker, Msg, Watcher};
use daemon::Daemon;

/// `[engine]` settings of the runs.
#[derive(Clone, Copy)]
struct Engine {
    threads: u32,
    max_wait_ms: u32,
}

struct Run {
    model: &'static str,
    cameras: usize,
    fps_in: f64,
    fps_out: f64,
    /// Results per second of the camera that got the fewest (fairness between cameras).
    fps_min_cam: f64,
    drop_pct: f64,
    lat: (f64, f64),
    e2e: (f64, f64),
    cpu_pct: f64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (in parentheses, may hold spaces); utime and stime are
    // fields 14 and 15 of the line, 12 and 13 after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

fn config(model: &Path, port: u16, cameras: usize, frame: (u32, u32), engine: Engine) -> String {
    let mut s = format!(
        "node_id = \"bench\"\nstate_dir = \"state\"\nstats_interval_s = 1\n\
         [model]\npackage = \"{}\"\n\
         [engine]\nbackend = \"cpu\"\nthreads = {}\nmax_batch = 4\nmax_wait_ms = {}\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n",
        model.display(),
        engine.threads,
        engine.max_wait_ms,
    );
    for i in 0..cameras {
        s += &format!(
            "[[camera]]\nname = \"cam{i}\"\n\
             pipeline = \"videotestsrc is-live=true pattern=ball ! \
             video/x-raw,width={},height={},framerate=30/1 ! appsink name=sink\"\n",
            frame.0, frame.1
        );
    }
    s
}

/// Summed (frames_in, scored, ts_ms) of the last stats message in `msgs`.
fn counters(msgs: &[Msg]) -> Option<(u64, u64, u64)> {
    let s = msgs
        .iter()
        .rev()
        .find(|m| m.topic == "anomalyclip/bench/stats")?
        .json();
    let cams = s["cameras"].as_object()?;
    let sum = |k: &str| cams.values().filter_map(|c| c[k].as_u64()).sum();
    Some((sum("frames_in"), sum("scored"), s["ts_ms"].as_u64()?))
}

async fn run_one(
    broker: &Broker,
    model: &'static str,
    cameras: usize,
    frame: (u32, u32),
    engine: Engine,
    warmup: Duration,
    window: Duration,
) -> Run {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(model);
    let mut plc = Watcher::start(broker.port, "anomalyclip/bench/#").await;
    let mut d = Daemon::start(&config(&dir, broker.port, cameras, frame, engine));
    d.wait_ready().await;
    // Every camera publishing, then the warm-up.
    let mut seen = vec![false; cameras];
    plc.until(|m| {
        if let Some(i) = m
            .topic
            .strip_prefix("anomalyclip/bench/cam")
            .and_then(|t| t.strip_suffix("/result"))
            .and_then(|i| i.parse::<usize>().ok())
        {
            seen[i] = true;
        }
        seen.iter().all(|s| *s)
    })
    .await;
    let before = plc.collect_for(warmup).await;

    let cpu0 = cpu_seconds(d.pid());
    let t0 = Instant::now();
    let msgs = plc.collect_for(window).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(d.pid()) - cpu0;
    d.signal(libc::SIGTERM);
    let status = d.wait_exit().await;
    assert!(status.success(), "daemon: {status}\n{}", d.log());

    let results: Vec<serde_json::Value> = msgs
        .iter()
        .filter(|m| m.topic.ends_with("/result"))
        .map(Msg::json)
        .collect();
    let e2e: Vec<f64> = msgs
        .iter()
        .filter(|m| m.topic.ends_with("/result"))
        .zip(&results)
        .filter_map(|(m, v)| Some(m.received_ms.checked_sub(v["ts_ms"].as_u64()?)? as f64))
        .collect();
    let mut per_cam = vec![0usize; cameras];
    for v in &results {
        if let Some(i) = v["camera"]
            .as_str()
            .and_then(|c| c.strip_prefix("cam"))
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < cameras)
        {
            per_cam[i] += 1;
        }
    }
    let lat: Vec<f64> = results
        .iter()
        .filter_map(|v| v["latency_ms"].as_f64())
        .collect();
    let (fps_in, drop_pct) = match (counters(&before), counters(&msgs)) {
        (Some((in0, sc0, t0)), Some((in1, sc1, t1))) if in1 > in0 && t1 > t0 => {
            let frames = (in1 - in0) as f64;
            (
                frames * 1000.0 / (t1 - t0) as f64,
                100.0 * (1.0 - (sc1 - sc0) as f64 / frames).max(0.0),
            )
        }
        _ => (f64::NAN, f64::NAN),
    };
    Run {
        model,
        cameras,
        fps_in,
        fps_out: results.len() as f64 / elapsed,
        fps_min_cam: per_cam.iter().copied().min().unwrap_or(0) as f64 / elapsed,
        drop_pct,
        lat: percentiles(lat),
        e2e: percentiles(e2e),
        cpu_pct: 100.0 * cpu / elapsed,
    }
}

/// `cargo test --benches`: the benchmark runs end to end, briefly.
fn smoke() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async {
        let broker = Broker::start(None).await;
        run_one(
            &broker,
            "identity",
            1,
            (320, 240),
            Engine {
                threads: 1,
                max_wait_ms: 10,
            },
            Duration::ZERO,
            Duration::from_secs(1),
        )
        .await
    });
    assert!(r.fps_out > 0.0, "no results in the smoke run");
    println!(
        "daemon bench smoke run: {:.1} results/s (run `cargo bench --bench daemon` to measure)",
        r.fps_out
    );
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cpu}, {cores} cores available, load average {}",
        load.join(" ")
    )
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks the models.
    let bench = std::env::args().any(|a| a == "--bench");
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if !bench {
        smoke();
        return;
    }
    let window = Duration::from_secs(env_or("BENCH_SECONDS", 10));
    let warmup = Duration::from_secs(env_or("BENCH_WARMUP_SECONDS", 3));
    let engine = Engine {
        threads: env_or("BENCH_THREADS", 1),
        max_wait_ms: env_or("BENCH_MAX_WAIT_MS", 10),
    };
    let frame = std::env::var("BENCH_FRAME")
        .ok()
        .and_then(|f| {
            let (w, h) = f.split_once('x')?;
            Some((w.parse().ok()?, h.parse().ok()?))
        })
        .unwrap_or((640, 480));
    let counts: Vec<usize> = std::env::var("BENCH_CAMERAS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    let models: Vec<&'static str> = ["identity", "tiny"]
        .into_iter()
        .filter(|m| filter.as_deref().is_none_or(|f| m.contains(f)))
        .collect();

    println!("daemon benchmark: {}", machine());
    println!(
        "cameras: videotestsrc {}x{} @ 30 fps each, scaled to the model input in GStreamer; \
         engine cpu, {} ORT thread(s), max_batch 4, max_wait {} ms; window {} s after {} s warm-up",
        frame.0,
        frame.1,
        engine.threads,
        engine.max_wait_ms,
        window.as_secs(),
        warmup.as_secs()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let runs: Vec<Run> = rt.block_on(async {
        let broker = Broker::start(None).await;
        let mut runs = Vec::new();
        for model in &models {
            for &n in &counts {
                let r = run_one(&broker, model, n, frame, engine, warmup, window).await;
                eprintln!(
                    "  {model} ×{n}: {:.1} fps out, p50 {:.1} ms",
                    r.fps_out, r.lat.0
                );
                runs.push(r);
            }
        }
        runs
    });
    println!();
    println!(
        "| model    | cams | in fps | out fps | out fps/cam (min) | drop % | lat p50 / p99 ms | e2e p50 / p99 ms | daemon cpu % |"
    );
    println!(
        "|----------|-----:|-------:|--------:|------------------:|-------:|-----------------:|-----------------:|-------------:|"
    );
    for r in &runs {
        println!(
            "| {:<8} | {:>4} | {:>6.1} | {:>7.1} | {:>10.1} ({:>4.1}) | {:>6.1} | {:>7.1} / {:>6.1} | {:>7.1} / {:>6.1} | {:>12.0} |",
            r.model,
            r.cameras,
            r.fps_in,
            r.fps_out,
            r.fps_out / r.cameras as f64,
            r.fps_min_cam,
            r.drop_pct,
            r.lat.0,
            r.lat.1,
            r.e2e.0,
            r.e2e.1,
            r.cpu_pct
        );
    }
}
