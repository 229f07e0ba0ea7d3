"""Prompt training (`train.py`) and `export.py --update-text` on the tiny random-weight model.

The tiny model has random weights: these tests check the wiring and the arithmetic, not
detection quality.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip_ref import TINY, compute_text_constant
from checkpoints import load_clip, load_prompts
from train import main as train_main
from train import official_initial_learner
from train import train

ENGINES = Path(__file__).resolve().parent.parent
SIZE = 112


def make_dataset(root: Path, n_normal: int = 5, n_anomalous: int = 5, seed: int = 0,
                 masks: bool = True) -> Path:
    """A small official-style tree + meta.json: two classes, random RGB images, rectangle masks."""
    rng = np.random.default_rng(seed)
    meta: dict = {"train": {}, "test": {}}
    for k in range(n_normal + n_anomalous):
        cls = "alpha" if k % 2 == 0 else "beta"
        anomalous = k >= n_normal
        specie = "broken" if anomalous else "good"
        rel = f"{cls}/test/{specie}/{k:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(90, 160))
        pixels = rng.integers(0, 256, (side, side + 10, 3), dtype=np.uint8)
        mask_rel = ""
        if anomalous:
            y, x = rng.integers(0, side // 2, 2)
            pixels[y:y + side // 3, x:x + side // 3] = 255
            if masks:
                mask_rel = f"{cls}/ground_truth/{specie}/{k:03d}_mask.png"
                (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                mask = np.zeros((side, side + 10), np.uint8)
                mask[y:y + side // 3, x:x + side // 3] = 255
                Image.fromarray(mask).save(root / mask_rel)
        Image.fromarray(pixels).save(root / rel)
        meta["test"].setdefault(cls, []).append({
            "img_path": rel, "mask_path": mask_rel, "cls_name": cls, "specie_name": specie,
            "anomaly": int(anomalous)})
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _max_rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_cached_features_train_exactly_like_the_image_encoder_every_step(
        tiny_sources, dataset, tmp_path):
    clip_path, _ = tiny_sources
    runs = {}
    for cache in (False, True):
        runs[cache] = train(clip_path, dataset, tmp_path / f"out-{cache}", batch_size=4,
                            cache=cache, max_steps=3, quiet=True)
    (rec_u, state_u), (rec_c, state_c) = runs[False], runs[True]
    assert len(rec_u) == len(rec_c) == 3
    for u, c in zip(rec_u, rec_c):
        assert _max_rel(c.loss, u.loss) < 1e-5, (u, c)
        assert _max_rel(c.image_loss, u.image_loss) < 1e-5, (u, c)
        assert u.loss > 0 and u.image_loss > 0
    for key, value in state_u.items():
        if value.is_floating_point():
            assert torch.allclose(state_c[key], value, rtol=0, atol=1e-5), key
    # the parameters moved: the comparison above is not between two untouched copies
    start = official_initial_learner(TINY, load_clip(clip_path).state, 111).state_dict()
    assert (state_u["ctx_pos"] - start["ctx_pos"]).abs().max() > 1e-4
    assert (tmp_path / "out-True" / "feature-cache" / "cache.json").is_file()


def test_a_dataset_with_an_anomalous_image_without_mask_is_refused_with_one_clear_line(
        tiny_sources, tmp_path, capsys):
    clip_path, _ = tiny_sources
    data = make_dataset(tmp_path / "data", n_normal=2, n_anomalous=2, masks=False)
    code = train_main(["--clip", str(clip_path), "--data", str(data), "--out",
                       str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "meta.json" in err and "no mask" in err and "--image-loss-only" in err
    assert not (tmp_path / "out").exists()


def test_a_trained_checkpoint_exported_with_update_text_gives_the_reference_text_constant(
        tiny_sources, tiny_package, dataset, tmp_path):
    clip_path, _ = tiny_sources
    out = tmp_path / "run"
    train(clip_path, dataset, out, epochs=1, batch_size=4, quiet=True)
    checkpoint = out / "epoch_1.pth"
    assert checkpoint.is_file() and (out / "log.txt").read_text().startswith("epoch [1/1], loss:")
    new = tmp_path / "pkg-new"
    proc = subprocess.run([sys.executable, str(ENGINES / "export.py"), "--update-text",
                           str(tiny_package), "--clip", str(clip_path), "--checkpoint",
                           str(checkpoint), "--out", str(new)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    clip = load_clip(clip_path)
    expected = compute_text_constant(TINY, clip.state, load_prompts(checkpoint, TINY).state)
    got = np.fromfile(new / "text.f32", dtype="<f4").reshape(2, -1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
    old = np.fromfile(tiny_package / "text.f32", dtype="<f4").reshape(2, -1)
    assert np.abs(got - old).max() > 1e-3  # the training changed the text constant
    # the image model is reused byte for byte; the manifest names the new text and checkpoint
    assert (new / "model.onnx").read_bytes() == (tiny_package / "model.onnx").read_bytes()
    manifest = tomllib.loads((new / "manifest.toml").read_text())
    old_manifest = tomllib.loads((tiny_package / "manifest.toml").read_text())
    assert manifest["files"]["text.f32"] == hashlib.sha256(got.tobytes()).hexdigest()
    assert manifest["files"]["model.onnx"] == old_manifest["files"]["model.onnx"]
    assert manifest["source"]["checkpoint_file"] == "epoch_1.pth"
    assert manifest["model"] == old_manifest["model"]


def test_update_text_refuses_a_clip_file_other_than_the_packages_source(
        tiny_package, tmp_path):
    from random_weights import write_random_sources

    other_clip, other_prompts = write_random_sources(TINY, 1, tmp_path, "tiny")
    proc = subprocess.run([sys.executable, str(ENGINES / "export.py"), "--update-text",
                           str(tiny_package), "--clip", str(other_clip), "--checkpoint",
                           str(other_prompts), "--out", str(tmp_path / "new")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "clip_sha256" in proc.stderr
    assert not (tmp_path / "new").exists()
