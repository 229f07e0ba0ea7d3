//! Dataset discovery, meta.json, validation and the `eval` driver on synthetic trees built in a
//! temp dir: MVTec-style classes with every bad-dataset case, an SDD-style single category, an
//! image-only class, meta.json round trip and wrong paths, strict mode, reports.
//!
//! The mask resizer here is a nearest-neighbour stand-in (the real one is the crate's
//! Pillow-exact bilinear, plugged in by the CLI); the masks in these trees are drawn so that the
//! difference does not matter to what is asserted.

use std::path::{Path, PathBuf};

use anomalyclip_edge::eval::dataset::{
    self, IssueKind, Layout, META_FILE, Meta, Origin, Severity, ValidateOptions, Validated,
};
use anomalyclip_edge::eval::metrics::{self, Metric, Undefined};
use anomalyclip_edge::eval::{self, EvalError, EvalOptions, EvalRequest};

const S: usize = 16;

fn nearest(src: &[u8], w: usize, h: usize, dw: usize, dh: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(dw * dh);
    for y in 0..dh {
        for x in 0..dw {
            out.push(src[(y * h / dh) * w + x * w / dw]);
        }
    }
    out
}

/// A gray image whose pixels encode a defect: bright where the mask is set.
fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> image::GrayImage {
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
}

fn save(path: &Path, img: &image::GrayImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

fn square(x0: u32, y0: u32, side: u32) -> impl Fn(u32, u32) -> bool {
    move |x, y| x >= x0 && x < x0 + side && y >= y0 && y < y0 + side
}

/// Normal image: smooth ramp; anomalous: ramp + bright square where `defect` is true.
fn sample(seed: u32, defect: Option<&dyn Fn(u32, u32) -> bool>) -> image::GrayImage {
    gray(32, 32, |x, y| {
        let base = ((x * 3 + y * 5 + seed * 7) % 40) as u8 + 20;
        match defect {
            Some(d) if d(x, y) => 230,
            _ => base,
        }
    })
}

fn mask_img(w: u32, h: u32, d: &dyn Fn(u32, u32) -> bool) -> image::GrayImage {
    gray(w, h, |x, y| if d(x, y) { 255 } else { 0 })
}

/// ROOT with:
/// - bottle: 3 good, 3 broken (000, 001 with masks; 002 without → missing mask), an unpaired
///   mask 009_mask.png, and a train/good image;
/// - cable: 2 good (001 is garbage → unreadable), 1 cut whose mask is 16×16 (size mismatch);
/// - carpet: image-only (no ground_truth at all): 2 good, 2 hole;
/// - empty: test/good/ with no image.
fn mvtec_tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    save(&r.join("bottle/train/good/000.png"), &sample(0, None));
    for i in 0..3 {
        save(
            &r.join(format!("bottle/test/good/{i:03}.png")),
            &sample(i, None),
        );
    }
    for i in 0..3u32 {
        let d = square(4 + 8 * i, 6, 8);
        save(
            &r.join(format!("bottle/test/broken/{i:03}.png")),
            &sample(10 + i, Some(&d)),
        );
        if i < 2 {
            save(
                &r.join(format!("bottle/ground_truth/broken/{i:03}_mask.png")),
                &mask_img(32, 32, &d),
            );
        }
    }
    save(
        &r.join("bottle/ground_truth/broken/009_mask.png"),
        &mask_img(32, 32, &square(0, 0, 4)),
    );
    // a non-image file is ignored
    std::fs::write(r.join("bottle/test/good/notes.txt"), "x").unwrap();

    save(&r.join("cable/test/good/000.png"), &sample(3, None));
    std::fs::write(r.join("cable/test/good/001.png"), b"not a png at all").unwrap();
    let d = square(8, 8, 16);
    save(&r.join("cable/test/cut/000.png"), &sample(4, Some(&d)));
    save(
        &r.join("cable/ground_truth/cut/000_mask.png"),
        &mask_img(16, 16, &square(4, 4, 8)),
    );

    for i in 0..2u32 {
        save(
            &r.join(format!("carpet/test/good/{i:03}.png")),
            &sample(20 + i, None),
        );
        let d = square(10, 10, 6);
        save(
            &r.join(format!("carpet/test/hole/{i:03}.png")),
            &sample(30 + i, Some(&d)),
        );
    }
    std::fs::create_dir_all(r.join("empty/test/good")).unwrap();
    t
}

fn kinds(v: &Validated) -> Vec<(IssueKind, String, Option<String>)> {
    v.issues
        .iter()
        .map(|i| (i.kind, i.class.clone(), i.path.clone()))
        .collect()
}

fn validate_all(root: &Path, layout: Layout) -> Validated {
    let opened = dataset::open(root, None, layout).unwrap();
    dataset::validate(root, &opened, &ValidateOptions::default()).unwrap()
}

#[test]
fn mvtec_discovery_finds_items_and_every_issue() {
    let t = mvtec_tree();
    let root = t.path();
    let opened = dataset::discover(root, Layout::Auto).unwrap();
    assert_eq!(opened.origin, Origin::Discovered(Layout::Mvtec));
    let classes: Vec<&String> = opened.meta.test.keys().collect();
    assert_eq!(classes, ["bottle", "cable", "carpet", "empty"]);
    let bottle = &opened.meta.test["bottle"];
    assert_eq!(bottle.len(), 6);
    assert_eq!(bottle[0].img_path, "bottle/test/broken/000.png");
    assert_eq!(
        bottle[0].mask_path,
        "bottle/ground_truth/broken/000_mask.png"
    );
    assert_eq!(bottle[0].anomaly, 1);
    assert_eq!(bottle[0].specie_name, "broken");
    assert_eq!(bottle[2].mask_path, "", "002 has no mask");
    assert_eq!(bottle[3].img_path, "bottle/test/good/000.png");
    assert_eq!(bottle[3].anomaly, 0);
    assert_eq!(opened.meta.train["bottle"].len(), 1);

    let v = dataset::validate(root, &opened, &ValidateOptions::default()).unwrap();
    let k = kinds(&v);
    let expect = [
        (
            IssueKind::UnpairedMask,
            "bottle",
            Some("bottle/ground_truth/broken/009_mask.png"),
        ),
        (
            IssueKind::MissingMask,
            "bottle",
            Some("bottle/test/broken/002.png"),
        ),
        (
            IssueKind::MaskSizeMismatch,
            "cable",
            Some("cable/ground_truth/cut/000_mask.png"),
        ),
        (
            IssueKind::UnreadableImage,
            "cable",
            Some("cable/test/good/001.png"),
        ),
        (IssueKind::EmptyClass, "empty", None),
    ];
    assert_eq!(k.len(), expect.len(), "{:#?}", v.issues);
    for (kind, class, path) in expect {
        assert!(
            k.contains(&(kind, class.to_owned(), path.map(str::to_owned))),
            "missing {kind:?} {class} {path:?} in {k:#?}"
        );
    }
    let c = v.counts();
    assert_eq!((c.errors, c.warnings), (1, 4));
    assert_eq!(c.by_kind[&IssueKind::UnreadableImage], 1);
    assert_eq!(c.by_kind[&IssueKind::MissingMask], 1);

    let by = |n: &str| v.classes.iter().find(|c| c.name == n).unwrap();
    assert_eq!(by("bottle").items.len(), 6);
    assert!(by("bottle").has_masks);
    let b2 = &by("bottle").items[2];
    assert!(b2.anomalous && b2.mask.is_none() && !b2.has_pixel_truth());
    assert_eq!(by("cable").items.len(), 2);
    assert_eq!(by("cable").skipped, 1);
    assert!(
        by("cable").items[0].mask.is_some(),
        "mismatched mask is kept"
    );
    assert!(!by("carpet").has_masks, "image-only class");
    assert!(
        v.issues.iter().all(|i| i.class != "carpet"),
        "no warnings for image-only"
    );
    assert!(by("empty").items.is_empty());

    assert!(v.check(false).is_ok());
    let strict = v.check(true).unwrap_err().to_string();
    assert!(strict.contains("--strict") && strict.contains("1 errors and 4 warnings"));
}

#[test]
fn meta_json_round_trip_matches_the_official_format() {
    let t = mvtec_tree();
    let root = t.path();
    let written = dataset::write_meta(root, Layout::Mvtec).unwrap();
    assert_eq!(written.path, root.join(META_FILE));
    assert_eq!(written.layout, Layout::Mvtec);
    assert_eq!(written.test_images["bottle"], 6);
    assert_eq!(written.issues.len(), 1, "the unpaired mask");
    let text = std::fs::read_to_string(&written.path).unwrap();
    assert!(text.starts_with("{\n    \"train\": {"), "{text}");
    assert!(text.ends_with("}\n"));
    let first = text.find("\"img_path\"").unwrap();
    let order: Vec<usize> = [
        "img_path",
        "mask_path",
        "cls_name",
        "specie_name",
        "anomaly",
    ]
    .iter()
    .map(|k| text[first..].find(&format!("\"{k}\"")).unwrap())
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "field order");

    let read = dataset::read_meta(&written.path).unwrap();
    assert_eq!(read, dataset::discover(root, Layout::Mvtec).unwrap().meta);
    assert_eq!(read.to_json(), text);

    // auto prefers ROOT/meta.json
    let opened = dataset::open(root, None, Layout::Auto).unwrap();
    assert_eq!(opened.origin, Origin::MetaFile(root.join(META_FILE)));
    // an explicit layout ignores it
    let opened = dataset::open(root, None, Layout::Mvtec).unwrap();
    assert_eq!(opened.origin, Origin::Discovered(Layout::Mvtec));
}

#[test]
fn meta_with_wrong_paths_gives_per_item_issues() {
    let t = mvtec_tree();
    let root = t.path();
    let mut meta = dataset::discover(root, Layout::Mvtec).unwrap().meta;
    let bottle = meta.test.get_mut("bottle").unwrap();
    bottle[0].mask_path = "bottle/ground_truth/broken/nope_mask.png".into();
    bottle[1].img_path = "bottle/test/broken/does_not_exist.png".into();
    bottle[4].anomaly = 7;
    let path = root.join("custom.json");
    std::fs::write(&path, meta.to_json()).unwrap();

    let opened = dataset::open(root, Some(&path), Layout::Auto).unwrap();
    let v = dataset::validate(
        root,
        &opened,
        &ValidateOptions {
            classes: Some(vec!["bottle".into()]),
        },
    )
    .unwrap();
    assert_eq!(v.classes.len(), 1);
    let k = kinds(&v);
    assert!(k.contains(&(
        IssueKind::MissingMask,
        "bottle".into(),
        Some("bottle/test/broken/000.png".into())
    )));
    assert!(k.contains(&(
        IssueKind::MissingImage,
        "bottle".into(),
        Some("bottle/test/broken/does_not_exist.png".into())
    )));
    assert!(k.contains(&(
        IssueKind::BadLabel,
        "bottle".into(),
        Some("bottle/test/good/001.png".into())
    )));
    let c = v.counts();
    assert_eq!(c.errors, 2);
    assert_eq!(v.classes[0].items.len(), 4);
    assert_eq!(v.classes[0].skipped, 2);
    let msg = v
        .issues
        .iter()
        .find(|i| i.kind == IssueKind::MissingImage)
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("error: bottle: bottle/test/broken/does_not_exist.png:"),
        "{msg}"
    );
    assert_eq!(
        v.issues
            .iter()
            .find(|i| i.kind == IssueKind::MissingMask)
            .unwrap()
            .severity,
        Severity::Warning
    );

    // malformed meta.json and unknown classes are dataset-level errors
    std::fs::write(&path, "{\"test\": {\"x\": [{\"img_path\": 3}]}}").unwrap();
    let e = dataset::open(root, Some(&path), Layout::Auto).unwrap_err();
    assert!(e.to_string().contains("not a valid meta.json"), "{e}");
    let opened = dataset::open(root, None, Layout::Mvtec).unwrap();
    let e = dataset::validate(
        root,
        &opened,
        &ValidateOptions {
            classes: Some(vec!["bottel".into()]),
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("bottel") && e.to_string().contains("bottle"),
        "{e}"
    );
}

#[test]
fn sdd_layout_single_category() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("electrical commutators");
    save(&root.join("test/good/a.png"), &sample(1, None));
    save(&root.join("test/good/b.png"), &sample(2, None));
    let d = square(5, 5, 10);
    // masks beside the images (KolektorSDD style) and under ground_truth/
    save(&root.join("test/defect/c.png"), &sample(3, Some(&d)));
    save(&root.join("test/defect/c_label.png"), &mask_img(32, 32, &d));
    save(&root.join("test/defect/e.png"), &sample(5, Some(&d)));
    save(
        &root.join("ground_truth/defect/e_mask.png"),
        &mask_img(32, 32, &d),
    );

    let opened = dataset::discover(&root, Layout::Auto).unwrap();
    assert_eq!(opened.origin, Origin::Discovered(Layout::Sdd));
    let items = &opened.meta.test["electrical commutators"];
    let paths: Vec<(&str, &str)> = items
        .iter()
        .map(|i| (i.img_path.as_str(), i.mask_path.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            ("test/defect/c.png", "test/defect/c_label.png"),
            ("test/defect/e.png", "ground_truth/defect/e_mask.png"),
            ("test/good/a.png", ""),
            ("test/good/b.png", ""),
        ]
    );
    let v = validate_all(&root, Layout::Sdd);
    assert!(v.issues.is_empty(), "{:#?}", v.issues);
    assert_eq!(v.total_items(), 4);

    // The folder above is the official SDD tree (`ROOT/electrical commutators/…`, as SDD.py)
    let official = dataset::discover(t.path(), Layout::Sdd).unwrap();
    let items = &official.meta.test["electrical commutators"];
    assert_eq!(items.len(), 4);
    assert!(
        items[0]
            .img_path
            .starts_with("electrical commutators/test/")
    );

    // --layout sdd on an MVTec root says what it expected
    let mvtec = tempfile::tempdir().unwrap();
    save(
        &mvtec.path().join("bottle/test/good/a.png"),
        &sample(1, None),
    );
    let e = dataset::discover(mvtec.path(), Layout::Sdd).unwrap_err();
    assert!(e.to_string().contains("ROOT/test"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = dataset::discover(empty.path(), Layout::Auto).unwrap_err();
    assert!(e.to_string().contains("no dataset found"), "{e}");
}

#[test]
fn layout_names_parse() {
    assert_eq!("mvtec".parse::<Layout>().unwrap(), Layout::Mvtec);
    assert_eq!("SDD".parse::<Layout>().unwrap(), Layout::Sdd);
    assert_eq!("auto".parse::<Layout>().unwrap(), Layout::Auto);
    assert!("coco".parse::<Layout>().unwrap_err().contains("mvtec"));
    let m: Meta = serde_json::from_str(r#"{"test": {}}"#).unwrap();
    assert!(m.train.is_empty());
    let m: Meta = serde_json::from_str(
        r#"{"test": {"a": [{"img_path": "a/x.png", "mask_path": null, "cls_name": "a",
            "specie_name": "good", "anomaly": 0}]}}"#,
    )
    .unwrap();
    assert_eq!(m.test["a"][0].mask_path, "");
}

/// A deterministic fake engine: score = mean brightness; map = brightness resized to S×S.
fn fake_scorer(path: &Path) -> Result<(f32, Vec<f32>), String> {
    let img = image::open(path).map_err(|e| e.to_string())?.to_luma8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let small = nearest(img.as_raw(), w, h, S, S);
    let map: Vec<f32> = small.iter().map(|&v| v as f32 / 255.0).collect();
    let score = map.iter().sum::<f32>() / map.len() as f32;
    Ok((score, map))
}

fn options() -> EvalOptions {
    EvalOptions {
        map_size: S,
        progress: false,
        batch: 2,
        ..EvalOptions::default()
    }
}

#[test]
fn driver_reports_per_class_mean_and_issues() {
    let t = mvtec_tree();
    let root = t.path();
    let v = validate_all(root, Layout::Mvtec);
    let mut calls = 0;
    let mut scorer = |p: &Path| {
        calls += 1;
        fake_scorer(p)
    };
    let report = eval::evaluate(&v, &mut scorer, &nearest, &options()).unwrap();
    assert_eq!(calls, 6 + 2 + 4);
    let by = |n: &str| report.classes.iter().find(|c| c.name == n).unwrap();

    let bottle = by("bottle");
    assert_eq!((bottle.images, bottle.normal, bottle.anomalous), (6, 3, 3));
    assert_eq!(bottle.pixel_images, 5, "002 has no mask");
    assert_eq!(bottle.regions, 2);
    assert_eq!(bottle.image_auroc, Metric::Defined(1.0));
    assert!(matches!(bottle.pixel_auroc, Metric::Defined(v) if v > 0.99));
    assert!(matches!(bottle.aupro, Metric::Defined(_)));

    // the driver's pixel metrics are the metrics of the same maps and masks
    let items = &v.classes.iter().find(|c| c.name == "bottle").unwrap().items;
    let mut maps = Vec::new();
    let mut masks = Vec::new();
    for it in items.iter().filter(|i| i.has_pixel_truth()) {
        maps.push(fake_scorer(&it.image).unwrap().1);
        masks.push(match &it.mask {
            Some(m) => eval::mask::load_mask(m, S, &nearest).unwrap(),
            None => vec![false; S * S],
        });
    }
    let mr: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
    let kr: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
    assert_eq!(
        metrics::pixel_auroc(&mr, &kr, S, S).unwrap(),
        bottle.pixel_auroc
    );
    assert_eq!(metrics::aupro(&mr, &kr, S, S).unwrap(), bottle.aupro);

    let carpet = by("carpet");
    assert_eq!(carpet.image_auroc, Metric::Defined(1.0));
    assert_eq!(carpet.pixel_auroc, Metric::Undefined(Undefined::NoMasks));
    assert_eq!(carpet.aupro, Metric::Undefined(Undefined::NoMasks));
    let empty = by("empty");
    assert_eq!(empty.images, 0);
    assert_eq!(empty.image_auroc, Metric::Undefined(Undefined::NoSamples));
    assert_eq!(by("cable").skipped, 1);

    // means: undefined excluded, classes counted
    assert_eq!(report.mean.image_auroc.classes, 3);
    assert_eq!(report.mean.pixel_auroc.classes, 2);
    let (m, n) = metrics::mean_defined([bottle.pixel_auroc, by("cable").pixel_auroc]);
    assert_eq!(
        (
            report.mean.pixel_auroc.value,
            report.mean.pixel_auroc.classes
        ),
        (m, n)
    );
    assert_eq!(
        (report.issue_counts.errors, report.issue_counts.warnings),
        (1, 4)
    );

    let table = report.table();
    assert!(table.contains("n/a"), "{table}");
    assert!(table.contains("classes averaged"), "{table}");
    assert!(
        table.contains("n/a carpet: pixel_auroc, aupro (no masks)"),
        "{table}"
    );
    assert!(!table.contains("NaN"));
    let csv = report.to_csv();
    assert!(csv.starts_with("class,images,normal,anomalous,"));
    assert!(csv.contains("\ncarpet,4,2,2,0,0,0,1,1,n/a,n/a,"), "{csv}");
    assert!(
        csv.contains("\nclasses_averaged,,,,,,,3,3,2,2,3,3,3,3\n"),
        "{csv}"
    );
    let json = report.to_json();
    assert!(!json.contains("NaN"));
    assert!(json.contains("\"undefined\": \"no_masks\""), "{json}");
    let back: eval::EvalReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.classes, report.classes);
}

#[test]
fn driver_output_is_identical_across_runs_and_thread_counts() {
    let t = mvtec_tree();
    let root = t.path();
    let v = validate_all(root, Layout::Mvtec);
    let run = |threads: usize, batch: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let opts = EvalOptions { batch, ..options() };
            let r = eval::evaluate(&v, &mut fake_scorer, &nearest, &opts).unwrap();
            (r.to_json(), r.to_csv())
        })
    };
    let first = run(1, 1);
    for (threads, batch) in [(1, 1), (2, 3), (4, 16)] {
        assert_eq!(
            run(threads, batch),
            first,
            "threads={threads} batch={batch}"
        );
    }
}

/// A scorer that batches: records the group sizes it is handed; fails one image inside a group.
struct Batching {
    groups: Vec<usize>,
}

impl eval::Scorer for Batching {
    fn score(&mut self, _: &Path) -> eval::ScoreResult {
        panic!("the driver must go through score_batch");
    }

    fn score_batch(&mut self, images: &[&Path]) -> Vec<eval::ScoreResult> {
        self.groups.push(images.len());
        images
            .iter()
            .map(|p| {
                if p.ends_with("bottle/test/good/001.png") {
                    Err("decoder: truncated".to_owned())
                } else {
                    fake_scorer(p)
                }
            })
            .collect()
    }
}

#[test]
fn driver_hands_images_over_in_groups_and_results_do_not_depend_on_them() {
    let t = mvtec_tree();
    let v = validate_all(t.path(), Layout::Mvtec);
    let run = |per_call: usize| {
        let mut s = Batching { groups: Vec::new() };
        let opts = EvalOptions {
            images_per_call: per_call,
            ..options()
        };
        let r = eval::evaluate(&v, &mut s, &nearest, &opts).unwrap();
        (r.to_json(), r.to_csv(), s.groups)
    };
    let (json1, csv1, groups1) = run(1);
    assert_eq!(
        groups1,
        vec![1; 12],
        "bottle 6, cable 2 (001 unreadable), carpet 4"
    );
    for per_call in [2, 4, 64] {
        let (json, csv, groups) = run(per_call);
        assert_eq!((&json, &csv), (&json1, &csv1), "images_per_call={per_call}");
        // Groups never span two classes.
        let want: Vec<usize> = [6, 2, 4]
            .iter()
            .flat_map(|&n: &usize| {
                (0..n.div_ceil(per_call)).map(move |k| per_call.min(n - k * per_call))
            })
            .collect();
        assert_eq!(groups, want, "images_per_call={per_call}");
    }
    assert!(
        json1.contains("\"score_failed\""),
        "the failure inside a group is counted"
    );

    // A scorer returning the wrong number of results is a bug that stops the run.
    let mut short = |_: &Path| -> eval::ScoreResult { unreachable!() };
    struct Short<'a, F>(&'a mut F);
    impl<F: FnMut(&Path) -> eval::ScoreResult> eval::Scorer for Short<'_, F> {
        fn score(&mut self, p: &Path) -> eval::ScoreResult {
            (self.0)(p)
        }
        fn score_batch(&mut self, _: &[&Path]) -> Vec<eval::ScoreResult> {
            Vec::new()
        }
    }
    let e = eval::evaluate(&v, &mut Short(&mut short), &nearest, &options()).unwrap_err();
    assert!(
        matches!(
            e,
            EvalError::BatchSize {
                got: 0,
                expected: 1
            }
        ),
        "{e}"
    );
}

#[test]
fn driver_counts_scorer_failures_and_strict_stops() {
    let t = mvtec_tree();
    let root = t.path();
    let v = validate_all(root, Layout::Mvtec);
    let mut failing = |p: &Path| {
        if p.ends_with("bottle/test/good/001.png") {
            Err("decoder: truncated".to_owned())
        } else {
            fake_scorer(p)
        }
    };
    let r = eval::evaluate(&v, &mut failing, &nearest, &options()).unwrap();
    let bottle = r.classes.iter().find(|c| c.name == "bottle").unwrap();
    assert_eq!((bottle.images, bottle.skipped), (5, 1));
    assert_eq!(r.issue_counts.by_kind[&IssueKind::ScoreFailed], 1);
    assert_eq!(r.issue_counts.errors, 2);

    // strict: validation issues stop before any scoring
    let mut calls = 0;
    let mut counting = |p: &Path| {
        calls += 1;
        fake_scorer(p)
    };
    let opts = EvalOptions {
        strict: true,
        ..options()
    };
    let e = eval::evaluate(&v, &mut counting, &nearest, &opts).unwrap_err();
    assert!(matches!(e, EvalError::Dataset(_)), "{e}");
    assert_eq!(calls, 0);

    // strict on a clean class: a runtime failure stops the run
    let clean = dataset::validate(
        root,
        &dataset::open(root, None, Layout::Mvtec).unwrap(),
        &ValidateOptions {
            classes: Some(vec!["carpet".into()]),
        },
    )
    .unwrap();
    assert!(clean.issues.is_empty());
    let mut fail_all = |_: &Path| -> Result<(f32, Vec<f32>), String> { Err("boom".into()) };
    let e = eval::evaluate(&clean, &mut fail_all, &nearest, &opts).unwrap_err();
    assert!(
        matches!(&e, EvalError::Strict(m) if m.contains("boom")),
        "{e}"
    );

    // engine bugs stop the run: wrong map size, NaN
    let mut small = |_: &Path| -> Result<(f32, Vec<f32>), String> { Ok((0.5, vec![0.0; 3])) };
    let e = eval::evaluate(&clean, &mut small, &nearest, &options()).unwrap_err();
    assert!(matches!(e, EvalError::MapSize { got: 3, .. }), "{e}");
    let mut nan =
        |_: &Path| -> Result<(f32, Vec<f32>), String> { Ok((f32::NAN, vec![0.0; S * S])) };
    let e = eval::evaluate(&clean, &mut nan, &nearest, &options()).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
}

#[test]
fn run_request_and_map_dump() {
    let t = mvtec_tree();
    let root = t.path();
    let dump = tempfile::tempdir().unwrap();
    let req = EvalRequest {
        root: root.to_owned(),
        meta: None,
        layout: Layout::Auto,
        classes: Some(vec!["bottle".into()]),
        options: EvalOptions {
            dump_maps: Some(dump.path().to_owned()),
            ..options()
        },
    };
    let r = eval::run(&req, &mut fake_scorer, &nearest).unwrap();
    assert_eq!(r.classes.len(), 1);
    assert!(r.source.starts_with("layout:mvtec"));
    let f: PathBuf = dump.path().join("bottle/test/broken/001.png.f32");
    let bytes = std::fs::read(&f).unwrap();
    assert_eq!(bytes.len(), S * S * 4);
    let map: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        map,
        fake_scorer(&root.join("bottle/test/broken/001.png"))
            .unwrap()
            .1
    );
    let index = std::fs::read_to_string(dump.path().join("index.csv")).unwrap();
    assert_eq!(index.lines().count(), 1 + 6);
    assert!(index.contains("bottle,bottle/test/broken/001.png,1,"));

    // report files
    let out = tempfile::tempdir().unwrap();
    r.write_json(&out.path().join("r.json")).unwrap();
    r.write_csv(&out.path().join("r.csv")).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.path().join("r.json")).unwrap(),
        r.to_json()
    );
}

#[test]
fn rgb_and_palette_masks_binarise_like_pillow() {
    let t = tempfile::tempdir().unwrap();
    // RGB (1,0,0) is 0 in Pillow's "L"; (0,1,0) is 1.
    let mut img = image::RgbImage::new(4, 1);
    img.put_pixel(0, 0, image::Rgb([1, 0, 0]));
    img.put_pixel(1, 0, image::Rgb([0, 1, 0]));
    img.put_pixel(2, 0, image::Rgb([255, 255, 255]));
    let p = t.path().join("m.png");
    img.save(&p).unwrap();
    let dynimg = image::open(&p).unwrap();
    let (bin, w, h) = eval::mask::binarise(&dynimg);
    assert_eq!((w, h), (4, 1));
    assert_eq!(bin, vec![0, 255, 255, 0]);
    let e = eval::mask::load_mask(&t.path().join("nope.png"), 4, &nearest).unwrap_err();
    assert!(e.to_string().contains("cannot read mask"), "{e}");
}

#[test]
fn btad_style_ok_ko_with_same_stem_masks() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let d = square(3, 3, 9);
    save(&r.join("01/test/ok/0000.bmp"), &sample(1, None));
    save(&r.join("01/test/ko/0001.bmp"), &sample(2, Some(&d)));
    save(
        &r.join("01/ground_truth/ko/0001.png"),
        &mask_img(32, 32, &d),
    );
    let opened = dataset::discover(r, Layout::Auto).unwrap();
    let items = &opened.meta.test["01"];
    assert_eq!(items[0].img_path, "01/test/ko/0001.bmp");
    assert_eq!(items[0].mask_path, "01/ground_truth/ko/0001.png");
    assert_eq!(items[0].anomaly, 1);
    assert_eq!(items[1].anomaly, 0, "`ok` is normal");
    let v = validate_all(r, Layout::Mvtec);
    assert!(v.issues.is_empty(), "{:#?}", v.issues);
    let report = eval::evaluate(&v, &mut fake_scorer, &nearest, &options()).unwrap();
    assert_eq!(report.classes[0].regions, 1);
    assert_eq!(report.classes[0].pixel_images, 2);
}
