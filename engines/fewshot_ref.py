#!/usr/bin/env python3
"""Reference of the few-shot (memory bank) computation, and the fixture the Rust parity test reads.

Written from APRIL-GAN's few-shot mode (repository ByChelsea/VAND-APRIL-GAN, commit f13b8a6):
`few_shot.py` lines 15-26 build, per feature layer, a bank of the patch tokens of the K normal
images concatenated along the token axis; `test.py` lines 187-201 compute per layer
`sklearn.metrics.pairwise.cosine_similarity(bank, patches)`, take `min(1 - cos)` over the bank,
reshape to the patch grid, upsample bilinearly to the image size, sum the layers and add the sum to
the zero-shot map. Our runtime (src/reference.rs) keeps that computation with three stated
changes, mirrored here: upsampling with ``align_corners=False`` (the zero-shot head's own; APRIL-GAN
uses True), the few-shot map added to the head's final map, and a per-frame image score
``0.5 * (s + clip(max(few-shot map) / L, 0, 1))`` in place of APRIL-GAN's test-set min-max
normalisation (test.py 246-249), which a live system cannot compute.

Usage (regenerates tests/fixtures/fewshot from the committed golden fixtures):

    .venv/bin/python engines/fewshot_ref.py

The fixture uses the PyTorch local features of the golden images (tests/fixtures/golden/ref,
tiny random-weight package: wiring and parity only, no detection meaning). Bank: BANK_STEMS.
Outputs, per golden image: ``<stem>.fs_map.f32`` (few-shot map, S x S), ``<stem>.map.f32``
(combined map) and in ``index.json`` the combined score and the few-shot map's maximum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics.pairwise import cosine_similarity

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "fixtures" / "golden"
OUT = REPO / "tests" / "fixtures" / "fewshot"
BANK_STEMS = ("square_rgb", "wide_rgb")


def memory_bank(images: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """images[i][l]: patch features [N, D] of image i, layer l -> per layer [K*N, D]
    (few_shot.py 25-26: torch.cat over images, per layer)."""
    return [np.concatenate([img[layer] for img in images], axis=0)
            for layer in range(len(images[0]))]


def few_shot_map(bank: Sequence[np.ndarray], frame: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Sum over layers of the upsampled min(1 - cos) map (test.py 189-200), [size, size]."""
    maps = []
    for mem, p in zip(bank, frame):
        cos = cosine_similarity(mem, p)                      # [K*N, N]
        height = int(np.sqrt(cos.shape[1]))
        m = np.min(1 - cos, 0).reshape(1, 1, height, height)
        up = F.interpolate(torch.tensor(m, dtype=torch.float32), size=size, mode="bilinear",
                           align_corners=False)
        maps.append(up[0, 0].numpy())
    return np.sum(maps, axis=0)


def combine(zs_map: np.ndarray, zs_score: float, fs_map: np.ndarray,
            layers: int) -> tuple[np.ndarray, float]:
    """Combined map and per-frame image score (see the module docstring)."""
    score = 0.5 * (zs_score + float(np.clip(fs_map.max() / layers, 0.0, 1.0)))
    return zs_map + fs_map, score


def _f32(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").reshape(shape)


def main(out: Path = OUT) -> None:
    index = json.loads((GOLDEN / "index.json").read_text())
    size, grid, dim = index["size"], index["grid"], index["dim"]
    local = {e["name"]: _f32(GOLDEN / "ref" / f"{e['name']}.local.f32", (grid * grid, dim))
             for e in index["images"]}
    bank = memory_bank([[local[s]] for s in BANK_STEMS])
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for e in index["images"]:
        stem = e["name"]
        fs = few_shot_map(bank, [local[stem]], size)
        zs_map = _f32(GOLDEN / "ref" / f"{stem}.map.f32", (size, size))
        combined, score = combine(zs_map, e["score"], fs, layers=1)
        fs.astype("<f4").tofile(out / f"{stem}.fs_map.f32")
        combined.astype("<f4").tofile(out / f"{stem}.map.f32")
        images.append({"name": stem, "score": score, "zero_shot_score": e["score"],
                       "fs_max": float(fs.max()), "map_max": float(combined.max())})
    (out / "index.json").write_text(json.dumps(
        {"golden": "../golden", "bank": list(BANK_STEMS), "layers": 1, "size": size,
         "images": images}, indent=2) + "\n")
    print(f"wrote {out} ({len(images)} images, bank {list(BANK_STEMS)})")


if __name__ == "__main__":
    main()
