//! Metric implementations against independent references on synthetic data: scikit-learn for
//! image AUROC/AP and pixel AUROC, and an AUPRO written from the protocol text with numpy/scipy
//! (fixtures from `engines/make_metric_fixtures.py`). Also: undefined cases, determinism across
//! thread counts and batchings, bounded memory of the pixel state.

use std::path::PathBuf;

use anomalyclip_edge::eval::metrics::{
    Metric, PixelAccumulator, PixelMetrics, Undefined, aupro, average_precision, image_auroc,
    mean_defined, pixel_auroc,
};
use serde::Deserialize;

const TOL_AUC: f64 = 1e-6;
const TOL_PRO: f64 = 1e-4;

#[derive(Deserialize)]
struct Doc {
    image_cases: Vec<ImageCase>,
    pixel_cases: Vec<PixelCase>,
}

#[derive(Deserialize)]
struct ImageCase {
    name: String,
    labels: Vec<u8>,
    scores: Vec<f64>,
    auroc: Option<f64>,
    ap: Option<f64>,
}

#[derive(Deserialize)]
struct PixelCase {
    name: String,
    images: usize,
    height: usize,
    width: usize,
    maps: String,
    masks: String,
    regions: usize,
    pixel_auroc: Option<f64>,
    aupro: Option<f64>,
}

struct PixelData {
    case: PixelCase,
    maps: Vec<Vec<f32>>,
    masks: Vec<Vec<bool>>,
}

impl PixelData {
    fn pairs(&self) -> Vec<(&[f32], &[bool])> {
        self.maps
            .iter()
            .map(Vec::as_slice)
            .zip(self.masks.iter().map(Vec::as_slice))
            .collect()
    }

    fn accumulate(&self, chunk: usize) -> PixelMetrics {
        let mut acc = PixelAccumulator::new(self.case.width, self.case.height);
        for c in self.pairs().chunks(chunk) {
            acc.add_images(c).unwrap();
        }
        acc.finish()
    }
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics")
}

fn doc() -> Doc {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(case: PixelCase) -> PixelData {
    let px = case.width * case.height;
    let raw = std::fs::read(dir().join(&case.maps)).unwrap();
    assert_eq!(raw.len(), case.images * px * 4, "{}", case.name);
    let flat: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mraw = std::fs::read(dir().join(&case.masks)).unwrap();
    assert_eq!(mraw.len(), case.images * px, "{}", case.name);
    PixelData {
        maps: flat.chunks(px).map(<[f32]>::to_vec).collect(),
        masks: mraw
            .chunks(px)
            .map(|m| m.iter().map(|&v| v != 0).collect())
            .collect(),
        case,
    }
}

fn pixel_data() -> Vec<PixelData> {
    doc().pixel_cases.into_iter().map(load).collect()
}

fn assert_close(name: &str, what: &str, got: Metric, want: Option<f64>, tol: f64) {
    match (got, want) {
        (Metric::Defined(g), Some(w)) => {
            assert!(
                (g - w).abs() <= tol,
                "{name} {what}: got {g}, reference {w}, |Δ| = {:e} > {tol:e}",
                (g - w).abs()
            );
        }
        (Metric::Undefined(_), None) => {}
        (g, w) => panic!("{name} {what}: got {g:?}, reference {w:?}"),
    }
}

#[test]
fn image_auroc_and_ap_match_sklearn() {
    let d = doc();
    assert!(d.image_cases.len() >= 8);
    for c in &d.image_cases {
        let labels: Vec<bool> = c.labels.iter().map(|&l| l == 1).collect();
        let scores: Vec<f32> = c.scores.iter().map(|&s| s as f32).collect();
        // The JSON holds float32 values (serde_json's fast float parser may be 1 f64-ulp off;
        // the cast to f32 recovers the exact value).
        assert!(
            c.scores
                .iter()
                .zip(&scores)
                .all(|(&a, &b)| (a - b as f64).abs() <= a.abs() * 1e-15)
        );
        assert_close(
            &c.name,
            "auroc",
            image_auroc(&labels, &scores).unwrap(),
            c.auroc,
            TOL_AUC,
        );
        assert_close(
            &c.name,
            "ap",
            average_precision(&labels, &scores).unwrap(),
            c.ap,
            TOL_AUC,
        );
    }
}

#[test]
fn pixel_auroc_matches_sklearn_and_aupro_matches_reference() {
    for d in pixel_data() {
        let c = &d.case;
        let m = d.accumulate(3);
        assert_eq!(m.regions, c.regions, "{}: 8-connected regions", c.name);
        assert_eq!(m.images, c.images);
        assert_close(
            &c.name,
            "pixel_auroc",
            m.pixel_auroc,
            c.pixel_auroc,
            TOL_AUC,
        );
        assert_close(&c.name, "aupro", m.aupro, c.aupro, TOL_PRO);
        // The convenience functions agree with the accumulator.
        let maps: Vec<&[f32]> = d.maps.iter().map(Vec::as_slice).collect();
        let masks: Vec<&[bool]> = d.masks.iter().map(Vec::as_slice).collect();
        assert_eq!(
            pixel_auroc(&maps, &masks, c.width, c.height).unwrap(),
            m.pixel_auroc
        );
        assert_eq!(aupro(&maps, &masks, c.width, c.height).unwrap(), m.aupro);
    }
}

#[test]
fn aupro_is_much_tighter_than_its_tolerance() {
    // The reference follows the same arithmetic, so the agreement should be near f64 rounding.
    for d in pixel_data() {
        if let (Metric::Defined(g), Some(w)) = (d.accumulate(8).aupro, d.case.aupro) {
            assert!((g - w).abs() < 1e-12, "{}: {g} vs {w}", d.case.name);
        }
    }
}

#[test]
fn undefined_cases_say_why() {
    let d = doc();
    let get = |name: &str| d.image_cases.iter().find(|c| c.name == name).unwrap();
    let run = |c: &ImageCase| {
        let labels: Vec<bool> = c.labels.iter().map(|&l| l == 1).collect();
        let scores: Vec<f32> = c.scores.iter().map(|&s| s as f32).collect();
        (
            image_auroc(&labels, &scores).unwrap(),
            average_precision(&labels, &scores).unwrap(),
        )
    };
    let (auroc, ap) = run(get("all_normal"));
    assert_eq!(auroc, Metric::Undefined(Undefined::NoAnomalous));
    assert_eq!(ap, Metric::Undefined(Undefined::NoAnomalous));
    let (auroc, ap) = run(get("all_anomalous"));
    assert_eq!(auroc, Metric::Undefined(Undefined::NoNormal));
    assert_eq!(ap, Metric::Defined(1.0), "scikit-learn gives 1.0");

    let px = pixel_data();
    let get = |name: &str| {
        px.iter()
            .find(|p| p.case.name == name)
            .unwrap()
            .accumulate(4)
    };
    let m = get("all_normal_pixels");
    assert_eq!(m.pixel_auroc, Metric::Undefined(Undefined::NoAnomalous));
    assert_eq!(m.aupro, Metric::Undefined(Undefined::NoAnomalous));
    let m = get("all_anomalous_pixels");
    assert_eq!(m.pixel_auroc, Metric::Undefined(Undefined::NoNormal));
    assert_eq!(m.aupro, Metric::Undefined(Undefined::NoNormal));
    let m = get("degenerate_fpr");
    assert_eq!(m.pixel_auroc, Metric::Defined(1.0));
    assert_eq!(m.aupro, Metric::Undefined(Undefined::DegenerateFpr));
    let m = get("constant_maps");
    assert_eq!(m.pixel_auroc, Metric::Defined(0.5));
    assert_eq!(m.aupro, Metric::Undefined(Undefined::DegenerateFpr));

    let empty = PixelAccumulator::new(4, 4).finish();
    assert_eq!(empty.pixel_auroc, Metric::Undefined(Undefined::NoSamples));
    assert_eq!(empty.aupro, Metric::Undefined(Undefined::NoSamples));
}

#[test]
fn mean_skips_undefined_and_counts_classes() {
    let (mean, n) = mean_defined([
        Metric::Defined(0.5),
        Metric::Undefined(Undefined::NoNormal),
        Metric::Defined(1.0),
    ]);
    assert_eq!((mean, n), (Some(0.75), 2));
    assert_eq!(
        mean_defined([Metric::Undefined(Undefined::NoMasks)]),
        (None, 0)
    );
}

#[test]
fn results_are_bit_identical_across_thread_counts_and_batchings() {
    let data = pixel_data();
    let run_all = |chunk: usize| -> Vec<(u64, u64)> {
        data.iter()
            .map(|d| {
                let m = d.accumulate(chunk);
                let bits = |x: Metric| x.value().map_or(u64::MAX, f64::to_bits);
                (bits(m.pixel_auroc), bits(m.aupro))
            })
            .collect()
    };
    let reference = run_all(1);
    for threads in [1, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for chunk in [1, 2, 5, 64] {
            let got = pool.install(|| run_all(chunk));
            assert_eq!(got, reference, "threads={threads} chunk={chunk}");
        }
    }
    // One-by-one streaming equals batched.
    for d in &data {
        let mut acc = PixelAccumulator::new(d.case.width, d.case.height);
        for (map, mask) in d.pairs() {
            acc.add_image(map, mask).unwrap();
        }
        let a = acc.finish();
        let b = d.accumulate(7);
        assert_eq!(a.pixel_auroc, b.pixel_auroc);
        assert_eq!(a.aupro, b.aupro);
    }
}

#[test]
fn image_metrics_do_not_depend_on_input_order() {
    let d = doc();
    let c = d
        .image_cases
        .iter()
        .find(|c| c.name == "continuous")
        .unwrap();
    let labels: Vec<bool> = c.labels.iter().map(|&l| l == 1).collect();
    let scores: Vec<f32> = c.scores.iter().map(|&s| s as f32).collect();
    let mut idx: Vec<usize> = (0..labels.len()).collect();
    idx.reverse();
    idx.rotate_left(17);
    let l2: Vec<bool> = idx.iter().map(|&i| labels[i]).collect();
    let s2: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
    assert_eq!(
        image_auroc(&labels, &scores).unwrap(),
        image_auroc(&l2, &s2).unwrap()
    );
    assert_eq!(
        average_precision(&labels, &scores).unwrap(),
        average_precision(&l2, &s2).unwrap()
    );
}

#[test]
fn pixel_state_is_bounded_by_distinct_values_not_by_images() {
    // 24 maps of 518² (6.4 M pixels) with values on a 1/1024 grid: the exact histogram holds
    // one page per 1024 distinct values touched, so it stays tiny however many images come.
    let s = 518;
    let mut acc = PixelAccumulator::new(s, s);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut after_first = 0;
    for i in 0..24 {
        let map: Vec<f32> = (0..s * s)
            .map(|_| (next() % 1024) as f32 / 1024.0)
            .collect();
        let mut mask = vec![false; s * s];
        if i % 2 == 1 {
            for y in 100..140 {
                for x in 200..260 {
                    mask[y * s + x] = true;
                }
            }
        }
        acc.add_image(&map, &mask).unwrap();
        if i == 1 {
            after_first = acc.memory_bytes();
        }
    }
    let region_bytes = 12 * 40 * 60 * 4;
    let m = acc.finish();
    assert!(matches!(m.pixel_auroc, Metric::Defined(v) if (v - 0.5).abs() < 0.01));
    assert!(
        acc.memory_bytes() - after_first <= region_bytes,
        "histogram grew with images: {} → {}",
        after_first,
        acc.memory_bytes()
    );
    assert!(acc.memory_bytes() < 8 << 20, "{} bytes", acc.memory_bytes());
}
