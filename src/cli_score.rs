//! `anomalyclip-edge score`: what the official "test one image" script does, plus what its users
//! asked for: a score and a decision per image, many images per call, optional map outputs.
//!
//! Input: a model package and image files (PNG/JPEG/BMP, any size, grayscale or colour).
//! Output: one JSON line per image on stdout; on request a heatmap overlay PNG, a grayscale map
//! PNG and the raw float map. Failure modes: a bad package or missing ONNX Runtime library stops
//! everything (exit 2), as does a `--threads` over [`engine::max_threads`]; a bad image, or an
//! output file (`--overlay`, `--map-png`, `--raw-map`) that cannot be written, is reported on
//! stderr and in that image's JSON line with `error`, the others are still scored (exit 1).
//! A score or map that is not finite (a broken model) is an error, never `"score": null`.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anomalyclip_edge::engine::{self, Backend, EngineOptions, Precision};
use anomalyclip_edge::head;
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::scorer::{HeadChoice, ScoreError, Scored, Scorer};
use anyhow::Context;
use serde::Serialize;

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Model package directory (written by engines/export.py).
    #[arg(long)]
    model: PathBuf,
    /// Image files to score.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Image score at or above which an image is reported as anomalous.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Map value at or above which a pixel counts towards `area` (and the binary mask).
    #[arg(long, default_value_t = 0.5)]
    pixel_threshold: f32,
    /// Write a heatmap overlay PNG per image (original resolution) into this directory.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Write the anomaly map as an 8-bit grayscale PNG (original resolution) into this directory.
    #[arg(long)]
    map_png: Option<PathBuf>,
    /// Write the raw float32 map (little-endian, S×S at the model's input size) into this directory.
    #[arg(long)]
    raw_map: Option<PathBuf>,
    /// Inference backend.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Where the anomaly head runs (`auto`: the GPU when one is usable).
    #[arg(long, value_enum, default_value_t = HeadChoice::Cpu)]
    head: HeadChoice,
    /// Model precision: fp32, int8 (CPU) or fp16 (GPU); the package must have it.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// CPU threads for inference (0 = all cores; at most 4 × the CPUs available, and 256).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the install paths).
    #[arg(long)]
    ort_library: Option<PathBuf>,
    /// Skip hashing package files larger than 64 MiB (presence is still checked).
    #[arg(long)]
    fast_load: bool,
    /// Few-shot reference bank (written by `reference`) to add to every image's map and score;
    /// refused (exit 2) when built for another package.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Refuse a reference bank larger than this many MiB.
    #[arg(long, default_value_t = anomalyclip_edge::reference::DEFAULT_MAX_BANK_MB)]
    max_bank_mb: u64,
}

#[derive(Serialize)]
struct Line<'a> {
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anomaly: Option<bool>,
    /// The head's score before the few-shot combination (only with `--reference`).
    #[serde(skip_serializing_if = "Option::is_none")]
    zero_shot_score: Option<f32>,
    threshold: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    map_max: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    area: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    for (name, v) in [
        ("--threshold", args.threshold),
        ("--pixel-threshold", args.pixel_threshold),
    ] {
        if !(0.0..=1.0).contains(&v) {
            anyhow::bail!("{name} {v}: expected a value in [0, 1]");
        }
    }
    engine::check_threads(args.threads).map_err(|m| anyhow::anyhow!("--threads {m}"))?;
    for dir in [&args.overlay, &args.map_png, &args.raw_map]
        .into_iter()
        .flatten()
    {
        crate::ensure_dir(dir)?;
    }
    let opts = EngineOptions {
        backend: args.backend,
        threads: args.threads,
        ort_library: args.ort_library.clone(),
        precision: args.precision,
        ..EngineOptions::default()
    };
    let hashes = if args.fast_load {
        HashCheck::UpTo(64 << 20)
    } else {
        HashCheck::All
    };
    // Package and engine errors name their file (or the library paths tried) themselves.
    let scorer = Scorer::open(&args.model, hashes, &opts).map_err(|e| match e {
        ScoreError::Package(_) | ScoreError::Engine(_) => anyhow::Error::new(e),
        other => {
            anyhow::Error::new(other).context(format!("model package {}", args.model.display()))
        }
    })?;
    let mut scorer = scorer
        .with_head(args.head)?
        .with_pixel_threshold(args.pixel_threshold);
    if let Some(path) = &args.reference {
        use anomalyclip_edge::reference::{Bank, Fingerprint, Reference, WHOLE_FRAME};
        let expected = Fingerprint::for_package(scorer.package(), WHOLE_FRAME, 0);
        let bank = Bank::load_checked(path, args.max_bank_mb, &expected)?;
        scorer.set_reference(Some(Reference::new(bank)));
    }
    if scorer.package().manifest.tiny {
        tracing::warn!(
            "model package {} holds random weights (a test model): scores are meaningless for real detection",
            args.model.display()
        );
    }

    let bar = (args.images.len() > 1 && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(args.images.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut stems = HashSet::new();
    let mut failed = 0usize;
    let stdout = std::io::stdout();
    for path in &args.images {
        let t0 = Instant::now();
        let display = path.display().to_string();
        // The scorer fails a frame whose features, score or map are not finite (its error
        // names which); the check here is the last guard that no NaN reaches a line.
        let result = scorer.score_file(path).map_err(|e| e.to_string()).and_then(|ok| {
            let s = &ok.1;
            if s.score.is_finite() && s.map_max.is_finite() && s.area.is_finite() {
                Ok(ok)
            } else {
                Err(format!(
                    "{display}: the model produced a non-finite result (score {}, map max {}): broken model package or engine",
                    s.score, s.map_max
                ))
            }
        });
        let line = match result {
            Ok((img, scored)) => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let stem = unique_stem(path, &mut stems);
                // The image was scored, but the run failed for it: the line says so too.
                let error = write_outputs(&args, &stem, &img, &scored).err().map(|e| {
                    failed += 1;
                    let msg = crate::one_line(&format!("{display}: {e:#}"));
                    eprintln!("error: {msg}");
                    msg
                });
                Line {
                    path: &display,
                    score: Some(scored.score),
                    anomaly: Some(scored.score >= args.threshold),
                    zero_shot_score: scored.few_shot.map(|f| f.zero_shot_score),
                    threshold: args.threshold,
                    map_max: Some(scored.map_max),
                    area: Some(scored.area),
                    width: Some(img.width() as u32),
                    height: Some(img.height() as u32),
                    ms: Some((ms * 100.0).round() / 100.0),
                    error,
                }
            }
            Err(e) => {
                failed += 1;
                let msg = crate::one_line(&e);
                eprintln!("error: {msg}");
                Line {
                    path: &display,
                    score: None,
                    anomaly: None,
                    zero_shot_score: None,
                    threshold: args.threshold,
                    map_max: None,
                    area: None,
                    width: None,
                    height: None,
                    ms: None,
                    error: Some(msg),
                }
            }
        };
        let json = serde_json::to_string(&line).context("serialising a result line")?;
        let mut out = stdout.lock();
        writeln!(out, "{json}").context("writing to stdout")?;
        out.flush().ok();
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn unique_stem(path: &Path, seen: &mut HashSet<String>) -> String {
    let base = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let mut stem = base.clone();
    let mut n = 1;
    while !seen.insert(stem.clone()) {
        n += 1;
        stem = format!("{base}-{n}");
    }
    stem
}

fn write_outputs(
    args: &ScoreArgs,
    stem: &str,
    img: &anomalyclip_edge::image_io::DecodedImage,
    scored: &Scored,
) -> anyhow::Result<()> {
    let s = scored.size;
    if let Some(dir) = &args.raw_map {
        let p = dir.join(format!("{stem}.map.f32"));
        let bytes: Vec<u8> = scored.map.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    if args.overlay.is_none() && args.map_png.is_none() {
        return Ok(());
    }
    let (w, h) = (img.width(), img.height());
    let full = head::resize_map(&scored.map, s, s, h, w);
    let mut gray = vec![0u8; w * h];
    head::quantize_u8(&full, &mut gray);
    if let Some(dir) = &args.map_png {
        let p = dir.join(format!("{stem}.map.png"));
        image::GrayImage::from_raw(w as u32, h as u32, gray.clone())
            .context("map buffer size")?
            .save(&p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &args.overlay {
        let p = dir.join(format!("{stem}.overlay.png"));
        let rgb = img.to_rgb();
        let mut out = Vec::with_capacity(w * h * 3);
        for (px, g) in rgb.chunks_exact(3).zip(&gray) {
            let c = jet(*g);
            for k in 0..3 {
                out.push(((u16::from(px[k]) + u16::from(c[k])) / 2) as u8);
            }
        }
        image::RgbImage::from_raw(w as u32, h as u32, out)
            .context("overlay buffer size")?
            .save(&p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The "jet" colour map (blue → cyan → yellow → red), as the official overlay uses.
fn jet(v: u8) -> [u8; 3] {
    let x = f32::from(v) / 255.0;
    let f = |c: f32| ((1.5 - (4.0 * x - c).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [f(3.0), f(2.0), f(1.0)]
}
