"""The few-shot reference (engines/fewshot_ref.py): its map against a direct float64 computation of
the definition, and the committed fixture (tests/fixtures/fewshot) against a fresh run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import fewshot_ref

REPO = Path(__file__).resolve().parents[2]


def test_the_few_shot_map_is_one_minus_the_best_cosine_upsampled_and_summed_over_layers():
    rng = np.random.default_rng(0)
    grid, dim, size, k = 4, 16, 8, 3
    images = [[rng.standard_normal((grid * grid, dim)).astype(np.float32) for _ in range(2)]
              for _ in range(k)]
    frame = [rng.standard_normal((grid * grid, dim)).astype(np.float32) for _ in range(2)]
    bank = fewshot_ref.memory_bank(images)
    assert [b.shape for b in bank] == [(k * grid * grid, dim)] * 2
    got = fewshot_ref.few_shot_map(bank, frame, size)
    # Direct: f64 cosines, then bilinear with align_corners=False written out (2x upsampling:
    # source coordinate (i + 0.5) / 2 - 0.5, clamped at the border).
    want = np.zeros((size, size))
    for mem, p in zip(bank, frame):
        m = mem.astype(np.float64) / np.linalg.norm(mem, axis=1, keepdims=True)
        q = p.astype(np.float64) / np.linalg.norm(p, axis=1, keepdims=True)
        d = (1 - (q @ m.T).max(axis=1)).reshape(grid, grid)
        for y in range(size):
            for x in range(size):
                sy = min(max((y + 0.5) / 2 - 0.5, 0), grid - 1)
                sx = min(max((x + 0.5) / 2 - 0.5, 0), grid - 1)
                y0, x0 = int(sy), int(sx)
                y1, x1 = min(y0 + 1, grid - 1), min(x0 + 1, grid - 1)
                wy, wx = sy - y0, sx - x0
                want[y, x] += ((1 - wy) * ((1 - wx) * d[y0, x0] + wx * d[y0, x1])
                               + wy * ((1 - wx) * d[y1, x0] + wx * d[y1, x1]))
    assert np.abs(got - want).max() < 1e-5


def test_the_combined_score_averages_the_zero_shot_score_and_the_normalised_map_max():
    fs = np.array([[0.0, 1.2], [0.4, 0.2]], dtype=np.float32)
    m, s = fewshot_ref.combine(np.zeros((2, 2), np.float32), 0.3, fs, layers=2)
    assert abs(s - 0.5 * (0.3 + 0.6)) < 1e-7
    assert np.array_equal(m, fs)
    _, s = fewshot_ref.combine(np.zeros((2, 2), np.float32), 0.3, fs * 10, layers=2)
    assert abs(s - 0.5 * (0.3 + 1.0)) < 1e-7


def test_the_committed_fixture_is_what_the_reference_writes(tmp_path):
    fewshot_ref.main(tmp_path)
    committed = REPO / "tests" / "fixtures" / "fewshot"
    a = json.loads((committed / "index.json").read_text())
    b = json.loads((tmp_path / "index.json").read_text())
    assert a["bank"] == b["bank"] and len(a["images"]) == len(b["images"]) >= 5
    for ea, eb in zip(a["images"], b["images"]):
        assert ea["name"] == eb["name"]
        # Computed on another CPU: BLAS summation order moves the last bits (values in [0, 1]).
        assert abs(ea["score"] - eb["score"]) < 1e-5
        for what in ("fs_map", "map"):
            x = np.fromfile(committed / f"{ea['name']}.{what}.f32", dtype="<f4")
            y = np.fromfile(tmp_path / f"{ea['name']}.{what}.f32", dtype="<f4")
            assert x.shape == y.shape and np.abs(x - y).max() < 1e-5


def test_the_exporter_records_few_shot_layers_as_extra_outputs(tmp_path):
    import onnx

    from anomalyclip_ref import TINY
    from export import export_random

    path, _ = export_random(TINY, 0, tmp_path / "pkg", few_shot_layers=[2, 3])
    manifest = (path / "manifest.toml").read_text()
    assert "feature_layers = [4]" in manifest and "few_shot_layers = [2, 3]" in manifest
    names = [o.name for o in onnx.load(str(path / "model.onnx")).graph.output]
    assert names == ["global", "local_2", "local_3", "local_4"]
