#!/usr/bin/env python3
"""Measure prompt training with the feature cache against the official-style loop.

Owns the training speed measurement: writes random-weight CLIP sources (`--arch tiny`, or
`--arch full` for a random ViT-L/14@336px) and a synthetic dataset (random RGB images, half
anomalous with rectangle masks), then trains the same number of epochs three ways: the image
encoder every step (`--no-cache`, the official loop's cost), with the fp32 cache and with the fp16
cache. Prints one JSON object: seconds per epoch for each way, the speed-up of epochs 2.. (and of
the whole run), cache bytes per image, and what the fp16 cache costs in parity (per-step loss
relative difference and final parameter difference against the fp32 cache).

Random weights: timings only, nothing about detection quality.

    python engines/bench_train.py --arch tiny --images 32 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomalyclip_ref import TINY, VIT_L_14_336
from random_weights import write_random_sources
from train import train


def synth(root: Path, images: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    meta: dict = {"train": {}, "test": {"part": []}}
    for k in range(images):
        anomalous = k % 2 == 1
        specie = "broken" if anomalous else "good"
        rel = f"part/test/{specie}/{k:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        mask_rel = ""
        if anomalous:
            y, x = rng.integers(0, 160, 2)
            pixels[y:y + 64, x:x + 64] = 255
            mask_rel = f"part/ground_truth/{specie}/{k:03d}_mask.png"
            (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            mask = np.zeros((256, 256), np.uint8)
            mask[y:y + 64, x:x + 64] = 255
            Image.fromarray(mask).save(root / mask_rel)
        Image.fromarray(pixels).save(root / rel)
        meta["test"]["part"].append({"img_path": rel, "mask_path": mask_rel, "cls_name": "part",
                                     "specie_name": specie, "anomaly": int(anomalous)})
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def per_epoch(records) -> list[float]:
    epochs: dict[int, float] = {}
    for r in records:
        epochs[r.epoch] = epochs.get(r.epoch, 0.0) + r.seconds
    return [round(epochs[k], 3) for k in sorted(epochs)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("tiny", "full"), default="tiny")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--tmp", type=Path, help="scratch directory (the full model's CLIP file is "
                                            "0.9 GB)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = TINY if args.arch == "tiny" else VIT_L_14_336
    result: dict = {"arch": arch.label, "images": args.images, "epochs": args.epochs,
                    "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
                    "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        clip_path, _ = write_random_sources(arch, 0, tmp, "bench")
        data = synth(tmp / "data", args.images)
        runs = {}
        for label, cache, dtype in (("encoder_every_step", False, "f32"),
                                    ("cache_f32", True, "f32"), ("cache_f16", True, "f16")):
            started = time.perf_counter()
            records, state = train(clip_path, data, tmp / label, epochs=args.epochs,
                                   batch_size=args.batch_size, size=args.size, cache=cache,
                                   cache_dtype=dtype, quiet=True)
            total = time.perf_counter() - started
            runs[label] = (records, state)
            result[label] = {"total_s": round(total, 3), "epoch_s": per_epoch(records)}
            if cache:
                size = args.size or arch.default_size
                n_rows = 1 + (size // arch.vision.patch) ** 2  # global + one feature layer
                itemsize = 2 if dtype == "f16" else 4
                result[label]["cache_bytes_per_image"] = (n_rows * arch.vision.embed_dim
                                                          * itemsize + size * size)
                # the cache build happens before the first step: total minus the steps minus the
                # setup (taken from the uncached run: total minus its steps)
                base = result["encoder_every_step"]
                setup = base["total_s"] - sum(base["epoch_s"])
                result[label]["cache_build_s"] = round(total - sum(per_epoch(records)) - setup,
                                                       3)
        enc = result["encoder_every_step"]["epoch_s"]
        cached = result["cache_f32"]["epoch_s"]
        if len(enc) > 1:
            result["speedup_epochs_2_on"] = round(float(np.mean(enc[1:]) / np.mean(cached[1:])), 2)
        result["speedup_whole_run"] = round(result["encoder_every_step"]["total_s"]
                                            / result["cache_f32"]["total_s"], 2)
        rec32, st32 = runs["cache_f32"]
        rec16, st16 = runs["cache_f16"]
        result["f16_vs_f32"] = {
            "max_rel_loss": max(abs(a.loss - b.loss) / abs(b.loss) for a, b in zip(rec16, rec32)),
            "max_rel_image_loss": max(abs(a.image_loss - b.image_loss) / abs(b.image_loss)
                                      for a, b in zip(rec16, rec32)),
            "max_abs_param": max(float((st16[k] - st32[k]).abs().max()) for k in st32
                                 if st32[k].is_floating_point())}
        recu, stu = runs["encoder_every_step"]
        result["cache_f32_vs_encoder"] = {
            "max_rel_loss": max(abs(a.loss - b.loss) / abs(b.loss) for a, b in zip(rec32, recu)),
            "max_abs_param": max(float((st32[k] - stu[k]).abs().max()) for k in stu
                                 if stu[k].is_floating_point())}
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
