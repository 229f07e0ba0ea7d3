#!/usr/bin/env python3
"""Regenerate the committed test fixtures (run from anywhere):

    python engines/make_fixtures.py

Owns:
* `tests/fixtures/tiny/`: the tiny random-weight package (seed 0, with `model.fp16.onnx` and
  `model.int8.onnx`), written by the normal export path (`export.export_random`);
* `tests/fixtures/golden/`: five synthetic images (square RGB PNG, non-square RGB PNG, grayscale
  PNG, RGBA PNG with transparent pixels, RGB JPEG) and, for each, the PyTorch reference outputs on
  the tiny model in fp32 on the CPU, in the layout of `engines/PACKAGE.md`;
* `config/samples/`: demo images for the README ("normal" and "defect" looking surfaces).

Everything is deterministic: running it twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from anomalyclip_ref import TINY, anomaly_head, preprocess_file
from export import Prepared, export_random

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SAMPLES = REPO / "config" / "samples"


# --------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------


def _gradient(width: int, height: int, top_left: tuple[float, float, float],
              bottom_right: tuple[float, float, float], wave: float = 0.0) -> np.ndarray:
    """Smooth RGB float image in [0, 255]: a diagonal blend with an optional soft wave."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (x / max(width - 1, 1) + y / max(height - 1, 1)) / 2
    t = np.clip(t + wave * np.sin(x / width * 2 * np.pi) * np.cos(y / height * 3 * np.pi), 0, 1)
    a, b = np.asarray(top_left), np.asarray(bottom_right)
    return a * (1 - t[..., None]) + b * t[..., None]


def _defect_blob(size: tuple[int, int], centre: tuple[float, float], radius: float,
                 seed: int) -> Image.Image:
    """Soft irregular mask (mode L) of a stain/dent: a wobbly polygon, blurred."""
    rng = np.random.Generator(np.random.PCG64(seed))
    angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    radii = radius * (0.7 + 0.5 * rng.random(angles.size))
    points = [(centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for a, r in zip(angles, radii)]
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([(float(px), float(py)) for px, py in points], fill=255)
    return mask.filter(ImageFilter.GaussianBlur(radius / 4))


def _scene(width: int, height: int, seed: int) -> Image.Image:
    """An RGB 'part on a background' image: gradient, two shapes, a dark defect blob."""
    base = _gradient(width, height, (70, 90, 120), (190, 185, 160), wave=0.08)
    image = Image.fromarray(np.round(base).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    w, h = width, height
    draw.ellipse((0.15 * w, 0.2 * h, 0.65 * w, 0.8 * h), fill=(150, 150, 158),
                 outline=(60, 60, 70), width=2)
    draw.rectangle((0.6 * w, 0.1 * h, 0.9 * w, 0.45 * h), fill=(205, 120, 60))
    draw.line((0.05 * w, 0.92 * h, 0.95 * w, 0.85 * h), fill=(30, 40, 50), width=2)
    blob = _defect_blob((w, h), (0.4 * w, 0.55 * h), 0.09 * min(w, h), seed)
    dark = Image.new("RGB", (w, h), (40, 25, 20))
    return Image.composite(dark, image, blob)


def image_square_rgb() -> Image.Image:
    return _scene(160, 160, seed=1)


def image_wide_rgb() -> Image.Image:
    return _scene(200, 120, seed=2)


def image_gray() -> Image.Image:
    return _scene(128, 128, seed=3).convert("L")


def image_rgba() -> Image.Image:
    rgb = _scene(144, 144, seed=4)
    y, x = np.mgrid[0:144, 0:144]
    alpha = np.full((144, 144), 255, np.uint8)
    alpha[(x + y) < 50] = 0  # fully transparent corner (its colour must come out black)
    alpha[(x > 100) & (y > 100)] = 128  # half-transparent square
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return rgba


def image_jpeg_rgb() -> Image.Image:
    return _scene(180, 180, seed=5)


GOLDEN_IMAGES: list[tuple[str, str, Callable[[], Image.Image], dict[str, object]]] = [
    ("square_rgb", "png", image_square_rgb, {}),
    ("wide_rgb", "png", image_wide_rgb, {}),
    ("gray", "png", image_gray, {}),
    ("rgba_alpha", "png", image_rgba, {}),
    # 4:4:4 so that decoders do not differ in chroma upsampling
    ("photo", "jpg", image_jpeg_rgb, {"quality": 90, "subsampling": 0}),
]


def _surface(seed: int, kind: str) -> np.ndarray:
    """256x256 RGB float texture: brushed metal or woven fabric."""
    rng = np.random.Generator(np.random.PCG64(seed))
    size = 256
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "metal":
        streaks = rng.standard_normal((size, 1)) * 6 + rng.standard_normal((size, size)) * 2
        base = 150 + 25 * np.sin(x / 90) + streaks
        rgb = np.stack([base, base + 4, base + 10], axis=-1)
    else:
        weave = 18 * np.sin(x / 3.0) * np.sin(y / 3.0) + rng.standard_normal((size, size)) * 3
        rgb = np.stack([120 + weave, 95 + weave, 70 + weave], axis=-1)
    return np.clip(rgb, 0, 255)


def sample_images() -> dict[str, Image.Image]:
    out: dict[str, Image.Image] = {}
    for kind, seed in (("metal", 11), ("fabric", 12)):
        normal = Image.fromarray(np.round(_surface(seed, kind)).astype(np.uint8), "RGB")
        out[f"{kind}_normal"] = normal
        defect = normal.copy()
        draw = ImageDraw.Draw(defect)
        if kind == "metal":
            draw.line((60, 70, 200, 150), fill=(70, 60, 55), width=3)  # scratch
            blob = _defect_blob((256, 256), (170, 80), 14, seed)
            defect = Image.composite(Image.new("RGB", (256, 256), (95, 70, 45)), defect, blob)
        else:
            blob = _defect_blob((256, 256), (120, 140), 22, seed)  # hole
            defect = Image.composite(Image.new("RGB", (256, 256), (20, 16, 12)), defect, blob)
        out[f"{kind}_defect"] = defect
    return out


# --------------------------------------------------------------------------------------------
# Fixture writing
# --------------------------------------------------------------------------------------------


def _write_f32(path: Path, array: np.ndarray | torch.Tensor) -> None:
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
    path.write_bytes(np.ascontiguousarray(data, dtype="<f4").tobytes())


def write_golden(prep: Prepared, golden: Path) -> list[dict[str, object]]:
    if golden.exists():
        shutil.rmtree(golden)
    (golden / "images").mkdir(parents=True)
    (golden / "ref").mkdir()
    size, grid = prep.size, prep.encoder.grid
    entries: list[dict[str, object]] = []
    for stem, ext, make, save_args in GOLDEN_IMAGES:
        image_path = golden / "images" / f"{stem}.{ext}"
        make().save(image_path, **save_args)
        with Image.open(image_path) as image:
            width, height, mode = image.width, image.height, image.mode
        x = preprocess_file(image_path, size)
        with torch.no_grad():
            global_feat, *local_feats = prep.encoder(torch.from_numpy(x)[None])
        head = anomaly_head(global_feat[0], [f[0] for f in local_feats], prep.text, size)
        ref = golden / "ref"
        _write_f32(ref / f"{stem}.input.f32", x)
        _write_f32(ref / f"{stem}.global.f32", global_feat[0])
        _write_f32(ref / f"{stem}.local.f32", local_feats[0][0])
        _write_f32(ref / f"{stem}.patch.f32", head.patch.reshape(grid, grid))
        _write_f32(ref / f"{stem}.map_raw.f32", head.map_raw)
        _write_f32(ref / f"{stem}.map.f32", head.map)
        entries.append({"name": stem, "file": f"images/{stem}.{ext}", "width": width,
                        "height": height, "mode": mode, "score": head.score,
                        "map_max": head.map_max})
    index = {"package": "../tiny", "size": size, "grid": grid, "dim": prep.arch.vision.embed_dim,
             "images": entries}
    (golden / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return entries


def write_samples(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, image in sample_images().items():
        image.save(directory / f"{name}.png", optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    package, prep = export_random(TINY, 0, args.fixtures / "tiny", fp16=True, int8=True,
                                  force=True)
    entries = write_golden(prep, args.fixtures / "golden")
    write_samples(args.samples)
    print(f"wrote {package}")
    for entry in entries:
        print(f"  {entry['name']:<12} {entry['mode']:<5} {entry['width']}x{entry['height']}  "
              f"score {entry['score']:.6f}  map_max {entry['map_max']:.6f}")
    print(f"wrote {args.fixtures / 'golden'} and {args.samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
