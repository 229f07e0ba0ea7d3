#!/usr/bin/env python3
"""Same-run timing of several ONNX files of one encoder (graph variants, precisions).

    python engines/bench_onnx.py SIZE ROUNDS BASELINE.onnx OTHER.onnx [...]

Owns nothing but its output. Creates one ONNX Runtime CPU session per file (default threads),
runs each once on the same random input (warm-up, and the outputs compared), then ROUNDS rounds in
which every file runs once, in the order given, so that a machine's drift falls on all of them.
Prints per file: the session creation time, the median forward time, the speed ratio against the
first file (> 1: faster) and the max |difference| of its outputs against the first file's.
The variants measured for docs/measurements/speed-cpu.md: the plain export of an older exporter,
the default export (last block's plain stream for the class token only) and `--fused-attention`,
each also as `model.int8.onnx`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    size, rounds, files = int(argv[0]), int(argv[1]), argv[2:]
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    sessions, created = [], []
    for path in files:
        started = time.perf_counter()
        sessions.append(ort.InferenceSession(path, providers=["CPUExecutionProvider"]))
        created.append(time.perf_counter() - started)
    outputs = [s.run(None, {"image": x}) for s in sessions]
    times: list[list[float]] = [[] for _ in files]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(None, {"image": x})
            times[i].append(time.perf_counter() - started)
    base = float(np.median(times[0]))
    for i, path in enumerate(files):
        median = float(np.median(times[i]))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs[0], outputs[i]))
        print(f"{path}: create {created[i]:.2f} s  forward median {median * 1000:.0f} ms "
              f"(rounds {rounds})  ratio vs first {base / median:.3f}x  max|d out| {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
