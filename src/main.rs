//! The `anomalyclip-edge` command line: one binary, one subcommand per job.
//!
//! Exit codes (all subcommands): 0 success; 1 the job ran but some items failed (e.g. an image
//! that could not be scored); 2 bad usage, configuration or model (nothing was done).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli_bench;
mod cli_calibrate;
mod cli_eval;
mod cli_reference;
mod cli_score;

#[derive(Parser)]
#[command(
    name = "anomalyclip-edge",
    version,
    about = "Zero-shot visual anomaly detection (AnomalyCLIP) for factory lines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing's EnvFilter syntax), overrides RUST_LOG.
    #[arg(long, global = true)]
    log: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Score image files: one JSON line per image on stdout.
    Score(cli_score::ScoreArgs),
    /// Evaluate a labelled dataset: image AUROC/AP, pixel AUROC, AUPRO per class (table, JSON, CSV).
    Eval(cli_eval::EvalArgs),
    /// Thresholds for a camera region from good parts (a folder of images or live frames).
    Calibrate(cli_calibrate::CalibrateArgs),
    /// Time a model package on this machine: encoder, preprocessing, head, frames/s, memory.
    Bench(cli_bench::BenchArgs),
    /// Write the meta.json describing a dataset folder tree.
    DatasetMeta(cli_eval::DatasetMetaArgs),
    /// Build a few-shot reference bank: of a folder of good images (whole frame), or of a camera
    /// region from good frames (folder or live) into the state directory.
    Reference(cli_reference::ReferenceArgs),
    /// Run the daemon: cameras → inference → MQTT, until SIGTERM/SIGINT (SIGHUP reloads).
    Run {
        /// Configuration file (see config/example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file: every problem, with its line, then exit 0 (valid) or 2.
    ///
    /// Refuses everything `run` would refuse at start, and also checks, as the running user,
    /// that the state directory is writable (creating it if missing), that every file of the
    /// model package matches its SHA-256 (a few seconds for a full-size model), that every
    /// camera source builds in GStreamer and that every few-shot bank (`reference`) is there
    /// and was built for this model and region.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
    },
    /// Prebuild the TensorRT engine for a configuration (minutes; cached in the state
    /// directory) and print its cache key and location.
    BuildEngine {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn init_logging(filter: Option<&str>) {
    let filter = filter
        .map(tracing_subscriber::EnvFilter::new)
        .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn,anomalyclip_edge=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref());

    let res = match cli.command {
        Command::Score(args) => cli_score::run(args),
        Command::Eval(args) => cli_eval::run(args),
        Command::DatasetMeta(args) => cli_eval::run_dataset_meta(args),
        Command::Calibrate(args) => cli_calibrate::run(args),
        Command::Reference(args) => cli_reference::run(args),
        Command::Bench(args) => cli_bench::run(args),
        Command::Run { config } => run_daemon(&config),
        Command::CheckConfig { file } => Ok(check_config(&file)),
        Command::BuildEngine { config } => build_engine(&config),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::from(2)
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    // The config first; then, for a good config, the few-shot banks it names (they need the
    // resolved config and the model package).
    let problems = match anomalyclip_edge::config::check_loaded(file) {
        Ok(cfg) => anomalyclip_edge::daemon::check_references(&cfg, &file.display().to_string()),
        Err(problems) => problems,
    };
    if problems.is_empty() {
        println!("{}: ok", file.display());
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{}: {} problem(s)", file.display(), problems.len());
        ExitCode::from(2)
    }
}

/// Signals for `run`, handled from the first instruction of the command: SIGTERM/SIGINT ask
/// the daemon to stop (a second one exits at once with 130), SIGHUP asks for a reload — also
/// during start-up, when the request waits until the daemon is ready instead of killing it.
fn forward_signals(handle: anomalyclip_edge::daemon::ControlHandle) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("ace-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = match sig {
                    SIGTERM => "SIGTERM",
                    SIGINT => "SIGINT",
                    _ => "SIGHUP",
                };
                if sig == SIGHUP {
                    tracing::info!("SIGHUP: reload requested");
                    handle.reload();
                } else if handle.stop() {
                    tracing::info!("{name}: stopping");
                } else {
                    eprintln!("second signal ({name}): exiting now");
                    std::process::exit(130);
                }
            }
        })?;
    Ok(())
}

fn run_daemon(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (handle, control) = anomalyclip_edge::daemon::control();
    forward_signals(handle)?;
    match anomalyclip_edge::daemon::run(config, control) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(anomalyclip_edge::daemon::DaemonError::Config(errors)) => {
            for p in &errors.problems {
                eprintln!("{p}");
            }
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

fn build_engine(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    use anomalyclip_edge::{config as cfgmod, daemon, engine, package};
    let cfg = match cfgmod::load_config(config) {
        Ok(c) => c,
        Err(errors) => {
            for p in &errors.problems {
                eprintln!("{p}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    let pkg = package::ModelPackage::load(&cfg.model.package, package::HashCheck::All)?;
    let opts = daemon::engine_options(&cfg);
    if opts.backend == engine::Backend::Cpu {
        println!("backend cpu: nothing to build (engines are built for tensorrt or auto)");
        return Ok(ExitCode::SUCCESS);
    }
    engine::init_runtime(opts.ort_library.as_deref())?;
    if let Some((key, dir)) = engine::engine_cache_dir(&pkg, &opts) {
        println!("cache key: {key}");
        println!("cache dir: {}", dir.display());
    }
    let t0 = std::time::Instant::now();
    let eng = engine::create(&pkg, &opts)?;
    let info = eng.info();
    println!(
        "engine: {} ({}) ready in {:.1} s",
        info.backend,
        info.detail,
        t0.elapsed().as_secs_f64()
    );
    if info.backend != engine::Backend::Tensorrt {
        eprintln!(
            "no TensorRT engine was built: {} (the daemon will run on {})",
            info.detail, info.backend
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// An error and its causes as one line: `outer: cause: cause`, leaving out a cause whose text
/// the line already holds (our error types print their `source` in their own message, so
/// `{:#}` would repeat it).
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = one_line(&cause.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Collapses whitespace (newlines included) into single spaces.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Output directory helper: creates it, naming it in the error.
pub(crate) fn ensure_dir(dir: &PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create output directory {}: {e}", dir.display()))
}
