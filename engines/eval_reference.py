#!/usr/bin/env python3
"""Python references for `anomalyclip-edge eval`: the metrics, and the whole pipeline.

Two modes, one JSON object on stdout (per class: images, anomalous, pixel_images, regions,
image_auroc, image_ap, pixel_auroc, aupro; `mean` over the classes where a metric is defined;
undefined metrics are null):

  eval_reference.py maps --dump DIR --data ROOT
      Recomputes the metrics from the maps `eval --dump-maps DIR` wrote (DIR/index.csv: class,
      img_path, anomalous, score, map_file, width, height, mask_path), the masks under ROOT and
      the labels. Used by tests/eval_cli.rs to check the report's numbers.

  eval_reference.py pipeline --data ROOT --model PACKAGE [--layout auto|mvtec|sdd]
      The full reference pipeline on a folder tree, the way AnomalyCLIP's test script runs it:
      Pillow preprocessing, the PyTorch reference encoder (engines/anomalyclip_ref.py), the
      softmax head with F.interpolate and scipy's gaussian_filter, batch 1, then the metrics
      below. PACKAGE must be a random-weight package (`export.py --tiny` / `--random-full`): its
      source files are regenerated from the seed in its manifest and checked against the
      manifest's SHA-256. Adds `timing` (setup and evaluation seconds, images/s). Used by
      scripts/bench-eval for the throughput comparison.

  eval_reference.py synth --out ROOT [--classes 3] [--images 40] [--size 256] [--seed 0]
      Writes a synthetic MVTec-style tree (RGB PNG textures; half `good`, half with elliptic
      defects of two types, masks `ground_truth/<defect>/<stem>_mask.png`). For the benchmark.

Metrics (the paper's evaluation protocol, as the README's "Evaluating on a dataset" states it,
written here independently of the Rust code):
- image AUROC / AP: scikit-learn `roc_auc_score` / `average_precision_score` on the float32
  scores (AUROC needs both labels, AP at least one anomalous image);
- masks as the official loader: Pillow `convert("L")`, `> 0` to 255, `resize((S, S), BILINEAR)`,
  `/ 255 > 0.5`; normal images have all-zero truth; anomalous images without a mask are left out
  of the pixel metrics; a class without any mask has no pixel metrics;
- pixel AUROC: `roc_auc_score` over every pixel of the class;
- AUPRO: thresholds th_k = min + k (max - min) / 200, k = 0..199, over the class's maps in float64;
  pred = map > th_k; PRO = mean over the 8-connected regions (scipy.ndimage.label) of all masks of
  |pred & region| / |region|; FPR = |pred & normal| / |normal|; the points with FPR < 0.3 are
  kept, their FPRs rescaled min-max to [0, 1], area by `sklearn.metrics.auc`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

STEPS = 200
MAX_FPR = 0.3
EIGHT = np.ones((3, 3), dtype=bool)
NORMAL_SPECIES = ("good", "ok")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro",
           "map_max_auroc", "map_max_ap", "blend_auroc", "blend_ap")


# ------------------------------------------------------------------------------------ metrics


def load_truth(path: Path, size: int) -> np.ndarray:
    """A mask file as the official loader sees it: [size, size] bool."""
    with Image.open(path) as image:
        binary = (np.asarray(image.convert("L")) > 0).astype(np.uint8) * 255
    resized = Image.fromarray(binary).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / np.float32(255.0) > 0.5


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    labels = labels.astype(np.int64)
    scores = scores.astype(np.float32).astype(np.float64)
    n_anom = int(labels.sum())
    auroc = float(roc_auc_score(labels, scores)) if 0 < n_anom < len(labels) else None
    ap = float(average_precision_score(labels, scores)) if n_anom > 0 else None
    return auroc, ap


def aupro(maps: np.ndarray, masks: np.ndarray) -> tuple[float | None, int]:
    """AUPRO over a class ([N, S, S] maps and bool masks); None when undefined."""
    maps = maps.astype(np.float64)
    labelled = []
    region_sizes = []
    for mask in masks:
        lab, n = ndimage.label(mask, structure=EIGHT)
        labelled.append((lab, n))
        if n:
            region_sizes.append(np.bincount(lab.ravel(), minlength=n + 1)[1:])
    n_regions = sum(n for _, n in labelled)
    normal = ~masks
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return None, n_regions
    lo, hi = float(maps.min()), float(maps.max())
    if hi <= lo:
        return None, n_regions
    sizes = np.concatenate(region_sizes).astype(np.float64)
    delta = (hi - lo) / STEPS
    pros, fprs = [], []
    for k in range(STEPS):
        th = lo + k * delta
        pred = maps > th
        hits = [np.bincount(lab[p], minlength=n + 1)[1:]
                for (lab, n), p in zip(labelled, pred) if n]
        pros.append(float(np.mean(np.concatenate(hits) / sizes)))
        fprs.append(np.logical_and(pred, normal).sum() / n_normal)
    pros_a, fprs_a = np.array(pros), np.array(fprs)
    keep = fprs_a < MAX_FPR
    if keep.sum() < 2:
        return None, n_regions
    f = fprs_a[keep]
    if f.max() == f.min():
        return None, n_regions
    x = (f - f.min()) / (f.max() - f.min())
    return float(auc(x, pros_a[keep])), n_regions


@dataclass
class ClassData:
    """What one class contributes: labels and scores of every image; maps and truths of those in
    the pixel metrics."""

    name: str
    has_masks: bool = False
    labels: list[bool] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    # The other decision statistics: each image's map maximum (blend = (score + map_max) / 2).
    map_maxes: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)


def class_metrics(c: ClassData) -> dict:
    labels = np.array(c.labels, dtype=bool)
    scores = np.array(c.scores, dtype=np.float32)
    i_auroc, i_ap = image_metrics(labels, scores)
    map_maxes = np.array(c.map_maxes, dtype=np.float32)
    blends = np.float32(0.5) * (scores + map_maxes) if len(map_maxes) == len(scores) else map_maxes
    mm_auroc, mm_ap = image_metrics(labels, map_maxes) if len(map_maxes) else (None, None)
    b_auroc, b_ap = image_metrics(labels, blends) if len(map_maxes) else (None, None)
    p_auroc = pro = None
    regions = 0
    if c.has_masks and c.maps:
        maps = np.stack(c.maps).astype(np.float32)
        truths = np.stack(c.truths)
        y = truths.ravel().astype(np.int64)
        if 0 < y.sum() < len(y):
            p_auroc = float(roc_auc_score(y, maps.astype(np.float64).ravel()))
        pro, regions = aupro(maps, truths)
    return {
        "name": c.name,
        "images": len(c.labels),
        "anomalous": int(labels.sum()),
        "pixel_images": len(c.maps) if c.has_masks else 0,
        "regions": regions,
        "image_auroc": i_auroc,
        "image_ap": i_ap,
        "pixel_auroc": p_auroc,
        "aupro": pro,
        "map_max_auroc": mm_auroc,
        "map_max_ap": mm_ap,
        "blend_auroc": b_auroc,
        "blend_ap": b_ap,
    }


def summary(classes: list[ClassData]) -> dict:
    rows = [class_metrics(c) for c in classes]
    mean = {}
    for m in METRICS:
        vals = [r[m] for r in rows if r[m] is not None]
        mean[m] = float(np.mean(vals)) if vals else None
        mean[m + "_classes"] = len(vals)
    return {"classes": rows, "mean": mean}


# ---------------------------------------------------------------------------- maps mode


def from_dump(dump: Path, root: Path) -> dict:
    with open(dump / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    classes: dict[str, ClassData] = {}
    for row in rows:
        c = classes.setdefault(row["class"], ClassData(row["class"]))
        if row["mask_path"]:
            c.has_masks = True
    for row in rows:
        c = classes[row["class"]]
        size = int(row["width"])
        anomalous = row["anomalous"] == "1"
        c.labels.append(anomalous)
        c.scores.append(float(np.float32(row["score"])))
        c.map_maxes.append(float(np.fromfile(dump / row["map_file"], dtype="<f4").max()))
        if not c.has_masks or (anomalous and not row["mask_path"]):
            continue
        c.maps.append(np.fromfile(dump / row["map_file"], dtype="<f4").reshape(size, size))
        c.truths.append(load_truth(root / row["mask_path"], size) if anomalous
                        else np.zeros((size, size), dtype=bool))
    return summary([classes[k] for k in sorted(classes)])


# ------------------------------------------------------------------------ pipeline mode


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def walk_class(class_dir: Path, name: str) -> list[tuple[Path, bool, Path | None]]:
    """(image, anomalous, mask) for `class_dir/test/<species>/*`; masks in
    `class_dir/ground_truth/<species>/<stem>_mask.<ext>` (or the same stem)."""
    items = []
    for species in sorted(p for p in (class_dir / "test").iterdir() if p.is_dir()):
        normal = species.name in NORMAL_SPECIES
        for img in sorted(p for p in species.iterdir() if is_image(p)):
            if img.stem.endswith(("_mask", "_label")):
                continue
            mask = None
            if not normal:
                gt = class_dir / "ground_truth" / species.name
                for cand in (f"{img.stem}_mask", img.stem):
                    hits = sorted(gt.glob(cand + ".*")) if gt.is_dir() else []
                    if hits:
                        mask = hits[0]
                        break
            items.append((img, not normal, mask))
    return items


def discover(root: Path, layout: str) -> list[tuple[str, list]]:
    if layout == "auto":
        layout = "sdd" if (root / "test").is_dir() else "mvtec"
    if layout == "sdd":
        return [(root.resolve().name, walk_class(root, root.resolve().name))]
    return [(d.name, walk_class(d, d.name)) for d in sorted(root.iterdir())
            if d.is_dir() and (d / "test").is_dir() and not d.name.startswith(".")]


def build_reference(package: Path):
    """The PyTorch reference encoder and text constant of a random-weight package."""
    from anomalyclip_ref import TINY, VIT_L_14_336
    from export import prepare
    from random_weights import write_random_sources

    manifest = tomllib.loads((package / "manifest.toml").read_text(encoding="utf-8"))
    source = manifest.get("source", {})
    if not manifest.get("tiny") or "seed" not in source:
        raise SystemExit(f"{package}: pipeline mode needs a random-weight package "
                         "(export.py --tiny or --random-full)")
    arch = TINY if manifest["model"]["arch"] == "tiny" else VIT_L_14_336
    stem = "tiny" if arch is TINY else "random-vitl14"
    with tempfile.TemporaryDirectory(prefix="anomalyclip-src-") as src:
        clip_path, prompt_path = write_random_sources(arch, source["seed"], src, stem)
        prep = prepare(clip_path, prompt_path, manifest["input"]["size"],
                       manifest["model"]["feature_layers"])
    if prep.clip.sha256 != source["clip_sha256"] or \
            prep.prompts.sha256 != source["checkpoint_sha256"]:
        raise SystemExit(f"{package}: regenerated source files differ from the manifest's hashes")
    text = np.fromfile(package / "text.f32", dtype="<f4").reshape(2, -1)
    if float(np.abs(text - prep.text.numpy()).max()) > 1e-6:
        raise SystemExit(f"{package}: text.f32 differs from the regenerated reference")
    return prep


def pipeline(root: Path, package: Path, layout: str, threads: int) -> dict:
    import torch

    from anomalyclip_ref import anomaly_head, preprocess_file

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    prep = build_reference(package)
    setup = time.perf_counter() - t0
    size = prep.size
    t0 = time.perf_counter()
    classes = []
    n_images = 0
    for name, items in discover(root, layout):
        c = ClassData(name, has_masks=any(m is not None for _, _, m in items))
        for img, anomalous, mask in items:
            x = torch.from_numpy(preprocess_file(img, size)[None])
            with torch.no_grad():
                feats = prep.encoder(x)
            head = anomaly_head(feats[0][0], [f[0] for f in feats[1:]], prep.text, size)
            n_images += 1
            c.labels.append(anomalous)
            c.scores.append(head.score)
            c.map_maxes.append(float(np.asarray(head.map, dtype=np.float32).max()))
            if c.has_masks and (not anomalous or mask is not None):
                c.maps.append(head.map)
                c.truths.append(load_truth(mask, size) if anomalous
                                else np.zeros((size, size), dtype=bool))
        classes.append(c)
    t_scored = time.perf_counter()
    out = summary(classes)
    seconds = time.perf_counter() - t0
    out["timing"] = {"images": n_images, "setup_seconds": setup, "eval_seconds": seconds,
                     "scoring_seconds": t_scored - t0, "metrics_seconds": seconds - (t_scored - t0),
                     "images_per_second": n_images / seconds if seconds > 0 else None,
                     "torch_threads": torch.get_num_threads()}
    return out


# ------------------------------------------------------------------------ synthetic data


def synth(out: Path, n_classes: int, n_images: int, size: int, seed: int) -> int:
    """An MVTec-style tree; returns the number of test images written."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    written = 0
    for c in range(n_classes):
        cdir = out / f"class{c}"
        base = rng.uniform(60, 180, size=3)
        freq = rng.uniform(0.02, 0.1, size=2)
        for i in range(n_images):
            species = "good" if i < n_images // 2 else ("crack", "stain")[i % 2]
            phase = rng.uniform(0, 6.3)
            tex = 30 * np.sin(freq[0] * xx + phase) * np.cos(freq[1] * yy - phase)
            img = base[None, None, :] + tex[..., None] + rng.normal(0, 8, size=(size, size, 3))
            mask = np.zeros((size, size), dtype=bool)
            if species != "good":
                for _ in range(1 + i % 2):
                    cy, cx = rng.uniform(0.2 * size, 0.8 * size, size=2)
                    ry, rx = rng.uniform(0.04 * size, 0.15 * size, size=2)
                    mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                img[mask] = rng.uniform(0, 255, size=3)
            name = f"{i:03d}.png"
            d = cdir / "test" / species
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / name)
            written += 1
            if species != "good":
                g = cdir / "ground_truth" / species
                g.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(g / f"{i:03d}_mask.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("maps", help="metrics from the maps eval --dump-maps wrote")
    m.add_argument("--dump", type=Path, required=True)
    m.add_argument("--data", type=Path, required=True)
    p = sub.add_parser("pipeline", help="the full PyTorch reference pipeline")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--layout", choices=("auto", "mvtec", "sdd"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g = sub.add_parser("synth", help="write a synthetic MVTec-style tree")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--classes", type=int, default=3)
    g.add_argument("--images", type=int, default=40, help="test images per class")
    g.add_argument("--size", type=int, default=256, help="image edge in pixels")
    g.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.mode == "synth":
        n = synth(args.out, args.classes, args.images, args.size, args.seed)
        print(json.dumps({"root": str(args.out), "images": n}))
        return 0
    if args.mode == "maps":
        out = from_dump(args.dump, args.data)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        out = pipeline(args.data, args.model, args.layout, args.threads)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
