#!/usr/bin/env python3
"""Times the reference post-processing and preprocessing, for comparison with benches/.

Head (the way AnomalyCLIP's test code does it, torch CPU fp32 + scipy):
  features normalised, softmax(F @ T^T / 0.07) per patch, reshape to 37x37, F.interpolate
  (bilinear, align_corners=False) to 518x518 for both classes, (U_a + 1 - U_n) / 2,
  scipy.ndimage.gaussian_filter(sigma=4) on the float32 map; image score from the global feature.
  "full_1920x1080" adds the bilinear interpolation of the final map to 1080x1920.
Preprocessing: Pillow BICUBIC 1920x1080 RGB -> 518x518; ToTensor + Normalize of 518x518 (torch).

Prints one JSON object {name: {"median_ms", "mean_ms", "runs"}} on stdout.
Usage: engines/bench_reference.py [--seconds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def timeit(fn, seconds: float) -> dict:
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "runs": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per benchmark")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    grid, dim, size = 37, 768, 518
    text = torch.randn(2, dim, generator=g)
    text = text / text.norm(dim=-1, keepdim=True)
    glob = torch.randn(1, dim, generator=g)
    local = torch.randn(1, grid * grid, dim, generator=g)

    def head() -> np.ndarray:
        with torch.no_grad():
            gf = glob / glob.norm(dim=-1, keepdim=True)
            score = ((gf @ text.T) / 0.07).softmax(-1)[0, 1]
            f = local / local.norm(dim=-1, keepdim=True)
            sim = ((f @ text.T) / 0.07).softmax(-1)
            sim = sim.reshape(1, grid, grid, 2).permute(0, 3, 1, 2)
            up = F.interpolate(sim, size=(size, size), mode="bilinear", align_corners=False)
            amap = (up[:, 1] + 1 - up[:, 0]) / 2.0
            amap = torch.stack([torch.from_numpy(scipy.ndimage.gaussian_filter(i, sigma=4)) for i in amap.cpu()])
            float(score)
            return amap

    def head_frame() -> None:
        amap = head()
        with torch.no_grad():
            F.interpolate(amap[None], size=(1080, 1920), mode="bilinear", align_corners=False)

    blur_in = np.random.default_rng(0).random((size, size), dtype=np.float32)

    def blur() -> None:
        scipy.ndimage.gaussian_filter(blur_in, sigma=4)

    patch = torch.rand(1, 2, grid, grid, generator=g)

    def upsample() -> None:
        with torch.no_grad():
            F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)

    y, x = np.mgrid[0:1080, 0:1920 * 3]
    frame = Image.fromarray((((x * 7 + y * 13) ^ (x * y)) & 255).astype(np.uint8).reshape(1080, 1920, 3), "RGB")
    small = frame.resize((size, size), Image.Resampling.BICUBIC)

    def resize() -> None:
        frame.resize((size, size), Image.Resampling.BICUBIC)

    def chw() -> None:
        t = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        t.sub_(MEAN).div_(STD)

    def frame_to_input() -> None:
        im = frame.resize((size, size), Image.Resampling.BICUBIC)
        t = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        t.sub_(MEAN).div_(STD)

    results = {
        "head/full_518": timeit(head, args.seconds),
        "head/full_1920x1080": timeit(head_frame, args.seconds),
        "head/blur_518": timeit(blur, args.seconds),
        "head/upsample_37_518": timeit(upsample, args.seconds),
        "preprocess/resize_1920x1080_to_518": timeit(resize, args.seconds),
        "preprocess/chw_518": timeit(chw, args.seconds),
        "preprocess/frame_1920x1080_to_input": timeit(frame_to_input, args.seconds),
    }
    results["_meta"] = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
