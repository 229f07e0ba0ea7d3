#!/usr/bin/env python3
"""Compare a model package run by ONNX Runtime (CPU) with the PyTorch reference.

    python engines/check_parity.py PACKAGE --clip ViT-L-14-336px.pt --checkpoint epoch_15.pth
    python engines/check_parity.py PACKAGE --ref-random-full   # package from --random-full
    python engines/check_parity.py PACKAGE --ref-tiny          # package from --tiny

Owns the parity measurement: rebuilds the reference encoder from the source files (for the random
packages: regenerates them from the seed in the manifest and checks their SHA-256 against the
manifest), checks `text.f32`, runs both on a few images (default: the golden fixture images) and
prints feature cosine, score |delta| and map max |delta| (the head applied to each side's features)
and the time per image. Exit status 1 when a parity target of the spec (§7) is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from anomalyclip_ref import TINY, VIT_L_14_336, anomaly_head, preprocess_file
from checkpoints import InputError
from export import Prepared, prepare
from random_weights import write_random_sources

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = [REPO / "tests/fixtures/golden/images/square_rgb.png",
                  REPO / "tests/fixtures/golden/images/wide_rgb.png"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float((num / den).min())


def load_reference(package: Path, manifest: dict, args: argparse.Namespace) -> Prepared:
    """The PyTorch reference of the package's encoder, with the same outputs (the head's layers
    and any extra few-shot layers): from --clip/--checkpoint, else regenerated from the seed."""
    size = manifest["input"]["size"]
    layers = manifest["model"]["feature_layers"]
    few = manifest["model"].get("few_shot_layers")
    if getattr(args, "clip", None):
        return prepare(args.clip, args.checkpoint, size, layers, few)
    arch = TINY if args.ref_tiny else VIT_L_14_336
    seed = manifest["source"]["seed"]
    stem = "tiny" if args.ref_tiny else "random-vitl14"
    with tempfile.TemporaryDirectory(prefix="anomalyclip-src-") as src:
        clip_path, prompt_path = write_random_sources(arch, seed, src, stem)
        prep = prepare(clip_path, prompt_path, size, layers, few)
    if prep.clip.sha256 != manifest["source"]["clip_sha256"]:
        raise SystemExit("regenerated CLIP file differs from the package's source (hash)")
    if prep.prompts.sha256 != manifest["source"]["checkpoint_sha256"]:
        raise SystemExit("regenerated checkpoint differs from the package's source (hash)")
    return prep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PyTorch reference vs ONNX Runtime parity.")
    parser.add_argument("package", type=Path)
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--clip", type=Path)
    ref.add_argument("--ref-random-full", action="store_true")
    ref.add_argument("--ref-tiny", action="store_true")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--model", default="model.onnx", help="ONNX file in the package")
    parser.add_argument("--images", type=Path, nargs="*", default=DEFAULT_IMAGES)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    manifest = tomllib.loads((args.package / "manifest.toml").read_text(encoding="utf-8"))
    try:
        started = time.perf_counter()
        prep = load_reference(args.package, manifest, args)
        print(f"reference built in {time.perf_counter() - started:.1f} s")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = prep.size
    text = np.fromfile(args.package / "text.f32", dtype="<f4").reshape(2, -1)
    text_delta = float(np.abs(text - prep.text.numpy()).max())
    print(f"text.f32 max |delta| vs reference: {text_delta:.3g}")

    started = time.perf_counter()
    session = ort.InferenceSession(str(args.package / args.model),
                                   providers=["CPUExecutionProvider"])
    print(f"ORT session created in {time.perf_counter() - started:.1f} s")
    fp16 = "fp16" in args.model
    cos_target, map_target, score_target = (0.999, 1e-2, 1e-2) if fp16 else (0.9999, 1e-4, 1e-4)
    ok = text_delta <= 1e-6
    worst = {"cos": 1.0, "score": 0.0, "map": 0.0}
    for path in args.images:
        x = preprocess_file(path, size)[None]
        started = time.perf_counter()
        with torch.no_grad():
            ref_out = [t.numpy() for t in prep.encoder(torch.from_numpy(x))]
        t_ref = time.perf_counter() - started
        started = time.perf_counter()
        ort_out = session.run(None, {"image": x})
        t_ort = time.perf_counter() - started
        cos = min(cosine(a, b) for a, b in zip(ref_out, ort_out))
        # The head reads its own layers only (extra few-shot outputs are not summed into it).
        head = [1 + prep.encoder.feature_layers.index(layer) for layer in prep.head_layers]
        h_ref = anomaly_head(ref_out[0][0], [ref_out[i][0] for i in head], prep.text, size)
        h_ort = anomaly_head(ort_out[0][0], [ort_out[i][0] for i in head], text, size)
        d_score = abs(h_ref.score - h_ort.score)
        d_map = float(np.abs(h_ref.map - h_ort.map).max())
        worst = {"cos": min(worst["cos"], cos), "score": max(worst["score"], d_score),
                 "map": max(worst["map"], d_map)}
        print(f"{path.name}: cosine {cos:.7f}  score {h_ref.score:.6f} |delta| {d_score:.2e}  "
              f"map max |delta| {d_map:.2e}  torch {t_ref:.2f} s  ort {t_ort:.2f} s")
    ok = ok and worst["cos"] >= cos_target and worst["score"] <= score_target \
        and worst["map"] <= map_target
    print(f"worst: cosine {worst['cos']:.7f} (>= {cos_target}), score |delta| "
          f"{worst['score']:.2e} (<= {score_target}), map |delta| {worst['map']:.2e} "
          f"(<= {map_target}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
