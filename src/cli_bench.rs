//! `anomalyclip-edge bench`: how fast a model package runs on this machine, in the numbers a
//! plant sizes hardware with.
//!
//! Input: a model package, batch sizes, an iteration count, a backend and a precision. It times,
//! per batch size, on synthetic camera frames (`--frame`, default 1280×720 RGB; the content does
//! not change the work): the encoder alone (`engine`, host outputs), the preprocessing (resize +
//! normalise, per frame), the CPU anomaly head (per frame, on the encoder's real outputs) and the
//! whole path the daemon runs per batch (`end_to_end`: preprocessing + encoder + head, through the
//! same scorer as `score`, `eval` and the daemon), as medians over `--iterations` after
//! `--warmup` untimed runs; frames/s is `1000 / end_to_end ms per frame` on one worker thread.
//! Also the model load time and the process's peak resident memory. With `--few-shot K` a
//! reference bank of K further synthetic frames is built first (whole frame, the package's bank
//! layers) and applied to every end-to-end frame, and the bank matching alone is timed per image
//! (`few_shot`, on the encoder's real outputs): the cost of a region with `reference` set.
//! Output: a table on stdout, or with `--json` one JSON object (fields documented on
//! [`Report`]). Failure modes: a bad option, package, precision or engine (exit 2, nothing
//! measured); a run that fails midway (exit 1, the error on stderr).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anomalyclip_edge::engine::{self, Backend, EngineOptions, Precision};
use anomalyclip_edge::head::{AnomalyHead, CpuHead, HeadConfig, HeadInput};
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::reference::{DEFAULT_MAX_BANK_MB, Reference, WHOLE_FRAME};
use anomalyclip_edge::scorer::{HeadChoice, Scorer};
use serde::Serialize;

/// Largest batch `bench` accepts (the daemon's `[engine] max_batch` limit).
const MAX_BATCH: usize = 64;
/// Largest `--few-shot` K (the bank's frames are encoded first, K of them).
const MAX_FEW_SHOT: usize = 64;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model package directory (written by engines/export.py).
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes to time, comma-separated (each 1 to 64).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    batch: Vec<usize>,
    /// Timed runs per batch size (1 to 10000); the medians are reported.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Untimed runs per batch size before timing (0 to 100).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Model precision: fp32, int8 (CPU) or fp16 (GPU); the package must have it.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Inference backend.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Where the anomaly head runs in the end-to-end timing (`auto`: the GPU when usable).
    #[arg(long, value_enum, default_value_t = HeadChoice::Cpu)]
    head: HeadChoice,
    /// CPU threads for inference (0 = all cores; at most 4 × the CPUs available, and 256).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Camera frame size the preprocessing starts from, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720", value_parser = parse_frame)]
    frame: (usize, usize),
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the install paths).
    #[arg(long)]
    ort_library: Option<PathBuf>,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also time a few-shot reference bank of K synthetic frames (0 = none, at most 64):
    /// applied in the end-to-end timing, and its matching timed alone.
    #[arg(long, default_value_t = 0)]
    few_shot: usize,
}

fn parse_frame(s: &str) -> Result<(usize, usize), String> {
    let err = || format!("{s:?}: expected WIDTHxHEIGHT, each 1 to 8192 (e.g. 1280x720)");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(err)?;
    let (w, h): (usize, usize) = (w.parse().map_err(|_| err())?, h.parse().map_err(|_| err())?);
    if !(1..=8192).contains(&w) || !(1..=8192).contains(&h) {
        return Err(err());
    }
    Ok((w, h))
}

/// What `bench --json` prints: one object.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Package directory and its manifest's name.
    pub model: String,
    pub name: String,
    /// Random-weight test package: the speed is representative of its size only.
    pub tiny: bool,
    /// Model input edge in pixels, and patches per side.
    pub input_size: usize,
    pub grid: usize,
    /// Backend that ran (never `auto`), why, and the ONNX Runtime version.
    pub backend: String,
    pub backend_detail: String,
    pub ort_version: String,
    /// Precision that ran (`fp32`, `int8`, `fp16`).
    pub precision: String,
    /// Where the end-to-end head ran (`cpu` or `gpu`).
    pub head: String,
    /// `--threads` (0 = ONNX Runtime's default, all cores) and the CPUs this process may use.
    pub threads: usize,
    pub cpus: usize,
    /// Synthetic camera frame size.
    pub frame_width: usize,
    pub frame_height: usize,
    pub iterations: usize,
    pub warmup: usize,
    /// Package load + session creation, milliseconds.
    pub load_ms: f64,
    /// One entry per batch size, in the order asked.
    pub results: Vec<BatchResult>,
    /// Peak resident memory of the process (getrusage `ru_maxrss`), MB (10⁶ bytes).
    pub peak_rss_mb: f64,
    /// `--few-shot` K (0: no bank), the bank's feature layers and its size in bytes.
    pub few_shot_k: usize,
    pub bank_layers: usize,
    pub bank_bytes: u64,
}

/// Timings for one batch size: medians over the timed iterations, milliseconds.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    pub batch: usize,
    /// Encoder alone, one call of `batch` images (outputs copied to host memory).
    pub engine_ms_per_batch: f64,
    /// The fastest such call.
    pub engine_ms_per_batch_min: f64,
    /// `engine_ms_per_batch / batch`.
    pub engine_ms_per_image: f64,
    /// Resize + normalise of one camera frame to the model input.
    pub preprocess_ms_per_image: f64,
    /// CPU anomaly head (score, map, Gaussian, stats) for one image.
    pub head_ms_per_image: f64,
    /// Preprocessing + encoder + head for the batch, divided by `batch`.
    pub end_to_end_ms_per_image: f64,
    /// `1000 / end_to_end_ms_per_image`: frames per second on one worker.
    pub frames_per_s: f64,
    /// Bank matching alone for one image (`--few-shot`; `null` without a bank).
    pub few_shot_ms_per_image: Option<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Peak resident set size of this process in MB, from `getrusage` (Linux: `ru_maxrss` in KiB).
pub fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return f64::NAN;
    }
    ru.ru_maxrss as f64 * 1024.0 / 1e6
}

/// A deterministic synthetic RGB frame (a gradient with a moving stripe), different per `seed`.
fn synthetic_frame(width: usize, height: usize, seed: usize) -> Vec<u8> {
    let mut rgb = vec![0u8; width * height * 3];
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        let (x, y) = (i % width, i / width);
        let stripe = (x + y + seed * 37) % 97 < 9;
        px[0] = (x * 255 / width.max(1)) as u8;
        px[1] = (y * 255 / height.max(1)) as u8;
        px[2] = if stripe { 240 } else { ((x ^ y) & 0x3f) as u8 };
    }
    rgb
}

fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.batch.is_empty() {
        anyhow::bail!("--batch: expected at least one batch size");
    }
    if let Some(b) = args.batch.iter().find(|b| !(1..=MAX_BATCH).contains(*b)) {
        anyhow::bail!("--batch {b}: expected batch sizes from 1 to {MAX_BATCH}");
    }
    if !(1..=10_000).contains(&args.iterations) {
        anyhow::bail!("--iterations {}: expected 1 to 10000", args.iterations);
    }
    if args.warmup > 100 {
        anyhow::bail!("--warmup {}: expected 0 to 100", args.warmup);
    }
    engine::check_threads(args.threads).map_err(|m| anyhow::anyhow!("--threads {m}"))?;
    if args.few_shot > MAX_FEW_SHOT {
        anyhow::bail!("--few-shot {}: expected 0 to {MAX_FEW_SHOT}", args.few_shot);
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    check_args(&args)?;
    let opts = EngineOptions {
        backend: args.backend,
        threads: args.threads,
        ort_library: args.ort_library.clone(),
        precision: args.precision,
        max_batch: args.batch.iter().copied().max().unwrap_or(1),
        ..EngineOptions::default()
    };
    let t_load = Instant::now();
    // Package and engine errors name their file (or the library paths tried) themselves.
    let scorer = Scorer::open(&args.model, HashCheck::UpTo(64 << 20), &opts)?;
    let mut scorer = scorer.with_head(args.head)?;
    let load_ms = ms(t_load);
    match measure(&args, &mut scorer, load_ms) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_table(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: bench stopped: {}", crate::error_line(&e));
            Ok(ExitCode::from(1))
        }
    }
}

fn measure(args: &BenchArgs, scorer: &mut Scorer, load_ms: f64) -> anyhow::Result<Report> {
    let pkg = scorer.package().clone();
    let (s, m) = (pkg.input_size(), &pkg.manifest.model);
    let mut cpu_head = CpuHead::new(
        HeadConfig {
            size: s,
            grid: m.grid,
            dim: m.embed_dim,
            tau: m.tau,
            sigma: 4.0,
        },
        &pkg.text,
    )?;
    let (fw, fh) = args.frame;
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let frames: Vec<Vec<u8>> = (0..max_batch).map(|i| synthetic_frame(fw, fh, i)).collect();
    let per_image = 3 * s * s;
    let (mut bank_layers, mut bank_bytes) = (0, 0);
    if args.few_shot > 0 {
        // Frames of other seeds than the timed ones: a bank never holds the frame it scores.
        let mut input = vec![0f32; args.few_shot * per_image];
        for (i, chunk) in input.chunks_exact_mut(per_image).enumerate() {
            let frame = synthetic_frame(fw, fh, 1000 + i);
            scorer.prepare_frame(&frame, fw, fh, fw * 3, chunk)?;
        }
        let bank = scorer.build_bank(&input, args.few_shot, WHOLE_FRAME, DEFAULT_MAX_BANK_MB)?;
        bank_layers = bank.fingerprint().layers.len();
        bank_bytes = bank.feature_bytes();
        scorer.set_reference(Some(Reference::new(bank)));
    }
    let bank_idx = pkg.bank_output_indices();
    let mut results = Vec::with_capacity(args.batch.len());
    for &b in &args.batch {
        let mut input = vec![0f32; b * per_image];
        let prepare = |scorer: &mut Scorer, input: &mut [f32]| -> anyhow::Result<f64> {
            let t = Instant::now();
            for (i, chunk) in input.chunks_exact_mut(per_image).enumerate() {
                scorer.prepare_frame(&frames[i], fw, fh, fw * 3, chunk)?;
            }
            Ok(ms(t))
        };
        prepare(scorer, &mut input)?;
        for _ in 0..args.warmup {
            scorer.engine_mut().infer(&input, b)?;
            scorer.score_batch(&input, b)?;
        }
        let (mut engine_t, mut pre_t, mut head_t, mut e2e_t) = (vec![], vec![], vec![], vec![]);
        let mut few_t = vec![];
        for _ in 0..args.iterations {
            // The encoder alone.
            let t = Instant::now();
            let features = scorer.engine_mut().infer(&input, b)?;
            engine_t.push(ms(t));
            // The CPU head alone, on those features.
            let t = Instant::now();
            for i in 0..b {
                let locals = features.locals(i);
                cpu_head.run_frame(
                    HeadInput::Host {
                        global: features.global(i),
                        locals: &locals,
                    },
                    0.5,
                )?;
            }
            head_t.push(ms(t) / b as f64);
            // The bank matching alone, on the same features: matching, upsampling and the
            // addition to a map (a zero map here; the head's own map in the daemon).
            if let Some(mut reference) = scorer.take_reference() {
                let mut map = vec![0f32; s * s];
                let t = Instant::now();
                for i in 0..b {
                    let all = features.locals(i);
                    let locals: Vec<&[f32]> = bank_idx
                        .iter()
                        .filter_map(|&j| all.get(j).copied())
                        .collect();
                    let mut score = 0.5;
                    reference.apply(&locals, &mut map, &mut score)?;
                }
                few_t.push(ms(t) / b as f64);
                scorer.set_reference(Some(reference));
            }
            // The daemon's path: preprocessing, encoder, head.
            let t = Instant::now();
            let pre = prepare(scorer, &mut input)?;
            scorer.score_batch(&input, b)?;
            e2e_t.push(ms(t));
            pre_t.push(pre / b as f64);
        }
        let engine_min = engine_t.iter().copied().fold(f64::INFINITY, f64::min);
        let engine = median(&mut engine_t);
        let e2e = median(&mut e2e_t) / b as f64;
        results.push(BatchResult {
            batch: b,
            engine_ms_per_batch: engine,
            engine_ms_per_batch_min: engine_min,
            engine_ms_per_image: engine / b as f64,
            preprocess_ms_per_image: median(&mut pre_t),
            head_ms_per_image: median(&mut head_t),
            end_to_end_ms_per_image: e2e,
            frames_per_s: 1e3 / e2e,
            few_shot_ms_per_image: (!few_t.is_empty()).then(|| median(&mut few_t)),
        });
    }
    let info = scorer.engine().info().clone();
    Ok(Report {
        model: args.model.display().to_string(),
        name: pkg.manifest.name.clone(),
        tiny: pkg.manifest.tiny,
        input_size: s,
        grid: m.grid,
        backend: info.backend.to_string(),
        backend_detail: info.detail,
        ort_version: info.ort_version,
        precision: info.precision.to_string(),
        head: scorer.head_device().to_string(),
        threads: args.threads,
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        frame_width: fw,
        frame_height: fh,
        iterations: args.iterations,
        warmup: args.warmup,
        load_ms,
        results,
        peak_rss_mb: peak_rss_mb(),
        few_shot_k: args.few_shot,
        bank_layers,
        bank_bytes,
    })
}

fn print_table(r: &Report) {
    println!(
        "{} ({}{}, {} px, grid {}): backend {} ({}), precision {}, head {}, ONNX Runtime {}",
        r.model,
        r.name,
        if r.tiny { ", random weights" } else { "" },
        r.input_size,
        r.grid,
        r.backend,
        r.backend_detail,
        r.precision,
        r.head,
        r.ort_version
    );
    println!(
        "threads {} (0 = all) of {} CPUs, frames {}x{}, {} iterations (+{} warm-up), load {:.0} ms",
        r.threads, r.cpus, r.frame_width, r.frame_height, r.iterations, r.warmup, r.load_ms
    );
    println!(
        "{:>5} {:>14} {:>14} {:>12} {:>10} {:>14} {:>10}",
        "batch", "engine ms/b", "engine ms/img", "preproc ms", "head ms", "e2e ms/img", "frames/s"
    );
    for b in &r.results {
        println!(
            "{:>5} {:>14.3} {:>14.3} {:>12.3} {:>10.3} {:>14.3} {:>10.1}",
            b.batch,
            b.engine_ms_per_batch,
            b.engine_ms_per_image,
            b.preprocess_ms_per_image,
            b.head_ms_per_image,
            b.end_to_end_ms_per_image,
            b.frames_per_s
        );
    }
    if r.few_shot_k > 0 {
        println!(
            "few-shot bank: K = {}, {} layer(s), {} bytes; e2e includes it",
            r.few_shot_k, r.bank_layers, r.bank_bytes
        );
        for b in &r.results {
            if let Some(f) = b.few_shot_ms_per_image {
                println!(
                    "batch {:>3}: bank matching {f:.3} ms/img ({:.1} % of e2e)",
                    b.batch,
                    100.0 * f / b.end_to_end_ms_per_image
                );
            }
        }
    }
    println!("peak memory {:.0} MB (resident)", r.peak_rss_mb);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_sizes_parse_and_nonsense_is_refused() {
        assert_eq!(parse_frame("1280x720"), Ok((1280, 720)));
        assert_eq!(parse_frame("64X48"), Ok((64, 48)));
        for bad in [
            "", "1280", "0x720", "1280x", "x720", "99999x1", "-1x5", "1.5x2",
        ] {
            assert!(parse_frame(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn peak_memory_is_positive() {
        let mb = peak_rss_mb();
        assert!(mb.is_finite() && mb > 1.0, "{mb}");
    }
}
