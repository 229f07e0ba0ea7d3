//! `anomalyclip-edge eval` and `dataset-meta` end to end: the real binary, the tiny model package,
//! synthetic datasets generated here (MVTec-style with an image-only class, and SDD-style).
//!
//! - The report's numbers equal those `engines/eval_reference.py maps` recomputes (scikit-learn,
//!   its own AUPRO, Pillow mask resizing) from the maps the binary dumped: |Δ| ≤ 1e-6 for AUROC /
//!   AP, ≤ 1e-4 for AUPRO. Python: `<repo>/.venv/bin/python`, else `ANOMALYCLIP_PYTHON`; without
//!   either the comparison tests are ignored (CI runs them with `--include-ignored` and fails).
//! - Reports are byte-identical across runs and `--batch` sizes; so are the dumped maps.
//! - Bad datasets: warnings counted (exit 0), `--strict` fails with one line (exit 2, no report),
//!   skipped items give a report and exit 1, an unreadable ROOT exits 2.
//! - `dataset-meta` writes a meta.json that `eval --meta` reads back with the same numbers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> PathBuf {
    repo().join("tests/fixtures/tiny")
}

// ------------------------------------------------------------------------ synthetic data

/// Deterministic generator (64-bit LCG, high bits).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
}

#[derive(Clone, Copy)]
struct Ellipse {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
}

impl Ellipse {
    fn contains(&self, x: u32, y: u32) -> bool {
        let dx = (x as f32 + 0.5 - self.cx) / self.rx;
        let dy = (y as f32 + 0.5 - self.cy) / self.ry;
        dx * dx + dy * dy <= 1.0
    }
}

/// One class of a synthetic tree.
struct ClassSpec {
    name: &'static str,
    width: u32,
    height: u32,
    gray: bool,
    good: usize,
    /// Defect types and their image counts.
    defects: &'static [(&'static str, usize)],
    /// Whether masks are written (false: an image-only class).
    masks: bool,
}

/// A written test item: image and mask paths relative to ROOT.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Written {
    img: String,
    mask: Option<String>,
}

fn save_png(path: &Path, img: &image::DynamicImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// Writes one class under `dir` (`dir/test/<species>/NNN.png`, masks in
/// `dir/ground_truth/<defect>/NNN_mask.png`); paths in the result are prefixed with `prefix`.
fn write_class(dir: &Path, prefix: &str, spec: &ClassSpec, rng: &mut Lcg) -> Vec<Written> {
    let (w, h) = (spec.width, spec.height);
    let mut out = Vec::new();
    let species = std::iter::repeat_n("good", spec.good).chain(
        spec.defects
            .iter()
            .flat_map(|(d, n)| std::iter::repeat_n(*d, *n)),
    );
    for (i, sp) in species.enumerate() {
        let base = [
            rng.unit() * 120.0 + 60.0,
            rng.unit() * 120.0 + 60.0,
            rng.unit() * 120.0 + 60.0,
        ];
        let (fx, fy, phase) = (
            rng.unit() * 0.15 + 0.02,
            rng.unit() * 0.15 + 0.02,
            rng.unit() * 6.3,
        );
        let defects: Vec<Ellipse> = if sp == "good" {
            Vec::new()
        } else {
            (0..1 + i % 2)
                .map(|_| Ellipse {
                    cx: (rng.unit() * 0.6 + 0.2) * w as f32,
                    cy: (rng.unit() * 0.6 + 0.2) * h as f32,
                    rx: (rng.unit() * 0.12 + 0.05) * w as f32,
                    ry: (rng.unit() * 0.12 + 0.05) * h as f32,
                })
                .collect()
        };
        let colour = [rng.next() as u8, rng.next() as u8, rng.next() as u8];
        let mut noise = Lcg(rng.next() as u64);
        let rgb = image::RgbImage::from_fn(w, h, |x, y| {
            if defects.iter().any(|e| e.contains(x, y)) {
                return image::Rgb(colour);
            }
            let t = 30.0 * (fx * x as f32 + phase).sin() * (fy * y as f32 - phase).cos();
            image::Rgb(base.map(|b| (b + t + noise.unit() * 16.0 - 8.0).clamp(0.0, 255.0) as u8))
        });
        let img = if spec.gray {
            image::DynamicImage::ImageRgb8(rgb).into_luma8().into()
        } else {
            image::DynamicImage::ImageRgb8(rgb)
        };
        let file = format!("{i:03}.png");
        save_png(&dir.join("test").join(sp).join(&file), &img);
        let img_rel = format!("{prefix}test/{sp}/{file}");
        let mask = (sp != "good" && spec.masks).then(|| {
            let m = image::GrayImage::from_fn(w, h, |x, y| {
                image::Luma([if defects.iter().any(|e| e.contains(x, y)) {
                    255
                } else {
                    0
                }])
            });
            let name = format!("{i:03}_mask.png");
            save_png(&dir.join("ground_truth").join(sp).join(&name), &m.into());
            format!("{prefix}ground_truth/{sp}/{name}")
        });
        out.push(Written { img: img_rel, mask });
    }
    out
}

const MVTEC: &[ClassSpec] = &[
    ClassSpec {
        name: "bottle",
        width: 128,
        height: 128,
        gray: false,
        good: 4,
        defects: &[("broken", 4)],
        masks: true,
    },
    ClassSpec {
        name: "cable",
        width: 160,
        height: 120,
        gray: false,
        good: 3,
        defects: &[("bent", 2), ("cut", 2)],
        masks: true,
    },
    ClassSpec {
        name: "screw",
        width: 96,
        height: 96,
        gray: true,
        good: 3,
        defects: &[("scratch", 3)],
        masks: false,
    },
];

/// An MVTec-style tree: bottle and cable with masks, screw image-only (21 test images).
fn mvtec_tree(seed: u64) -> (tempfile::TempDir, Vec<Written>) {
    let t = tempfile::tempdir().unwrap();
    let mut rng = Lcg(seed);
    let mut all = Vec::new();
    for spec in MVTEC {
        let dir = t.path().join(spec.name);
        all.extend(write_class(
            &dir,
            &format!("{}/", spec.name),
            spec,
            &mut rng,
        ));
        // A training image, which eval must ignore.
        save_png(
            &dir.join("train/good/000.png"),
            &image::RgbImage::new(8, 8).into(),
        );
    }
    all.sort();
    (t, all)
}

/// An SDD-style tree: one category at `<tmp>/kolektor` (9 test images).
fn sdd_tree() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kolektor");
    let spec = ClassSpec {
        name: "kolektor",
        width: 100,
        height: 140,
        gray: false,
        good: 5,
        defects: &[("defect", 4)],
        masks: true,
    };
    write_class(&root, "", &spec, &mut Lcg(99));
    (t, root)
}

// ------------------------------------------------------------------------ running things

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run anomalyclip-edge");
    eprintln!(
        "$ anomalyclip-edge {}\n-> {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `eval` on `root` with reports in `out_dir`; returns the process output.
fn eval(root: &Path, out_dir: &Path, extra: &[&str]) -> Output {
    let model = model();
    let mut args = vec![
        "eval",
        "--model",
        s(&model),
        "--data",
        s(root),
        "--out",
        s(out_dir),
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The Python interpreter for the references, or `None` (skip) with the reason printed.
fn python() -> Option<PathBuf> {
    let venv = repo().join(".venv/bin/python");
    if venv.is_file() {
        return Some(venv);
    }
    if let Some(p) = std::env::var_os("ANOMALYCLIP_PYTHON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let reason = "no .venv/bin/python and ANOMALYCLIP_PYTHON unset (run scripts/setup)";
    panic!("{reason}");
}

/// Runs `engines/eval_reference.py maps` on a dump.
fn python_metrics(py: &Path, dump: &Path, root: &Path) -> Value {
    let out = Command::new(py)
        .arg(repo().join("engines/eval_reference.py"))
        .args(["maps", "--dump", s(dump), "--data", s(root)])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "eval_reference.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("eval_reference.py prints JSON")
}

/// The paper's metrics, then the image metrics of the other decision statistics.
const METRICS: [&str; 8] = [
    "image_auroc",
    "image_ap",
    "pixel_auroc",
    "aupro",
    "map_max_auroc",
    "map_max_ap",
    "blend_auroc",
    "blend_ap",
];

fn tolerance(metric: &str) -> f64 {
    if metric == "aupro" { 1e-4 } else { 1e-6 }
}

/// Asserts the report equals the Python numbers; returns how many defined values were compared.
fn assert_matches_python(report: &Value, py: &Value) -> usize {
    let rc = report["classes"].as_array().unwrap();
    let pc = py["classes"].as_array().unwrap();
    let names = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(rc), names(pc), "classes");
    let mut compared = 0;
    for (r, p) in rc.iter().zip(pc) {
        let name = r["name"].as_str().unwrap();
        for k in ["images", "anomalous", "pixel_images", "regions"] {
            assert_eq!(r[k], p[k], "{name}: {k}");
        }
        for m in METRICS {
            match (r[m].as_f64(), p[m].as_f64()) {
                (Some(a), Some(b)) => {
                    assert!(
                        (a - b).abs() <= tolerance(m),
                        "{name} {m}: report {a}, python {b}, |Δ| {:e}",
                        (a - b).abs()
                    );
                    compared += 1;
                }
                (None, None) => {
                    assert!(r[m]["undefined"].is_string(), "{name} {m}: {}", r[m]);
                }
                (a, b) => panic!("{name} {m}: report {a:?}, python {b:?}"),
            }
        }
    }
    for m in METRICS {
        let (a, b) = (&report["mean"][m], &py["mean"][m]);
        match (a["value"].as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= tolerance(m), "mean {m}: {x} vs {y}"),
            (x, y) => assert_eq!(x, y, "mean {m}"),
        }
        assert_eq!(a["classes"], py["mean"][format!("{m}_classes")], "mean {m}");
    }
    compared
}

/// `index.csv` rows as (img_path, mask_path) pairs, sorted.
fn dumped_pairs(dump: &Path) -> Vec<Written> {
    let text = std::fs::read_to_string(dump.join("index.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("class,img_path,anomalous,score,map_file,width,height,mask_path")
    );
    let mut out: Vec<Written> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 8, "{l}");
            assert_eq!((f[5], f[6]), ("112", "112"), "tiny model maps are 112×112");
            Written {
                img: f[1].to_owned(),
                mask: (!f[7].is_empty()).then(|| f[7].to_owned()),
            }
        })
        .collect();
    out.sort();
    out
}

// ------------------------------------------------------------------------ tests

#[cfg_attr(
    not(have_python),
    ignore = "needs the reference venv .venv/bin/python: run scripts/setup"
)]
#[test]
fn report_matches_python_references_on_dumped_maps() {
    let (t, written) = mvtec_tree(7);
    let out = tempfile::tempdir().unwrap();
    let dump = out.path().join("maps");
    let o = eval(t.path(), out.path(), &["--dump-maps", s(&dump)]);
    assert_eq!(o.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("classes averaged"), "{stdout}");
    assert!(
        stdout.contains("note: random-weight test model"),
        "{stdout}"
    );
    let report = json(&out.path().join("eval-report.json"));
    assert!(out.path().join("eval-report.csv").is_file());
    assert_eq!(report["map_size"], 112);
    assert_eq!(report["source"], "layout:mvtec");
    assert_eq!(report["issue_counts"]["errors"], 0);
    assert_eq!(report["issue_counts"]["warnings"], 0);
    // Every test image was scored and paired with the mask the generator wrote for it.
    assert_eq!(dumped_pairs(&dump), written);
    let screw = &report["classes"][2];
    assert_eq!(screw["name"], "screw");
    assert_eq!(screw["pixel_auroc"]["undefined"], "no_masks");
    assert_eq!(screw["aupro"]["undefined"], "no_masks");

    let Some(py) = python() else { return };
    let reference = python_metrics(&py, &dump, t.path());
    let compared = assert_matches_python(&report, &reference);
    // bottle and cable: 8 metrics each; screw: the 6 image metrics (no masks).
    assert_eq!(compared, 22);
}

#[cfg_attr(
    not(have_python),
    ignore = "needs the reference venv .venv/bin/python: run scripts/setup"
)]
#[test]
fn sdd_tree_matches_python_references() {
    let (_t, root) = sdd_tree();
    let out = tempfile::tempdir().unwrap();
    let dump = out.path().join("maps");
    let o = eval(
        &root,
        out.path(),
        &["--dump-maps", s(&dump), "--batch", "2"],
    );
    assert_eq!(o.status.code(), Some(0));
    let report = json(&out.path().join("eval-report.json"));
    assert_eq!(report["source"], "layout:sdd");
    assert_eq!(report["classes"][0]["name"], "kolektor");
    assert_eq!(report["classes"][0]["pixel_images"], 9);
    let Some(py) = python() else { return };
    let reference = python_metrics(&py, &dump, &root);
    assert_eq!(assert_matches_python(&report, &reference), 8);
}

#[test]
fn reports_and_maps_are_identical_across_runs_and_batch_sizes() {
    let (t, _) = mvtec_tree(11);
    let runs: Vec<(tempfile::TempDir, &[&str])> = vec![
        (tempfile::tempdir().unwrap(), &["--batch", "1"]),
        (tempfile::tempdir().unwrap(), &["--batch", "1"]),
        (tempfile::tempdir().unwrap(), &["--batch", "4"]),
        (
            tempfile::tempdir().unwrap(),
            &["--batch", "5", "--threads", "1"],
        ),
    ];
    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    for (dir, extra) in &runs {
        let dump = dir.path().join("maps");
        let mut args = extra.to_vec();
        args.extend(["--dump-maps", s(&dump)]);
        assert_eq!(eval(t.path(), dir.path(), &args).status.code(), Some(0));
    }
    let first = runs[0].0.path();
    let index = String::from_utf8(read(first, "maps/index.csv")).unwrap();
    let maps: Vec<String> = index
        .lines()
        .skip(1)
        .map(|l| format!("maps/{}", l.split(',').nth(4).unwrap()))
        .collect();
    assert_eq!(maps.len(), 21);
    for (dir, extra) in &runs[1..] {
        for f in ["eval-report.json", "eval-report.csv", "maps/index.csv"] {
            assert!(
                read(first, f) == read(dir.path(), f),
                "{f} differs with {extra:?}"
            );
        }
        for m in &maps {
            assert!(
                read(first, m) == read(dir.path(), m),
                "{m} differs with {extra:?}"
            );
        }
    }
    // Not vacuous: the maps differ between images.
    assert_ne!(read(first, &maps[0]), read(first, &maps[1]));
}

#[test]
fn missing_mask_warns_and_strict_fails_with_one_line() {
    let (t, _) = mvtec_tree(3);
    std::fs::remove_file(t.path().join("bottle/ground_truth/broken/005_mask.png")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = eval(t.path(), out.path(), &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "a warning does not change the exit code"
    );
    let err = stderr(&o);
    assert!(
        err.contains("warning: bottle: bottle/test/broken/005.png"),
        "{err}"
    );
    assert!(
        err.contains("0 error(s) (items skipped), 1 warning(s) (reduced use): missing_mask 1"),
        "{err}"
    );
    let report = json(&out.path().join("eval-report.json"));
    assert_eq!(report["issue_counts"]["warnings"], 1);
    assert_eq!(report["classes"][0]["images"], 8);
    assert_eq!(
        report["classes"][0]["pixel_images"], 7,
        "image metrics only for 005"
    );

    let strict_out = tempfile::tempdir().unwrap();
    let o = eval(t.path(), strict_out.path(), &["--strict"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("error: --strict: 0 errors and 1 warnings"),
        "{err}"
    );
    assert!(!strict_out.path().join("eval-report.json").exists());
}

#[test]
fn unreadable_image_is_skipped_with_a_report_and_exit_1() {
    let (t, _) = mvtec_tree(5);
    std::fs::write(t.path().join("cable/test/good/099.png"), b"not a png").unwrap();
    let out = tempfile::tempdir().unwrap();
    let json_path = out.path().join("sub-r.json");
    let csv_path = out.path().join("r.csv");
    let o = eval(
        t.path(),
        out.path(),
        &["--json", s(&json_path), "--csv", s(&csv_path)],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("error: cable: cable/test/good/099.png"),
        "{err}"
    );
    assert!(err.contains("unreadable_image 1"), "{err}");
    let report = json(&json_path);
    assert_eq!(report["issue_counts"]["errors"], 1);
    assert_eq!(report["classes"][1]["skipped"], 1);
    assert_eq!(report["classes"][1]["images"], 7);
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    assert!(csv.starts_with("class,images,"), "{csv}");
    assert!(
        !out.path().join("eval-report.json").exists(),
        "--json overrides the default"
    );
}

#[test]
fn unreadable_root_and_bad_usage_exit_2_with_one_line() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("no-such-root");
    for (extra, needle) in [
        (vec![], "cannot read"),
        (vec!["--layout", "sdd"], "no dataset found"),
    ] {
        let o = eval(&missing, out.path(), &extra);
        assert_eq!(o.status.code(), Some(2));
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    }
    let (t, _) = mvtec_tree(1);
    let o = eval(t.path(), out.path(), &["--classes", "bottle,wheel"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown classes [\"wheel\"]"));
    let o = eval(t.path(), out.path(), &["--batch", "0"]);
    assert_eq!(o.status.code(), Some(2));
    let o = eval(t.path(), out.path(), &["--classes", "screw,bottle"]);
    assert_eq!(o.status.code(), Some(0));
    let report = json(&out.path().join("eval-report.json"));
    let names: Vec<&str> = report["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bottle", "screw"]);
}

#[test]
fn dataset_meta_round_trips_through_eval_meta() {
    let (t, written) = mvtec_tree(13);
    let root = t.path();
    let work = tempfile::tempdir().unwrap();
    let meta = work.path().join("meta.json");
    let o = run(&[
        "dataset-meta",
        s(root),
        "--layout",
        "mvtec",
        "--output",
        s(&meta),
    ]);
    assert_eq!(o.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout
            .contains("(layout mvtec): 21 test images in 3 class(es): bottle 8, cable 7, screw 6"),
        "{stdout}"
    );
    // The official format: split → class → items.
    let m = json(&meta);
    let mut pairs: Vec<Written> = ["bottle", "cable", "screw"]
        .iter()
        .flat_map(|c| m["test"][c].as_array().unwrap().clone())
        .map(|i| {
            assert!(i["cls_name"].is_string() && i["specie_name"].is_string());
            let mask = i["mask_path"].as_str().unwrap();
            Written {
                img: i["img_path"].as_str().unwrap().to_owned(),
                mask: (!mask.is_empty()).then(|| mask.to_owned()),
            }
        })
        .collect();
    pairs.sort();
    assert_eq!(pairs, written);
    assert_eq!(m["train"]["bottle"].as_array().unwrap().len(), 1);

    let by_layout = tempfile::tempdir().unwrap();
    let by_meta = tempfile::tempdir().unwrap();
    assert_eq!(eval(root, by_layout.path(), &[]).status.code(), Some(0));
    assert_eq!(
        eval(root, by_meta.path(), &["--meta", s(&meta), "--batch", "3"])
            .status
            .code(),
        Some(0)
    );
    let a = json(&by_layout.path().join("eval-report.json"));
    let b = json(&by_meta.path().join("eval-report.json"));
    assert_eq!(b["source"], format!("meta:{}", meta.display()));
    for k in ["classes", "mean", "issue_counts"] {
        assert_eq!(a[k], b[k], "{k}");
    }
    assert!(a["classes"][0]["image_auroc"].is_f64());

    // Default output ROOT/meta.json: not replaced without --force; eval then reads it by itself.
    assert_eq!(run(&["dataset-meta", s(root)]).status.code(), Some(0));
    let o = run(&["dataset-meta", s(root)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--force"));
    assert_eq!(
        run(&["dataset-meta", s(root), "--force"]).status.code(),
        Some(0)
    );
    let auto = tempfile::tempdir().unwrap();
    assert_eq!(eval(root, auto.path(), &[]).status.code(), Some(0));
    let c = json(&auto.path().join("eval-report.json"));
    assert!(c["source"].as_str().unwrap().ends_with("meta.json"));
    assert_eq!(a["classes"], c["classes"]);
}
