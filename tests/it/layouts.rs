//! `dataset-meta --layout NAME` for the 17 official AnomalyCLIP layouts, against the official
//! generators' own output.
//!
//! For each layout, `tests/fixtures/layouts/<name>/` holds `tree.txt` (a small synthetic tree),
//! `files/` (non-image files with content: the VisA split CSV) and `expected.json`: what the
//! official `generate_dataset_json/<script>.py` wrote for that tree (run with the relative root
//! `ROOT` by `engines/make_layout_fixtures.py`; script commit in the fixture README). The test
//! builds the same tree, runs the real binary, and compares the JSON values after normalising
//! exactly the deliberate differences of that layout (see [`Difference`]); everything else must be
//! equal. Also: a second run with the written `meta.json` present lists the same items (three
//! official scripts crash there), bad input exits 2 with one line naming the path, and `eval`
//! runs on a non-MVTec layout (VisA) with the tiny random-weight model (wiring only; its scores
//! mean nothing).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layouts")
}

/// A deliberate difference from the official generator, normalised before comparing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Difference {
    /// The official script prefixes paths with ROOT (`ROOT/…`, br35 `ROOT//…`); ours are relative.
    RootPrefix,
    /// DAGM's official split keys are `Train`/`Test` (the official loader reads `test`); ours are
    /// `train`/`test`.
    SplitKeyCase,
    /// The official item order follows `os.listdir` and Python set iteration (filesystem- and
    /// hash-dependent); ours is sorted by path. The official lists are sorted before comparing
    /// (ours are compared as written, so they must already be sorted).
    Order,
}

use Difference::*;

/// The deliberate differences of each layout (the official script's file in brackets).
fn differences(layout: &str) -> &'static [Difference] {
    match layout {
        // VisA keeps the CSV's row order, like the official script: no difference at all.
        "visa" => &[],
        "dagm" => &[SplitKeyCase, Order],
        "br35" | "brainmri" | "clinicdb" | "colondb" | "kvasir" | "endotect" | "tn3k" => {
            &[RootPrefix, Order]
        }
        _ => &[Order],
    }
}

fn is_image(p: &str) -> bool {
    let ext = p.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    ["png", "jpg", "jpeg", "bmp"].contains(&ext.as_str())
}

fn is_mask(p: &str) -> bool {
    let l = p.to_ascii_lowercase();
    ["mask", "label", "groundtruth", "ground_truth"]
        .iter()
        .any(|k| l.contains(k))
}

/// Builds the fixture tree of `layout` under a new temp dir; returns (temp dir, ROOT).
fn build_tree(layout: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = fixtures().join(layout);
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("ROOT");
    let list = std::fs::read_to_string(dir.join("tree.txt")).unwrap();
    for (i, rel) in list.lines().filter(|l| !l.is_empty()).enumerate() {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let content = dir.join("files").join(rel);
        if content.is_file() {
            std::fs::copy(&content, &p).unwrap();
        } else if is_image(rel) {
            let mask = is_mask(rel);
            let img = image::GrayImage::from_fn(32, 32, |x, y| {
                let inside = (8..16).contains(&x) && (8..16).contains(&y);
                image::Luma([match (mask, inside) {
                    (true, true) => 255,
                    (true, false) => 0,
                    (false, _) => ((x * 3 + y * 5 + i as u32 * 7) % 200) as u8 + 20,
                }])
            });
            img.save(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        } else {
            std::fs::write(&p, b"").unwrap();
        }
    }
    (t, root)
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
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

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The official output with `diffs` normalised away.
fn normalise(mut v: Value, diffs: &[Difference]) -> Value {
    if diffs.contains(&SplitKeyCase) {
        let obj = v.as_object_mut().unwrap();
        for (from, to) in [("Train", "train"), ("Test", "test")] {
            if let Some(x) = obj.remove(from) {
                obj.insert(to.into(), x);
            }
        }
    }
    for split in v.as_object_mut().unwrap().values_mut() {
        for items in split.as_object_mut().unwrap().values_mut() {
            let list = items.as_array_mut().unwrap();
            if diffs.contains(&RootPrefix) {
                for item in list.iter_mut() {
                    for key in ["img_path", "mask_path"] {
                        let p = item[key].as_str().unwrap();
                        if let Some(rest) = p.strip_prefix("ROOT/") {
                            item[key] = Value::from(rest.trim_start_matches('/'));
                        }
                    }
                }
            }
            if diffs.contains(&Order) {
                list.sort_by(|a, b| a["img_path"].as_str().cmp(&b["img_path"].as_str()));
            }
        }
    }
    v
}

/// Runs `dataset-meta --layout <layout>` on the fixture tree and compares with the official
/// output (normalised by the layout's deliberate differences only); then runs again over the
/// written `meta.json` and expects the same file.
fn check_layout(layout: &str) {
    let (_t, root) = build_tree(layout);
    let o = run(&["dataset-meta", s(&root), "--layout", layout]);
    assert_eq!(o.status.code(), Some(0), "{layout}");
    let meta = root.join("meta.json");
    let ours = read_json(&meta);
    let official = read_json(&fixtures().join(layout).join("expected.json"));
    let expected = normalise(official, differences(layout));
    assert_eq!(
        ours,
        expected,
        "{layout}: ours\n{}\nofficial (normalised)\n{}",
        serde_json::to_string_pretty(&ours).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap()
    );
    let o = run(&["dataset-meta", s(&root), "--layout", layout, "--force"]);
    assert_eq!(o.status.code(), Some(0), "{layout}: second run");
    assert_eq!(read_json(&meta), ours, "{layout}: meta.json listed itself");
}

macro_rules! layout_tests {
    ($($layout:literal => $name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_layout($layout);
            }
        )*

        /// Every layout the binary accepts (but `auto`) has a fixture test.
        const TESTED: &[&str] = &[$($layout),*];
    };
}

layout_tests! {
    "mvtec" => mvtec_meta_equals_the_official_generator_output,
    "visa" => visa_meta_equals_the_official_generator_output,
    "mpdd" => mpdd_meta_equals_the_official_generator_output,
    "btad" => btad_meta_equals_the_official_generator_output,
    "sdd" => sdd_official_tree_meta_equals_the_official_generator_output,
    "dagm" => dagm_meta_equals_the_official_generator_output_with_lowercase_split_keys,
    "dtd" => dtd_meta_equals_the_official_generator_output,
    "head_ct" => head_ct_meta_equals_the_official_generator_output,
    "brainmri" => brainmri_meta_equals_the_official_generator_output_with_relative_paths,
    "br35" => br35_meta_equals_the_official_generator_output_with_relative_paths,
    "covid" => covid_meta_equals_the_official_generator_output,
    "isbi" => isbi_meta_equals_the_official_generator_output,
    "clinicdb" => clinicdb_meta_equals_the_official_generator_output_with_relative_paths,
    "colondb" => colondb_meta_equals_the_official_generator_output_with_relative_paths,
    "kvasir" => kvasir_meta_equals_the_official_generator_output_with_relative_paths,
    "endotect" => endotect_meta_equals_the_official_generator_output_with_relative_paths,
    "tn3k" => tn3k_meta_equals_the_official_generator_output_with_relative_paths,
}

#[test]
fn every_accepted_layout_has_a_fixture_compared_with_the_official_output() {
    use anomalyclip_edge::eval::dataset::Layout;
    let accepted: Vec<&str> = Layout::NAMES
        .iter()
        .copied()
        .filter(|n| *n != "auto")
        .collect();
    assert_eq!(accepted.len(), 17);
    let mut tested = TESTED.to_vec();
    tested.sort_unstable();
    let mut accepted_sorted = accepted.clone();
    accepted_sorted.sort_unstable();
    assert_eq!(tested, accepted_sorted);
    for l in accepted {
        assert!(fixtures().join(l).join("expected.json").is_file(), "{l}");
    }
}

#[test]
fn a_mask_that_sorts_apart_from_its_image_is_still_paired_by_name() {
    // The official scripts pair sorted lists by index: `1, 10, 2` against masks named
    // `10_mask, 1_mask, 2_mask` would mispair; pairing by name does not.
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    for d in ["images", "masks"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let img = image::GrayImage::new(4, 4);
    for n in ["1", "10", "2"] {
        img.save(root.join(format!("images/{n}.png"))).unwrap();
        img.save(root.join(format!("masks/{n}_mask.png"))).unwrap();
    }
    // One image without a mask: it keeps an empty mask path, nothing shifts.
    img.save(root.join("images/3.png")).unwrap();
    let o = run(&["dataset-meta", s(root), "--layout", "kvasir"]);
    assert_eq!(o.status.code(), Some(0));
    let meta = read_json(&root.join("meta.json"));
    let pairs: Vec<(&str, &str)> = meta["test"]["colon"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["img_path"].as_str().unwrap(),
                i["mask_path"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("images/1.png", "masks/1_mask.png"),
            ("images/10.png", "masks/10_mask.png"),
            ("images/2.png", "masks/2_mask.png"),
            ("images/3.png", ""),
        ]
    );
}

fn assert_refused(o: &Output, needles: &[&str], root: &Path) {
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
    assert!(!root.join("meta.json").exists(), "nothing is written");
}

#[test]
fn a_tree_without_the_folders_of_its_layout_is_refused_naming_them() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    std::fs::create_dir_all(root.join("images")).unwrap();
    for (layout, needle) in [
        ("kvasir", "ROOT/images/ and ROOT/masks/"),
        ("tn3k", "ROOT/test-image/ and ROOT/test-mask/"),
        ("brainmri", "ROOT/brain_tumor_dataset/{no,yes}"),
        ("isbi", "ISBI2016_ISIC_Part1_Test_GroundTruth"),
        ("visa", "ROOT/split_csv/1cls.csv"),
        ("dagm", "{Train,Test}"),
        ("mpdd", "ROOT/<class>/test/<species>/"),
        ("endotect", "ROOT/masks/"),
    ] {
        let o = run(&["dataset-meta", s(root), "--layout", layout]);
        assert_refused(&o, &[s(root), needle, &format!("--layout {layout}")], root);
    }
}

#[test]
fn an_unknown_layout_is_refused_listing_the_known_ones() {
    let t = tempfile::tempdir().unwrap();
    let o = run(&["dataset-meta", s(t.path()), "--layout", "mvtec3d"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let first = err.lines().next().unwrap();
    assert!(
        first.contains("unknown layout \"mvtec3d\"") && first.contains("tn3k"),
        "{err}"
    );
}

#[test]
fn a_bad_visa_split_csv_is_refused_naming_the_file_and_line() {
    let (_t, root) = build_tree("visa");
    let csv = root.join("split_csv/1cls.csv");
    let good = std::fs::read_to_string(&csv).unwrap();
    let cases: [(String, &[&str]); 4] = [
        (
            good.replacen(",normal,", ",broken,", 1),
            &["line 2", "label \"broken\"", "\"normal\" or \"anomaly\""],
        ),
        ("object,split\ncandle,test\n".into(), &["expected 5"]),
        (
            "object,split,label,image,mask\n".into(),
            &["no train or test rows"],
        ),
        (
            "object,split,label,image,mask\ncandle,test\n".into(),
            &["line 2", "expected object,split,label,image"],
        ),
    ];
    for (text, needles) in cases {
        std::fs::write(&csv, text).unwrap();
        let o = run(&["dataset-meta", s(&root), "--layout", "visa"]);
        let mut all = vec![s(&csv)];
        all.extend_from_slice(needles);
        assert_refused(&o, &all, &root);
    }
    // Not UTF-8.
    std::fs::write(&csv, b"object,split\xff\n").unwrap();
    let o = run(&["dataset-meta", s(&root), "--layout", "visa"]);
    assert_refused(&o, &[s(&csv)], &root);
}

#[test]
fn eval_runs_on_a_visa_tree_found_by_its_split_csv() {
    // Wiring only: the tiny model has random weights, so the metrics mean nothing.
    let (_t, root) = build_tree("visa");
    let out = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let mut reports = Vec::new();
    for layout in ["visa", "auto"] {
        let o = run(&[
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&root),
            "--layout",
            layout,
            "--out",
            s(out.path()),
            "--no-progress",
        ]);
        assert_eq!(o.status.code(), Some(0), "--layout {layout}");
        reports.push(read_json(&out.path().join("eval-report.json")));
    }
    for report in &reports {
        let classes = report["classes"].as_array().unwrap();
        assert_eq!(classes.len(), 12);
        for c in classes {
            assert_eq!(c["images"], 2, "{c}");
            assert_eq!(c["normal"], 1, "{c}");
            assert_eq!(c["anomalous"], 1, "{c}");
            assert_eq!(c["pixel_images"], 2, "{c}");
        }
    }
    assert_eq!(reports[0]["classes"], reports[1]["classes"]);
}

#[test]
fn covid_counts_a_normal_folder_in_any_case_as_normal() {
    // Newer releases of the COVID-19 Radiography set name the folder `Normal`; the official
    // script matches only `NORMAL` and would count those images as defects.
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let img = image::GrayImage::new(4, 4);
    for p in ["Normal/Normal-1.png", "COVID/COVID-1.png"] {
        std::fs::create_dir_all(root.join(p).parent().unwrap()).unwrap();
        img.save(root.join(p)).unwrap();
    }
    let o = run(&["dataset-meta", s(root), "--layout", "covid"]);
    assert_eq!(o.status.code(), Some(0));
    let meta = read_json(&root.join("meta.json"));
    let labels: Vec<(&str, u64)> = meta["test"]["chest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["specie_name"].as_str().unwrap(),
                i["anomaly"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(labels, [("COVID", 1), ("Normal", 0)]);
}
