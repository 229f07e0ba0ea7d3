"""fp32 vs int8 of one package in the same run: score/map drift and time per image, alternating.

    python engines/bench_int8.py PACKAGE [N_IMAGES]

Owns nothing but its output: for the first N golden images (default 5), resized to the package's
input size with the reference preprocessing, one JSON line per image (scores, |d score|, max
|d map| after the reference head, cosine of the global features, seconds per forward of each
model, run alternately after one warm-up each) and a summary line (worst drifts, median times,
fp32/int8 time ratio). ONNX Runtime CPU with its default threads. Fails with Python's error on a
package without model.int8.onnx (export it with --int8).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomalyclip_ref import anomaly_head, preprocess_file  # noqa: E402

pkg = Path(sys.argv[1])
G = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"
idx = json.loads((G / "index.json").read_text())
size = int(__import__("tomllib").loads((pkg / "manifest.toml").read_text())["input"]["size"])
text = np.fromfile(pkg / "text.f32", "<f4").reshape(2, -1)
so = ort.SessionOptions()
a = ort.InferenceSession(str(pkg / "model.onnx"), so, providers=["CPUExecutionProvider"])
b = ort.InferenceSession(str(pkg / "model.int8.onnx"), so, providers=["CPUExecutionProvider"])
x0 = preprocess_file(G / idx["images"][0]["file"], size)[None]
a.run(None, {"image": x0}); b.run(None, {"image": x0})  # warm-up
ta, tb, rows = [], [], []
for e in idx["images"][: int(sys.argv[2]) if len(sys.argv) > 2 else 5]:
    x = preprocess_file(G / e["file"], size)[None]
    t = time.perf_counter(); ra = a.run(None, {"image": x}); ta.append(time.perf_counter() - t)
    t = time.perf_counter(); rb = b.run(None, {"image": x}); tb.append(time.perf_counter() - t)
    ha = anomaly_head(ra[0][0], [ra[1][0]], text, size)
    hb = anomaly_head(rb[0][0], [rb[1][0]], text, size)
    cos_g = float((ra[0][0] * rb[0][0]).sum())
    rows.append(dict(image=e["name"], score_fp32=float(ha.score), score_int8=float(hb.score),
                     dscore=abs(float(ha.score) - float(hb.score)),
                     dmap=float(np.abs(ha.map - hb.map).max()), cos_global=cos_g,
                     t_fp32=ta[-1], t_int8=tb[-1]))
    print(json.dumps(rows[-1]), flush=True)
print(json.dumps(dict(max_dscore=max(r["dscore"] for r in rows), max_dmap=max(r["dmap"] for r in rows),
                      median_t_fp32=float(np.median(ta)), median_t_int8=float(np.median(tb)),
                      ratio=float(np.median(ta) / np.median(tb)))), flush=True)
