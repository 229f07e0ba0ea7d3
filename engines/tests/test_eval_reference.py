"""engines/eval_reference.py: its AUPRO (bincount over labelled regions) agrees with the
straightforward one of make_metric_fixtures.py on the committed metric cases, and its mask loader
follows the official transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from eval_reference import aupro, load_truth

CASES = REPO / "tests/fixtures/metrics"


def pixel_cases() -> list[dict]:
    return json.loads((CASES / "cases.json").read_text())["pixel_cases"]


@pytest.mark.parametrize("case", pixel_cases(), ids=lambda c: c["name"])
def test_aupro_matches_the_fixture_reference(case: dict) -> None:
    shape = (case["images"], case["height"], case["width"])
    maps = np.fromfile(CASES / case["maps"], dtype="<f4").reshape(shape)
    masks = np.fromfile(CASES / case["masks"], dtype=np.uint8).reshape(shape).astype(bool)
    value, regions = aupro(maps, masks)
    assert regions == case["regions"]
    if case["aupro"] is None:
        assert value is None
    else:
        assert value == pytest.approx(case["aupro"], abs=1e-12)


def test_mask_loader_binarises_then_resizes_bilinear(tmp_path) -> None:
    # One non-zero pixel becomes 255 before the resize: a faint RGB mask still marks a defect.
    m = np.zeros((8, 8, 3), dtype=np.uint8)
    m[2:6, 2:6] = (0, 3, 0)
    Image.fromarray(m).save(tmp_path / "m.png")
    truth = load_truth(tmp_path / "m.png", 4)
    assert truth.shape == (4, 4)
    assert truth[1:3, 1:3].all() and truth.sum() == 4
    # Downscaling averages (Pillow's antialiased bilinear): a lone pixel vanishes.
    m = np.zeros((8, 8), dtype=np.uint8)
    m[3, 3] = 255
    Image.fromarray(m).save(tmp_path / "dot.png")
    assert not load_truth(tmp_path / "dot.png", 4).any()
