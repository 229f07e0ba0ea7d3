//! Files and sizes from outside, as a hostile tester hands them to the real binary: FIFOs and
//! `/dev/zero` where a config, a package file, an image or a `meta.json` is expected; manifests
//! whose sizes overflow or whose numbers are NaN, infinite, zero or denormal; `[files]` entries
//! that point outside the package; absurd `--threads`; output files that cannot be written; an
//! empty dataset tree. Contract: never a hang, a panic, a crash or a NaN result: exit 2 (nothing
//! done) or 1 (that item failed, its JSON line has `error`) with one line naming the file or the
//! option and what was expected.
//!
//! Every process runs under a timeout ([`run`]): a hang fails the test instead of blocking CI.
//! The cases that score images need the ONNX Runtime library (`ort_or_skip`); the others stop
//! before the engine is built and run without it.

use crate::common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anomalyclip_edge::package::sha256_file;
use common::golden::{Golden, ort_library, ort_or_skip, tiny_package};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

/// Generous for a debug build on a loaded 2-core machine; a hang is forever.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `anomalyclip-edge --log off <args…>` with a timeout; a process still running after
/// [`TIMEOUT`] is killed and the test fails ("hang"). `ORT_DYLIB_PATH` is set when the library
/// is there (the cases that fail before the engine do not need it).
fn run(args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    if let Some(lib) = ort_library() {
        cmd.env("ORT_DYLIB_PATH", lib);
    }
    cmd.args(["--log", "off"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn anomalyclip-edge");
    // Drain the pipes on threads, so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t0.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("anomalyclip-edge {args:?} still running after {TIMEOUT:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout thread"),
        stderr: err.join().expect("stderr thread"),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit `code` (not a signal, not a panic) and every needle on stderr.
fn assert_exit(case: &str, o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "{case}: exit status {:?}; stderr: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{case}: {err}");
    for n in needles {
        assert!(
            err.contains(n),
            "{case}: stderr does not mention {n:?}: {err}"
        );
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

/// A copy of the tiny package that a test may break.
fn package_copy(dir: &Path) -> PathBuf {
    let dst = dir.join("pkg");
    std::fs::create_dir_all(&dst).expect("mkdir");
    for e in std::fs::read_dir(tiny_package()).expect("tiny package") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
    dst
}

fn edit_manifest(pkg: &Path, from: &str, to: &str) {
    let p = pkg.join("manifest.toml");
    let text = std::fs::read_to_string(&p).expect("manifest");
    assert!(text.contains(from), "manifest has no {from:?}");
    std::fs::write(&p, text.replacen(from, to, 1)).expect("write manifest");
}

/// `score --model <pkg> <image>`: the image is never reached when the package is refused.
fn score_pkg(pkg: &Path, extra: &[&str]) -> Output {
    let image = Golden::load().images[0].path.clone();
    let mut args = vec!["score", "--model", s(pkg)];
    args.extend_from_slice(extra);
    args.push(s(&image));
    run(&args)
}

#[test]
fn a_fifo_or_dev_zero_as_config_file_is_refused_not_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("config.toml");
    mkfifo(&fifo);
    for (case, path, kind) in [
        ("fifo", s(&fifo), "FIFO"),
        ("/dev/zero", "/dev/zero", "character device"),
    ] {
        let o = run(&["check-config", path]);
        assert_exit(case, &o, 2, &[path, "cannot read config file", kind]);
        let o = run(&["run", "--config", path]);
        assert_exit(case, &o, 2, &[path, "cannot read config file", kind]);
    }
}

#[test]
fn secrets_and_tls_files_that_are_fifos_or_devices_are_config_problems() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg = dir.path().join("pkg");
    std::fs::create_dir_all(&pkg).expect("mkdir");
    std::fs::write(pkg.join("manifest.toml"), "format_version = 1\n").expect("manifest");
    let fifo = dir.path().join("ca.pem");
    mkfifo(&fifo);
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"n\"\n[model]\npackage = {:?}\n[mqtt]\nhost = \"h\"\nusername = \"u\"\n\
             password_file = \"/dev/zero\"\n[mqtt.tls]\nca_file = {:?}\n\
             [[camera]]\nname = \"c\"\nuri = \"rtsp://x/y\"\n",
            s(&pkg),
            s(&fifo)
        ),
    )
    .expect("config");
    let o = run(&["check-config", s(&cfg)]);
    assert_exit(
        "password_file /dev/zero, ca_file FIFO",
        &o,
        2,
        &[
            "mqtt.password_file",
            "character device",
            "mqtt.tls.ca_file",
            "FIFO",
        ],
    );
}

#[test]
fn package_files_that_are_fifos_or_devices_are_refused_not_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    type Setup = fn(&Path);
    let cases: [(&str, Setup, &[&str], &[&str]); 4] = [
        (
            "manifest is a FIFO",
            |p| {
                std::fs::remove_file(p.join("manifest.toml")).expect("rm");
                mkfifo(&p.join("manifest.toml"));
            },
            &[],
            &[
                "manifest",
                "manifest.toml",
                "FIFO (named pipe), not a regular file",
            ],
        ),
        (
            "manifest is /dev/zero",
            |p| {
                std::fs::remove_file(p.join("manifest.toml")).expect("rm");
                std::os::unix::fs::symlink("/dev/zero", p.join("manifest.toml")).expect("ln");
            },
            &[],
            &["manifest.toml", "character device"],
        ),
        // --fast-load skips hashing files over 64 MiB: a FIFO reports size 0, so it used to be
        // hashed, i.e. read forever.
        (
            "model.onnx is a FIFO",
            |p| {
                std::fs::remove_file(p.join("model.onnx")).expect("rm");
                mkfifo(&p.join("model.onnx"));
            },
            &["--fast-load"],
            &["package file", "model.onnx", "FIFO"],
        ),
        (
            "text.f32 is a FIFO",
            |p| {
                std::fs::remove_file(p.join("text.f32")).expect("rm");
                mkfifo(&p.join("text.f32"));
            },
            &[],
            &["text.f32", "FIFO"],
        ),
    ];
    for (i, (case, setup, extra, needles)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        let pkg = package_copy(&dir);
        setup(&pkg);
        let o = score_pkg(&pkg, extra);
        assert_exit(case, &o, 2, needles);
        assert!(o.stdout.is_empty(), "{case}: nothing scored");
    }
}

/// Sizes that overflow `usize` arithmetic used to panic (exit 101) in debug builds and wrap
/// silently in release builds.
#[test]
fn manifest_sizes_that_overflow_are_load_errors_not_panics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let huge = 1u64 << 62;
    /// Name, manifest edits (from, to), stderr needles.
    type Case = (&'static str, Vec<(String, String)>, Vec<String>);
    let cases: Vec<Case> = vec![
        (
            "grid × patch overflows",
            vec![("grid = 8".into(), format!("grid = {huge}"))],
            vec!["model.grid".into(), huge.to_string(), "input.size".into()],
        ),
        (
            // grid × patch is fine, the text constant's byte count (2 × D × 4) overflows.
            "text bytes overflow",
            vec![
                ("embed_dim = 32".into(), format!("embed_dim = {huge}")),
                ("shape = [2, 32]".into(), format!("shape = [2, {huge}]")),
                (
                    "shape = [\"batch\", 32]".into(),
                    format!("shape = [\"batch\", {huge}]"),
                ),
                (
                    "shape = [\"batch\", 64, 32]".into(),
                    format!("shape = [\"batch\", 64, {huge}]"),
                ),
            ],
            vec![
                "model.embed_dim".into(),
                huge.to_string(),
                "out of range".into(),
            ],
        ),
        (
            "grid² × embed_dim over the bound",
            vec![
                ("size = 112".into(), "size = 4096".into()),
                ("patch = 14".into(), "patch = 1".into()),
                ("grid = 8".into(), "grid = 4096".into()),
            ],
            vec![
                "model.grid² × model.embed_dim".into(),
                "over the limit".into(),
            ],
        ),
        (
            "input.size over the bound",
            vec![("size = 112".into(), format!("size = {huge}"))],
            vec!["input.size".into(), "out of range".into()],
        ),
    ];
    for (i, (case, edits, needles)) in cases.into_iter().enumerate() {
        let pkg = package_copy(&tmp.path().join(i.to_string()));
        for (from, to) in &edits {
            edit_manifest(&pkg, from, to);
        }
        let o = score_pkg(&pkg, &[]);
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        assert_exit(case, &o, 2, &needles);
        assert!(
            stderr(&o).contains("manifest.toml"),
            "{case}: {}",
            stderr(&o)
        );
    }
}

/// NaN in `input.std` used to pass (`NaN <= 0` is false) and score every image NaN
/// (`"score": null`); a denormal `tau` made every score 0.5.
#[test]
fn non_finite_zero_or_denormal_manifest_numbers_are_load_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &str, &str, &[&str]); 8] = [
        (
            "NaN mean",
            "mean = [0.48145466",
            "mean = [nan",
            &["input.mean[0]", "NaN", "finite"],
        ),
        (
            "inf std",
            "0.26130258",
            "inf",
            &["input.std[1]", "inf", "finite"],
        ),
        ("NaN std", "0.27577711]", "-nan]", &["input.std[2]", "NaN"]),
        ("NaN tau", "tau = 0.07", "tau = nan", &["model.tau", "NaN"]),
        // Finite as TOML (f64), infinite as the f32 the head uses.
        (
            "mean overflows f32",
            "mean = [0.48145466",
            "mean = [1e39",
            &["input.mean[0]", "inf"],
        ),
        (
            "denormal tau",
            "tau = 0.07",
            "tau = 1e-40",
            &["model.tau", "positive normal"],
        ),
        (
            "zero std",
            "std = [0.26862954",
            "std = [0.0",
            &["input.std[0]", "positive normal"],
        ),
        (
            "NaN under [source]",
            "seed = 0",
            "seed = nan",
            &["source.seed", "NaN"],
        ),
    ];
    for (i, (case, from, to, needles)) in cases.into_iter().enumerate() {
        let pkg = package_copy(&tmp.path().join(i.to_string()));
        edit_manifest(&pkg, from, to);
        let o = score_pkg(&pkg, &[]);
        assert_exit(case, &o, 2, needles);
        assert!(
            stderr(&o).contains("manifest.toml"),
            "{case}: {}",
            stderr(&o)
        );
        assert!(o.stdout.is_empty(), "{case}: nothing scored");
    }
}

/// `[files]` entries were joined to the package directory as given and hashed: `../x` and
/// `/etc/…` read files outside the package.
#[test]
fn files_entries_outside_the_package_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outside = tmp.path().join("outside.bin");
    std::fs::write(&outside, b"not part of the package").expect("outside");
    let hash = sha256_file(&outside).expect("hash");
    for (i, name) in [
        "../outside.bin".to_string(),
        s(&outside).to_string(),
        "./text.f32".to_string(),
        "sub/../../outside.bin".to_string(),
    ]
    .iter()
    .enumerate()
    {
        // The file is really there, with the right hash: the loader used to accept it.
        let dir = tmp.path().join(i.to_string());
        let pkg = package_copy(&dir);
        std::fs::copy(&outside, dir.join("outside.bin")).expect("cp");
        std::fs::create_dir(pkg.join("sub")).expect("mkdir");
        let hash = if name.ends_with("text.f32") {
            sha256_file(&pkg.join("text.f32")).expect("hash")
        } else {
            hash.clone()
        };
        edit_manifest(
            &pkg,
            "[files]\n",
            &format!("[files]\n{name:?} = \"{hash}\"\n"),
        );
        let o = score_pkg(&pkg, &[]);
        assert_exit(
            name,
            &o,
            2,
            &[
                &format!("{name:?}"),
                "not a plain relative path inside the package",
            ],
        );
    }
    // A symlink inside the package that leads out of it.
    let pkg = package_copy(&tmp.path().join("link"));
    let onnx = pkg.join("model.onnx");
    let moved = tmp.path().join("model.onnx");
    std::fs::rename(&onnx, &moved).expect("mv");
    std::os::unix::fs::symlink(&moved, &onnx).expect("ln");
    let o = score_pkg(&pkg, &[]);
    assert_exit(
        "symlink out",
        &o,
        2,
        &[
            "\"model.onnx\" resolves to",
            "outside the package directory",
        ],
    );
    // A symlink that stays inside is fine (the hash still has to match).
    let pkg = package_copy(&tmp.path().join("inside"));
    std::fs::create_dir(pkg.join("blobs")).expect("mkdir");
    std::fs::rename(pkg.join("text.f32"), pkg.join("blobs/text.f32")).expect("mv");
    std::os::unix::fs::symlink("blobs/text.f32", pkg.join("text.f32")).expect("ln");
    let loaded = anomalyclip_edge::package::ModelPackage::load(
        &pkg,
        anomalyclip_edge::package::HashCheck::All,
    );
    assert!(
        loaded.is_ok(),
        "symlink inside the package: {:?}",
        loaded.err()
    );
}

/// `score --threads 100000` crashed with SIGSEGV inside ONNX Runtime; `[engine] threads` took
/// up to 1024 whatever the machine.
#[test]
fn absurd_thread_counts_are_usage_errors() {
    let max = anomalyclip_edge::engine::max_threads();
    assert!(
        (4..=anomalyclip_edge::engine::MAX_THREADS).contains(&max),
        "{max}"
    );
    let image = Golden::load().images[0].path.clone();
    let model = tiny_package();
    for n in ["100000".to_string(), (max + 1).to_string()] {
        let o = run(&["score", "--model", s(&model), "--threads", &n, s(&image)]);
        assert_exit(
            "score",
            &o,
            2,
            &[&format!("--threads {n} is out of range"), "CPU"],
        );
        assert!(o.stdout.is_empty());
        let data = tempfile::tempdir().expect("tempdir");
        let o = run(&[
            "eval",
            "--model",
            s(&model),
            "--data",
            s(data.path()),
            "--threads",
            &n,
        ]);
        assert_exit("eval", &o, 2, &[&format!("--threads {n} is out of range")]);
    }
    let o = run(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        "/nonexistent",
        "--batch",
        "100000",
    ]);
    assert_exit(
        "eval --batch",
        &o,
        2,
        &["--batch 100000", "expected 1 to 64"],
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"n\"\n[model]\npackage = {:?}\n[engine]\nthreads = 1024\n\
             [mqtt]\nhost = \"h\"\n[[camera]]\nname = \"c\"\nuri = \"rtsp://x/y\"\n",
            s(&model)
        ),
    )
    .expect("config");
    let o = run(&["check-config", s(&cfg)]);
    assert_exit(
        "[engine] threads = 1024",
        &o,
        2,
        &["engine.threads", "1024 is out of range"],
    );
}

#[test]
fn a_fifo_or_dev_zero_as_meta_json_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("meta.json");
    mkfifo(&fifo);
    let model = tiny_package();
    for (case, meta, kind) in [
        ("fifo", s(&fifo), "FIFO"),
        ("zero", "/dev/zero", "character device"),
    ] {
        let o = run(&[
            "eval",
            "--model",
            s(&model),
            "--data",
            s(dir.path()),
            "--meta",
            meta,
            "--out",
            s(&dir.path().join("out")),
        ]);
        assert_exit(case, &o, 2, &["meta.json", meta, kind]);
    }
    // ROOT/meta.json as a FIFO with --layout auto: refused, not skipped and not read.
    let o = run(&["eval", "--model", s(&model), "--data", s(dir.path())]);
    assert_exit("ROOT/meta.json fifo", &o, 2, &["meta.json", "FIFO"]);
}

/// `dataset-meta` on a tree with the layout's folders but no image wrote an empty meta.json and
/// exited 0.
#[test]
fn dataset_meta_on_a_tree_without_images_writes_nothing_and_exits_2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sdd = tmp.path().join("sdd");
    std::fs::create_dir_all(sdd.join("test/good")).expect("mkdir");
    std::fs::create_dir_all(sdd.join("test/crack")).expect("mkdir");
    std::fs::write(sdd.join("test/good/readme.txt"), "not an image").expect("txt");
    let mvtec = tmp.path().join("mvtec");
    std::fs::create_dir_all(mvtec.join("bottle/test/good")).expect("mkdir");
    std::fs::create_dir_all(mvtec.join("bottle/train/good")).expect("mkdir");
    for (root, layout, needle) in [
        (&sdd, "sdd", "ROOT/test/<species>/"),
        (&sdd, "auto", "ROOT/test/<species>/"),
        (&mvtec, "mvtec", "ROOT/<class>/test/<species>/"),
    ] {
        let o = run(&["dataset-meta", s(root), "--layout", layout]);
        assert_exit(
            layout,
            &o,
            2,
            &["no test images under", s(root), needle, "nothing written"],
        );
        assert!(
            !root.join("meta.json").exists(),
            "{layout}: meta.json written"
        );
    }
}

/// `--map-png` into a place that cannot be written gave exit 1, but the image's JSON line had no
/// `error`: a consumer reading stdout saw a success.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn an_output_file_that_cannot_be_written_puts_error_in_the_json_line() {
    let Some(_) = ort_or_skip("an_output_file_that_cannot_be_written_puts_error_in_the_json_line")
    else {
        return;
    };
    let golden = Golden::load();
    let (a, b) = (&golden.images[0].path, &golden.images[1].path);
    let stem_a = a.file_stem().and_then(|s| s.to_str()).expect("stem");
    let tmp = tempfile::tempdir().expect("tempdir");
    for (flag, suffix) in [
        ("--map-png", "map.png"),
        ("--overlay", "overlay.png"),
        ("--raw-map", "map.f32"),
    ] {
        let out = tmp.path().join(suffix);
        // A directory where the file for image `a` should go: unwritable even for root.
        std::fs::create_dir_all(out.join(format!("{stem_a}.{suffix}"))).expect("mkdir");
        let o = run(&[
            "score",
            "--model",
            s(&tiny_package()),
            flag,
            s(&out),
            s(a),
            s(b),
        ]);
        assert_exit(flag, &o, 1, &[suffix]);
        let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        assert_eq!(lines.len(), 2, "{flag}: {lines:?}");
        let err = lines[0]["error"].as_str().unwrap_or_else(|| {
            panic!("{flag}: the failed image's line has no error: {}", lines[0])
        });
        assert!(err.contains(&format!("{stem_a}.{suffix}")), "{flag}: {err}");
        assert!(
            lines[0]["score"].is_f64(),
            "{flag}: scored all the same: {}",
            lines[0]
        );
        assert!(lines[1].get("error").is_none(), "{flag}: {}", lines[1]);
        assert!(lines[1]["score"].is_f64(), "{flag}: {}", lines[1]);
    }
}

/// An image path that is a FIFO hung `score` forever; `/dev/zero` was read until memory ran out.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn a_fifo_or_dev_zero_as_image_is_an_item_error_not_a_hang() {
    let Some(_) = ort_or_skip("a_fifo_or_dev_zero_as_image_is_an_item_error_not_a_hang") else {
        return;
    };
    let golden = Golden::load();
    let good = &golden.images[0].path;
    let tmp = tempfile::tempdir().expect("tempdir");
    let fifo = tmp.path().join("pipe.png");
    mkfifo(&fifo);
    let o = run(&[
        "score",
        "--model",
        s(&tiny_package()),
        s(&fifo),
        "/dev/zero",
        s(good),
    ]);
    assert_exit("fifo + /dev/zero", &o, 1, &["FIFO", "character device"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, needle) in lines.iter().zip(["FIFO", "character device"]) {
        let err = line["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error: {line}"));
        assert!(
            err.contains(needle) && err.contains("not a regular file"),
            "{err}"
        );
        assert!(line.get("score").is_none(), "{line}");
    }
    assert!(
        lines[2]["score"].is_f64(),
        "the good image is still scored: {}",
        lines[2]
    );
}

/// In a dataset, a FIFO image or mask is an issue of that item that says what it is (it used to
/// be reported as "does not exist"), and validation does not wait on it.
#[test]
fn a_fifo_image_or_mask_in_a_dataset_is_an_item_issue_that_names_it() {
    use anomalyclip_edge::eval::dataset::{self, Layout, ValidateOptions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("cls");
    let good = Golden::load().images[0].path.clone();
    std::fs::create_dir_all(root.join("test/good")).expect("mkdir");
    std::fs::create_dir_all(root.join("test/crack")).expect("mkdir");
    std::fs::create_dir_all(root.join("ground_truth/crack")).expect("mkdir");
    std::fs::copy(&good, root.join("test/good/000.png")).expect("cp");
    std::fs::copy(&good, root.join("test/crack/000.png")).expect("cp");
    mkfifo(&root.join("test/good/001.png"));
    mkfifo(&root.join("ground_truth/crack/000_mask.png"));
    // Discovery lists regular files only; the meta.json names the FIFOs explicitly, as a hostile
    // one would.
    let meta = r#"{"train": {}, "test": {"cls": [
            {"img_path": "test/good/000.png", "mask_path": "", "cls_name": "cls", "specie_name": "good", "anomaly": 0},
            {"img_path": "test/good/001.png", "mask_path": "", "cls_name": "cls", "specie_name": "good", "anomaly": 0},
            {"img_path": "test/crack/000.png", "mask_path": "ground_truth/crack/000_mask.png", "cls_name": "cls", "specie_name": "crack", "anomaly": 1}
        ]}}"#;
    std::fs::write(root.join("meta.json"), meta).expect("meta");
    let (tx, rx) = std::sync::mpsc::channel();
    let r = root.clone();
    std::thread::spawn(move || {
        let opened = dataset::open(&r, None, Layout::Auto).map_err(|e| e.to_string());
        let validated = opened.and_then(|o| {
            dataset::validate(&r, &o, &ValidateOptions::default()).map_err(|e| e.to_string())
        });
        let _ =
            tx.send(validated.map(|v| v.issues.iter().map(|i| i.to_string()).collect::<Vec<_>>()));
    });
    let issues = rx
        .recv_timeout(TIMEOUT)
        .expect("dataset validation hangs on a FIFO")
        .expect("validate");
    assert!(
        issues
            .iter()
            .any(|i| i.contains("test/good/001.png") && i.contains("FIFO")),
        "{issues:#?}"
    );
    assert!(
        issues
            .iter()
            .any(|i| i.contains("000_mask.png") && i.contains("FIFO")),
        "{issues:#?}"
    );
}
