#!/usr/bin/env python3
"""Reference values for the `eval` metrics, on synthetic data.

Writes tests/fixtures/metrics/: `cases.json` (image-level cases inline; pixel-level cases with
their expected values) and, per pixel case, `<name>.maps.f32` (raw little-endian float32,
[images, height, width]) and `<name>.masks.u8` (0/1 bytes, same shape).

References:
- image AUROC / AP and pixel AUROC: scikit-learn (`roc_auc_score`, `average_precision_score`);
- AUPRO: an implementation written here from the protocol text (numpy + scipy.ndimage.label with
  the 8-connectivity structure), independent of the Rust code:
    min/max over the class's maps; delta = (max - min) / 200; th_k = min + k * delta, k = 0..199
    (float64); pred = map > th_k; PRO(th) = mean over all 8-connected regions of all masks of
    |pred & region| / |region|; FPR(th) = |pred & ~mask| / |~mask|; keep FPR < 0.3; rescale the kept
    FPRs min-max to [0, 1]; area with sklearn.metrics.auc.
Undefined metrics (single-class labels, no region, no normal pixel, degenerate FPR) are `null`.

Usage: python engines/make_metric_fixtures.py [OUT_DIR]   (deterministic: fixed seeds)
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

STEPS = 200
MAX_FPR = 0.3
EIGHT = np.ones((3, 3), dtype=bool)


def f32_list(a):
    """float32 values as exact float64 numbers (JSON round-trips them bit-exactly)."""
    return [float(v) for v in np.asarray(a, dtype=np.float32)]


def image_refs(labels, scores):
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32).astype(np.float64)
    both = 0 < labels.sum() < len(labels)
    auroc = float(roc_auc_score(labels, scores)) if both else None
    ap = float(average_precision_score(labels, scores)) if labels.sum() > 0 else None
    return auroc, ap


def aupro_ref(maps, masks):
    """AUPRO from the protocol text; None when undefined."""
    maps = maps.astype(np.float64)
    masks = masks.astype(bool)
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=EIGHT)
        for r in range(1, n + 1):
            regions.append((i, lab == r))
    normal = ~masks
    n_normal = int(normal.sum())
    if not regions or n_normal == 0:
        return None, len(regions)
    lo, hi = float(maps.min()), float(maps.max())
    if hi <= lo:
        return None, len(regions)
    delta = (hi - lo) / STEPS
    pros, fprs = [], []
    for k in range(STEPS):
        th = lo + k * delta
        pred = maps > th
        overlaps = [pred[i][reg].sum() / reg.sum() for i, reg in regions]
        pros.append(float(np.mean(overlaps)))
        fprs.append(np.logical_and(pred, normal).sum() / n_normal)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < MAX_FPR
    if keep.sum() < 2:
        return None, len(regions)
    f = fprs[keep]
    if f.max() == f.min():
        return None, len(regions)
    x = (f - f.min()) / (f.max() - f.min())
    return float(auc(x, pros[keep])), len(regions)


def pixel_refs(maps, masks):
    y = masks.astype(np.int64).ravel()
    s = maps.astype(np.float64).ravel()
    both = 0 < y.sum() < len(y)
    pauroc = float(roc_auc_score(y, s)) if both else None
    pro, n_regions = aupro_ref(maps, masks)
    return pauroc, pro, n_regions


# ---------------------------------------------------------------- image-level cases


def image_cases(rng):
    cases = []
    n = 240
    labels = (rng.random(n) < 0.4).astype(int)
    scores = np.round(rng.random(n) * 20) / 20 + 0.15 * labels  # 0.05 steps: many ties
    cases.append(("ties_quantised", labels, scores))
    labels = (rng.random(n) < 0.3).astype(int)
    scores = rng.normal(size=n) + 0.8 * labels
    cases.append(("continuous", labels, scores))
    labels = (rng.random(57) < 0.5).astype(int)
    scores = 1.0 / (1.0 + np.exp(-rng.normal(size=57) * 3 - labels))
    cases.append(("sigmoid_scores", labels, scores))
    cases.append(("all_normal", np.zeros(12, int), rng.random(12)))
    cases.append(("all_anomalous", np.ones(9, int), rng.random(9)))
    cases.append(("all_tied", np.array([0, 1, 1, 0, 0, 1, 0]), np.full(7, 0.25)))
    cases.append(("perfect", np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4, 0.9])))
    cases.append(("inverted", np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4])))
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    scores = np.array([0.5, 0.5, 0.2, 0.9, 0.2, 0.9, 0.5, 0.0])
    cases.append(("ties_across_labels", labels, scores))
    labels = (rng.random(100) < 0.5).astype(int)
    scores = np.where(rng.random(100) < 0.5, -0.0, 0.0) + labels * (rng.random(100) < 0.3)
    cases.append(("signed_zeros", labels, scores))
    out = []
    for name, labels, scores in cases:
        scores = np.asarray(scores, dtype=np.float32)
        auroc, ap = image_refs(labels, scores)
        out.append(
            dict(
                name=name,
                labels=[int(v) for v in labels],
                scores=f32_list(scores),
                auroc=auroc,
                ap=ap,
            )
        )
    return out


# ---------------------------------------------------------------- pixel-level cases


def disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def blob_masks(rng, n, h, w):
    """Masks with several blobs; image 0 is normal (empty); image 1 has two blobs touching
    only diagonally (one region under 8-connectivity); others random disks/rectangles."""
    masks = np.zeros((n, h, w), dtype=bool)
    # image 1: diagonal touch + a separate blob + a single-pixel region
    masks[1, 10:16, 10:16] = True
    masks[1, 16:22, 16:22] = True  # touches (15,15)-(16,16) diagonally only
    masks[1, 40:44, 5:12] = True
    masks[1, h - 1, w - 1] = True
    for i in range(2, n):
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                masks[i] |= disk(h, w, rng.integers(0, h), rng.integers(0, w), rng.integers(2, 8))
            else:
                y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                masks[i, y : y + rng.integers(2, 10), x : x + rng.integers(2, 10)] = True
    return masks


def smooth_maps(rng, masks, strength=0.6):
    n, h, w = masks.shape
    noise = rng.normal(size=(n, h, w))
    base = np.stack([ndimage.gaussian_filter(x, 2.0) for x in noise]) * 4.0
    signal = np.stack([ndimage.gaussian_filter(m.astype(float), 1.5) for m in masks])
    logits = base + strength * 2.0 * signal - 1.0
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def pixel_cases(rng):
    cases = []
    masks = blob_masks(rng, 8, 64, 64)
    cases.append(("blobs", smooth_maps(rng, masks), masks))

    maps = np.round(smooth_maps(rng, masks, 0.4) * 16) / 16  # heavy ties
    cases.append(("ties_quantised", maps.astype(np.float32), masks))

    masks2 = blob_masks(rng, 10, 96, 80)
    cases.append(("many_regions", smooth_maps(rng, masks2, 0.3), masks2))

    # values over many binades, exact zeros, negatives (not probabilities: generality)
    m3 = blob_masks(rng, 6, 48, 48)
    raw = smooth_maps(rng, m3, 0.5).astype(np.float64)
    wide = np.exp(-30.0 * (1.0 - raw)) - 1e-6
    wide[:, :3, :] = 0.0
    cases.append(("wide_range_signed", wide.astype(np.float32), m3))

    z = np.zeros((4, 32, 32), dtype=bool)
    cases.append(("all_normal_pixels", smooth_maps(rng, z), z))
    o = np.ones((3, 32, 32), dtype=bool)
    cases.append(("all_anomalous_pixels", smooth_maps(rng, o), o))

    # perfect separation with constant normal pixels: FPR is 0 at every threshold
    d = blob_masks(rng, 4, 32, 32)
    cases.append(("degenerate_fpr", d.astype(np.float32), d))

    # constant maps: AUROC 0.5, AUPRO undefined (no threshold range)
    c = blob_masks(rng, 3, 32, 32)
    cases.append(("constant_maps", np.full(c.shape, 0.5, dtype=np.float32), c))
    return cases


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/fixtures/metrics")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240711)
    doc = dict(
        generator="engines/make_metric_fixtures.py",
        references="sklearn roc_auc_score / average_precision_score; AUPRO from the protocol "
        "text with numpy + scipy.ndimage.label (8-connectivity)",
        image_cases=image_cases(rng),
        pixel_cases=[],
    )
    for name, maps, masks in pixel_cases(rng):
        maps = np.ascontiguousarray(maps, dtype="<f4")
        masks = np.ascontiguousarray(masks, dtype=np.uint8)
        n, h, w = maps.shape
        pauroc, pro, n_regions = pixel_refs(maps, masks.astype(bool))
        (out / f"{name}.maps.f32").write_bytes(maps.tobytes())
        (out / f"{name}.masks.u8").write_bytes(masks.tobytes())
        doc["pixel_cases"].append(
            dict(
                name=name,
                images=n,
                height=h,
                width=w,
                maps=f"{name}.maps.f32",
                masks=f"{name}.masks.u8",
                regions=n_regions,
                pixel_auroc=pauroc,
                aupro=pro,
            )
        )
        print(f"{name}: {n}x{h}x{w} regions={n_regions} pixel_auroc={pauroc} aupro={pro}")
    for c in doc["image_cases"]:
        print(f"image {c['name']}: auroc={c['auroc']} ap={c['ap']}")
    (out / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
