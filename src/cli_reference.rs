//! `anomalyclip-edge reference`: builds a few-shot reference bank from a folder of good images
//! (see `src/reference.rs` for what the bank holds and how it is used).
//!
//! Input: a model package, a folder of good images (PNG/JPEG/BMP, sorted by name; with `--k`,
//! the first K), the output path. Output: the bank file (written atomically) and one JSON line
//! on stdout with its path, K, layers, size in bytes and fingerprint. Failure modes (exit 2,
//! nothing written): a bad package, a folder with no or too few images, an image that cannot be
//! decoded (named), a bank over `--max-bank-mb`. The bank is for the whole frame; a region's bank
//! is built by the daemon from that region's crops (`Scorer::build_bank`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anomalyclip_edge::engine::{self, Backend, EngineOptions};
use anomalyclip_edge::image_io;
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::reference::{self, WHOLE_FRAME};
use anomalyclip_edge::scorer::Scorer;
use anyhow::Context;

#[derive(clap::Args)]
pub struct ReferenceArgs {
    /// Model package directory (written by engines/export.py).
    #[arg(long)]
    model: PathBuf,
    /// Folder of good (defect-free) images.
    #[arg(long)]
    images: PathBuf,
    /// Bank file to write.
    #[arg(long)]
    out: PathBuf,
    /// Use the first K images (by file name) instead of all.
    #[arg(long)]
    k: Option<usize>,
    /// Refuse a bank larger than this many MiB.
    #[arg(long, default_value_t = reference::DEFAULT_MAX_BANK_MB)]
    max_bank_mb: u64,
    /// Inference backend.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// CPU threads for inference (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the install paths).
    #[arg(long)]
    ort_library: Option<PathBuf>,
}

/// Image files directly in `dir`, sorted by name.
pub fn list_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("--images {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("--images {}", dir.display()))?
            .path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if path.is_file() && matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "bmp")) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub fn run(args: ReferenceArgs) -> anyhow::Result<ExitCode> {
    engine::check_threads(args.threads).map_err(|m| anyhow::anyhow!("--threads {m}"))?;
    let mut files = list_images(&args.images)?;
    if let Some(k) = args.k {
        if k == 0 {
            anyhow::bail!("--k 0: expected at least 1 reference image");
        }
        if files.len() < k {
            anyhow::bail!(
                "--images {}: {} images (png/jpg/jpeg/bmp), --k asks for {k}",
                args.images.display(),
                files.len()
            );
        }
        files.truncate(k);
    }
    if files.is_empty() {
        anyhow::bail!(
            "--images {}: no png/jpg/jpeg/bmp images in the folder",
            args.images.display()
        );
    }
    let opts = EngineOptions {
        backend: args.backend,
        threads: args.threads,
        ort_library: args.ort_library.clone(),
        ..EngineOptions::default()
    };
    let mut scorer = Scorer::open(&args.model, HashCheck::All, &opts)?;
    let s = scorer.size();
    let n = 3 * s * s;
    let mut input = vec![0.0f32; files.len() * n];
    for (path, out) in files.iter().zip(input.chunks_exact_mut(n)) {
        let img = image_io::load_image(path)?;
        scorer
            .prepare_image(&img, out)
            .with_context(|| path.display().to_string())?;
    }
    let bank = scorer.build_bank(&input, files.len(), WHOLE_FRAME, args.max_bank_mb)?;
    bank.save(&args.out)
        .with_context(|| format!("--out {}", args.out.display()))?;
    let line = serde_json::json!({
        "bank": args.out.display().to_string(),
        "k": bank.fingerprint().k,
        "layers": bank.fingerprint().layers,
        "feature_bytes": bank.feature_bytes(),
        "images": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "fingerprint": bank.fingerprint(),
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
