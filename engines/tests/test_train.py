"""Prompt training (`train.py`) and `export.py --update-text` on the tiny random-weight model.

The tiny model has random weights: these tests check the wiring and the arithmetic, not
detection quality.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------------------------------------
# Parity with the official code, run in-process (needs a checkout of zqhang/AnomalyCLIP)
# ------------------------------------------------------------------------------------------------

OFFICIAL = os.environ.get("ANOMALYCLIP_OFFICIAL", "")


def _import_official(root: Path) -> types.SimpleNamespace:
    """Import the official model, prompt learner and losses without their unused dependencies.

    torchvision, tqdm and thop are only used by code paths the training step does not take
    (download, image transforms, profiling) and are stubbed; ftfy is the identity on the ASCII
    prompts; `regex` is given to the tokenizer as Python's `re` with the two Unicode classes of
    its pattern spelled for ASCII (the prompts are "X X ... object." and "... damaged object.").
    The package `__init__` is bypassed; the submodules load from their files.
    """
    stubs = {}
    tv = types.ModuleType("torchvision")
    tvt = types.ModuleType("torchvision.transforms")
    for name in ("Compose", "Resize", "ToTensor", "Normalize", "InterpolationMode"):
        setattr(tvt, name, type(name, (), {}))
    tv.transforms = tvt
    stubs.update({"torchvision": tv, "torchvision.transforms": tvt})
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = lambda x, *a, **k: x
    thop = types.ModuleType("thop")
    thop.profile = None
    ftfy = types.ModuleType("ftfy")
    ftfy.fix_text = lambda s: s
    regex = types.ModuleType("regex")
    regex.IGNORECASE = re.IGNORECASE
    regex.sub = re.sub
    regex.findall = re.findall
    regex.compile = lambda p, flags=0: re.compile(
        p.replace(r"\p{L}", "A-Za-z").replace(r"\p{N}", "0-9"), flags)
    import packaging.version

    pkg_resources = types.ModuleType("pkg_resources")
    pkg_resources.packaging = packaging
    stubs.update({"tqdm": tqdm, "thop": thop, "ftfy": ftfy, "regex": regex,
                  "pkg_resources": pkg_resources})
    lib = types.ModuleType("AnomalyCLIP_lib")
    lib.__path__ = [str(root / "AnomalyCLIP_lib")]
    stubs["AnomalyCLIP_lib"] = lib
    saved = {k: sys.modules.get(k) for k in [*stubs, "prompt_ensemble", "loss"]}
    sys.modules.update(stubs)
    sys.path.insert(0, str(root))
    try:
        build_model = importlib.import_module("AnomalyCLIP_lib.build_model")
        model_load = importlib.import_module("AnomalyCLIP_lib.model_load")
        prompt_ensemble = importlib.import_module("prompt_ensemble")
        loss = importlib.import_module("loss")
    finally:
        sys.path.remove(str(root))
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return types.SimpleNamespace(build_model=build_model.build_model,
                                 compute_similarity=model_load.compute_similarity,
                                 get_similarity_map=model_load.get_similarity_map,
                                 PromptLearner=prompt_ensemble.AnomalyCLIP_PromptLearner,
                                 FocalLoss=loss.FocalLoss, BinaryDiceLoss=loss.BinaryDiceLoss)


def _official_steps(off, clip_path: Path, data: Path, steps: int, batch: int, layer: int,
                    dpam_layer: int, size: int = SIZE
                    ) -> tuple[list[tuple[float, float]], dict, dict]:
    """The official train.py: seed, model, DataLoader, prompt learner, V-V replacement, and the
    loop body for `steps` steps, over as many epochs (DataLoader passes, each reshuffled) as that
    takes (CPU; data through the project's loader: the official preprocessing and mask
    semantics, checked by the exporter and eval tests). `size` is the official `--image_size`.
    Also run by `check_train_parity.py`."""
    from train import load_image, load_mask, read_meta, seed_everything

    details = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9,
               "learnabel_text_embedding_length": 4}
    seed_everything(111)
    state = torch.load(clip_path, map_location="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        model = off.build_model("tiny", state, details)
        model.float()
        model.eval()
        items = read_meta(data, "test", False)
        loader = torch.utils.data.DataLoader(range(len(items)), batch_size=batch, shuffle=True)
        learner = off.PromptLearner(model.to("cpu"), details)
        model.visual.DAPM_replace(DPAM_layer=dpam_layer)
    initial = {k: v.clone() for k, v in learner.state_dict().items()}
    optimizer = torch.optim.Adam(list(learner.parameters()), lr=1e-3, betas=(0.5, 0.999))
    focal, dice = off.FocalLoss(), off.BinaryDiceLoss()
    model.eval()
    learner.train()
    records = []
    for indices in itertools.chain.from_iterable(loader for _ in itertools.count()):
        idx = indices.tolist()
        image = torch.from_numpy(np.stack([load_image(items[i], size) for i in idx]))
        label = torch.tensor([int(items[i].anomalous) for i in idx])
        gt = torch.from_numpy(np.stack([load_mask(items[i], size) for i in idx]))
        gt[gt > 0.5] = 1
        gt[gt <= 0.5] = 0
        with torch.no_grad():
            image_features, patch_features = model.encode_image(image, [layer], DPAM_layer=20)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        prompts, tokenized_prompts, compound = learner(cls_id=None)
        text_features = model.encode_text_learn(prompts, tokenized_prompts, compound).float()
        text_features = torch.stack(torch.chunk(text_features, dim=0, chunks=2), dim=1)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        text_probs = image_features.unsqueeze(1) @ text_features.permute(0, 2, 1)
        text_probs = text_probs[:, 0, ...] / 0.07
        image_loss = F.cross_entropy(text_probs.squeeze(), label.long())
        maps = []
        for patch_feature in patch_features:
            patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
            similarity, _ = off.compute_similarity(patch_feature, text_features[0])
            maps.append(off.get_similarity_map(similarity[:, 1:, :], size).permute(0, 3, 1, 2))
        loss = 0
        for m in maps:
            loss += focal(m, gt)
            loss += dice(m[:, 1, :, :], gt)
            loss += dice(m[:, 0, :, :], 1 - gt)
        loss = 4 * loss
        optimizer.zero_grad()
        (loss + image_loss).backward()
        optimizer.step()
        records.append((loss.item(), image_loss.item()))
        if len(records) == steps:
            break
    final = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    return records, initial, final


@pytest.mark.skipif(not (OFFICIAL and (Path(OFFICIAL) / "prompt_ensemble.py").is_file()),
                    reason="set ANOMALYCLIP_OFFICIAL to a checkout of zqhang/AnomalyCLIP")
def test_training_matches_the_official_train_step_for_three_steps(tiny_sources, dataset,
                                                                 tmp_path):
    off = _import_official(Path(OFFICIAL))
    clip_path, _ = tiny_sources
    # the official code derives the head count from the width (width // 64 = 1 for the tiny
    # model); give ours the same architecture
    arch = dataclasses.replace(TINY, vision=dataclasses.replace(TINY.vision, heads=1),
                               text=dataclasses.replace(TINY.text, heads=1))
    dpam = TINY.vision.layers - TINY.vision.vv_start + 2  # V-V on blocks 2..4, like 6..24
    ref, initial, final = _official_steps(off, clip_path, dataset, 3, 4, TINY.vision.layers,
                                          dpam)
    ours_initial = official_initial_learner(arch, load_clip(clip_path).state, 111).state_dict()
    assert list(ours_initial) == list(initial)  # same keys in the same order
    for key, value in initial.items():
        assert ours_initial[key].shape == value.shape and ours_initial[key].dtype == value.dtype
        assert torch.equal(ours_initial[key], value), f"initial {key} differs"
    for cache in (True, False):
        records, state = train(clip_path, dataset, tmp_path / f"ours-{cache}", batch_size=4,
                               cache=cache, max_steps=3, quiet=True, arch_override=arch)
        for (loss, image_loss), rec in zip(ref, records, strict=True):
            assert _max_rel(rec.loss, loss) < 1e-5, (cache, rec, loss)
            assert _max_rel(rec.image_loss, image_loss) < 1e-5, (cache, rec, image_loss)
        for key, value in final.items():
            assert torch.allclose(state[key].to(value.dtype), value, rtol=0, atol=1e-5), key
    assert (final["ctx_pos"] - initial["ctx_pos"]).abs().max() > 1e-4

    # a checkpoint we write loads into the official prompt learner (strict), and the official
    # text side computes from it the text constant our exporter writes
    train(clip_path, dataset, tmp_path / "epoch", epochs=1, batch_size=4, quiet=True,
          arch_override=arch)
    checkpoint = torch.load(tmp_path / "epoch" / "epoch_1.pth")
    details = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9,
               "learnabel_text_embedding_length": 4}
    with contextlib.redirect_stdout(io.StringIO()):
        model = off.build_model("tiny", torch.load(clip_path, map_location="cpu"), details)
        model.float()
        learner = off.PromptLearner(model, details)
    learner.load_state_dict(checkpoint["prompt_learner"], strict=True)
    with torch.no_grad():
        prompts, tokenized, compound = learner(cls_id=None)
        official_text = model.encode_text_learn(prompts, tokenized, compound).float()
        official_text = official_text / official_text.norm(dim=-1, keepdim=True)
    ours_text = compute_text_constant(arch, load_clip(clip_path).state,
                                      load_prompts(tmp_path / "epoch" / "epoch_1.pth", TINY).state)
    assert torch.allclose(ours_text, official_text, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The same step against the project's own reference (always runs; no official checkout needed)
# ------------------------------------------------------------------------------------------------


class _RefModel:
    """The parts of the official model the training step calls, written independently of
    train.py: the text transformer in the official sequence-first layout with PyTorch's
    `F.multi_head_attention_forward`, and the image features of the exporter's reference encoder
    (whose parity with the official inference is checked by the exporter's tests), with a
    class-token row in front as the official `encode_image` returns it."""

    def __init__(self, arch, state: dict, size: int, layer: int) -> None:
        from anomalyclip_ref import VisualEncoder

        self.arch, self.sd = arch, {k: v.float() for k, v in state.items()
                                    if v.is_floating_point()}
        self.encoder = VisualEncoder(arch, self.sd, size, [layer]).eval()
        self.visual = types.SimpleNamespace(DAPM_replace=lambda DPAM_layer: None)

    def float(self):
        return self

    def eval(self):
        return self

    def to(self, device):
        return self

    @torch.no_grad()
    def encode_image(self, image, layers, DPAM_layer=None):  # noqa: N803 - official name
        g, local = self.encoder(image)
        cls = torch.ones_like(local[:, :1])
        return g, [torch.cat([cls, local], dim=1)]

    def encode_text_learn(self, prompts, tokenized, deep):
        t, sd = self.arch.text, self.sd
        x = (prompts + sd["positional_embedding"]).permute(1, 0, 2)  # [77, 2, W]
        mask = torch.full((t.context, t.context), float("-inf")).triu(1)
        for i in range(t.layers):
            p = f"transformer.resblocks.{i}"
            if 1 <= i <= len(deep):
                ctx = deep[i - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2).half()
                x = torch.cat([x[:1], ctx, x[1 + ctx.shape[0]:]], dim=0)
            h = F.layer_norm(x, (t.width,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
            a, _ = F.multi_head_attention_forward(
                h, h, h, t.width, t.heads, sd[f"{p}.attn.in_proj_weight"],
                sd[f"{p}.attn.in_proj_bias"], None, None, False, 0.0,
                sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"],
                need_weights=False, attn_mask=mask)
            x = x + a
            h = F.layer_norm(x, (t.width,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
            h = F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h)
            x = x + F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
        x = F.layer_norm(x.permute(1, 0, 2), (t.width,), sd["ln_final.weight"],
                         sd["ln_final.bias"])
        return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ sd["text_projection"]


class _RefFocal(torch.nn.Module):
    """Focal loss on probabilities, gamma 2, label smoothing 1e-5, alpha 1 (official loss.py)."""

    def forward(self, probs, target):
        c = probs.shape[1]
        p = probs.reshape(probs.shape[0], c, -1).permute(0, 2, 1).reshape(-1, c)
        idx = target.reshape(-1, 1).long()
        one_hot = torch.zeros(idx.shape[0], c).scatter_(1, idx, 1)
        one_hot = torch.clamp(one_hot, 1e-5 / (c - 1), 1.0 - 1e-5)
        pt = (one_hot * p).sum(1) + 1e-5
        return (-1 * torch.ones(idx.shape[0]) * torch.pow(1 - pt, 2) * pt.log()).mean()


class _RefDice(torch.nn.Module):
    def forward(self, pred, target):
        n = target.shape[0]
        inter = (pred.reshape(n, -1) * target.reshape(n, -1)).sum(1)
        coeff = (2 * inter + 1) / (pred.reshape(n, -1).sum(1) + target.reshape(n, -1).sum(1) + 1)
        return 1 - coeff.sum() / n


def _ref_similarity(feats, text):
    b, n, c = feats.shape
    sim = (feats.reshape(b, n, 1, c) * text.reshape(1, 1, -1, c)).sum(-1)
    return (sim / 0.07).softmax(-1), None


def _ref_similarity_map(sm, size):
    side = int(sm.shape[1] ** 0.5)
    sm = sm.reshape(sm.shape[0], side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(sm, size, mode="bilinear").permute(0, 2, 3, 1)


def test_training_matches_an_independent_reference_of_the_official_step_for_three_steps(
        tiny_sources, dataset, tmp_path):
    clip_path, _ = tiny_sources
    layer = TINY.vision.layers

    def build(name, state, details):
        return _RefModel(TINY, state, SIZE, layer)

    def learner(model, details):
        return official_initial_learner(TINY, load_clip(clip_path).state, 111)

    ref_modules = types.SimpleNamespace(
        build_model=build, PromptLearner=lambda m, d: _Adapter(learner(m, d)),
        FocalLoss=_RefFocal, BinaryDiceLoss=_RefDice, compute_similarity=_ref_similarity,
        get_similarity_map=_ref_similarity_map)
    ref, initial, final = _official_steps(ref_modules, clip_path, dataset, 3, 4, layer, 0)
    records, state = train(clip_path, dataset, tmp_path / "ours", batch_size=4, cache=True,
                           max_steps=3, quiet=True)
    for (loss, image_loss), rec in zip(ref, records, strict=True):
        assert _max_rel(rec.loss, loss) < 1e-5, (rec, loss)
        assert _max_rel(rec.image_loss, image_loss) < 1e-5, (rec, image_loss)
    for key, value in final.items():
        assert torch.allclose(state[key].to(value.dtype), value, rtol=0, atol=1e-5), key
    assert (final["ctx_pos"] - initial["ctx_pos"]).abs().max() > 1e-4


class _Adapter(torch.nn.Module):
    """The prompt learner with the official call signature `learner(cls_id=None)`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, cls_id=None):
        return self.inner()

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)


def test_a_resumed_run_writes_the_same_checkpoint_as_an_uninterrupted_one(
        tiny_sources, dataset, tmp_path):
    clip_path, _ = tiny_sources
    straight, _ = train(clip_path, dataset, tmp_path / "straight", epochs=2, batch_size=4,
                        quiet=True)
    train(clip_path, dataset, tmp_path / "split", epochs=1, batch_size=4, quiet=True)
    resumed, _ = train(clip_path, dataset, tmp_path / "split", epochs=2, batch_size=4,
                       quiet=True, resume=True)
    assert [r.epoch for r in resumed] == [2, 2, 2]
    assert [r.loss for r in resumed] == [r.loss for r in straight if r.epoch == 2]
    a = torch.load(tmp_path / "straight" / "epoch_2.pth")["prompt_learner"]
    b = torch.load(tmp_path / "split" / "epoch_2.pth")["prompt_learner"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
