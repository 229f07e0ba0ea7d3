//! The `anomalyclip-edge` command line: one binary, one subcommand per job.
//!
//! Exit codes (all subcommands): 0 success; 1 the job ran but some items failed (e.g. an image
//! that could not be scored); 2 bad usage, configuration or model (nothing was done).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli_eval;
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
    /// Write the meta.json describing a dataset folder tree.
    DatasetMeta(cli_eval::DatasetMetaArgs),
    /// Run the daemon: cameras → inference → MQTT, until SIGTERM/SIGINT (SIGHUP reloads).
    Run {
        /// Configuration file (see config/example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file: every problem, with its line, then exit 0 (valid) or 2.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
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
        Command::Run { config } => run_daemon(&config),
        Command::CheckConfig { file } => Ok(check_config(&file)),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let problems = anomalyclip_edge::config::check(file);
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

fn run_daemon(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    match anomalyclip_edge::daemon::run(config) {
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

/// Collapses an error chain into one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Output directory helper: creates it, naming it in the error.
pub(crate) fn ensure_dir(dir: &PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create output directory {}: {e}", dir.display()))
}
