#!/usr/bin/env python3
"""Train AnomalyCLIP prompts (the official `train.py` semantics) with a frozen-feature cache.

Owns prompt training: reads a dataset from its meta.json (ours or the official generators'),
initialises the prompt learner, runs the optimisation and writes `epoch_N.pth` checkpoints in the
official format (`{"prompt_learner": state_dict}`), which `export.py` (and the official `test.py`)
read.

Semantics (official `train.py`, zqhang/AnomalyCLIP at 45ed4dd, re-implemented here on top of
`anomalyclip_ref.py`):
* frozen CLIP (ViT-L/14@336px or the tiny test model) with the V-V path; only the prompt learner
  trains: 12 context tokens per prompt ("X*12 object." / "X*12 damaged object."), 8 deep prompts
  of 4 tokens for text blocks 1..8 (depth 9), cast to fp16 and back as the official code does
  (their gradients come back rounded to fp16);
* loss = 4 x sum over feature layers [focal(map, mask) + dice(map_abnormal, mask) +
  dice(map_normal, 1 - mask)] + cross-entropy(global logits / 0.07, label); masks resized
  bilinearly to the input size and binarised at 0.5; Adam lr 1e-3, betas (0.5, 0.999); batch 8;
  15 epochs; 518 px; feature layer 24; seed 111;
* like the official loop, the images come from `meta["test"]` (the official Dataset is built
  without a mode); `--split train` picks the other list;
* random stream: model construction, prompt-learner construction, V-V replacement, then the
  DataLoader's shuffle draw from one seeded generator in that order (`official_initial_learner`),
  so the same seed gives the official initial prompts and batch order.

Deliberate differences: a last batch of one image is handled as a batch (the official code
squeezes it into a wrong shape and fails); an anomalous image without a mask file is an error
(the official loader trains it silently with an all-zero mask) unless `--image-loss-only`, which
drops the map loss for every image.

Faster than the official loop, same result: the image encoder is frozen and there is no
augmentation, so global and patch features are computed once per image and kept in an on-disk,
memory-mapped cache (`FeatureCache`; fp32, or fp16 with `--cache-dtype f16`) keyed by a
fingerprint of the CLIP file, size, layers and every image and mask file's bytes. Each step then
runs only the text encoder, the head and the loss. `--no-cache` runs the image encoder every
step, as the official loop does.

Failure modes: a missing/invalid meta.json, image or mask gives one line on stderr naming the file
and exit status 2 before any training; training errors exit 1. Resume: `--resume` continues from
`train_state.pt` in the output directory (optimizer and random state included, so a resumed run
gives the same checkpoints as an uninterrupted one).

    python engines/train.py --clip ViT-L-14-336px.pt --data DATASET_ROOT --out checkpoints/mine
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from anomalyclip_ref import (
    DEEP_PROMPT_TOKENS,
    N_CTX,
    N_DEEP_PROMPTS,
    TAU,
    Arch,
    LayerNorm,
    ResidualAttentionBlock,
    VisualEncoder,
    preprocess_file,
    prompt_token_ids,
)
from checkpoints import InputError, load_clip, sha256_file

LAMBDA = 4.0
LR = 1e-3
BETAS = (0.5, 0.999)
PROJECTION_WIDTH = 896  # official `nn.Linear(ctx_dim, 896)` (unused in the forward pass)
CACHE_FORMAT = 1
STATE_FILE = "train_state.pt"


# --------------------------------------------------------------------------------------------
# Dataset (meta.json)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    image: Path
    mask: Path | None  # None: normal image, or anomalous without a mask file
    anomalous: bool
    cls_name: str


def read_meta(root: Path, split: str, image_loss_only: bool) -> list[Item]:
    """The images of `meta[split]` in the official order (classes in file order)."""
    meta_path = root / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(meta_path, "not found (expected the dataset's meta.json; write one with "
                                    "`anomalyclip-edge dataset-meta`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(meta_path, f"unreadable: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get(split), dict):
        raise InputError(meta_path, f"expected an object with a '{split}' object of classes")
    items: list[Item] = []
    missing_masks: list[str] = []
    for cls_name, entries in meta[split].items():
        if not isinstance(entries, list):
            raise InputError(meta_path, f"{split}.{cls_name}: expected a list of images")
        for n, entry in enumerate(entries):
            where = f"{split}.{cls_name}[{n}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("img_path"), str):
                raise InputError(meta_path, f"{where}: expected an object with 'img_path'")
            anomaly = entry.get("anomaly")
            if anomaly not in (0, 1, True, False):
                raise InputError(meta_path, f"{where}.anomaly: expected 0 or 1, got {anomaly!r}")
            image = root / entry["img_path"]
            if not image.is_file():
                raise InputError(image, f"image listed in {meta_path} ({where}) not found")
            mask: Path | None = None
            if anomaly:
                mask_rel = entry.get("mask_path") or ""
                candidate = root / mask_rel if isinstance(mask_rel, str) else None
                if candidate is not None and mask_rel and candidate.is_file():
                    mask = candidate
                else:
                    missing_masks.append(f"{where} {entry['img_path']}")
            items.append(Item(image, mask, bool(anomaly), str(cls_name)))
    if not items:
        raise InputError(meta_path, f"'{split}' lists no images")
    if missing_masks and not image_loss_only:
        raise InputError(meta_path, f"{len(missing_masks)} anomalous image(s) have no mask file "
                                    f"(first: {missing_masks[0]}); the map loss needs masks: "
                                    f"add them, or train on labels alone with --image-loss-only")
    return items


def load_mask(item: Item, size: int) -> np.ndarray:
    """[size, size] float32 0/1, as the official loader and `gt > 0.5` make it."""
    if item.mask is None:
        return np.zeros((size, size), np.float32)
    try:
        with Image.open(item.mask) as image:
            binary = (np.asarray(image.convert("L")) > 0).astype(np.uint8) * 255
    except (OSError, ValueError) as exc:
        raise InputError(item.mask, f"unreadable mask: {exc}") from None
    resized = Image.fromarray(binary).resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(resized, np.float32) / np.float32(255.0) > 0.5).astype(np.float32)


def load_image(item: Item, size: int) -> np.ndarray:
    try:
        return preprocess_file(item.image, size)
    except (OSError, ValueError) as exc:
        raise InputError(item.image, f"unreadable image: {exc}") from None


# --------------------------------------------------------------------------------------------
# Prompt learner (official state-dict layout) and the official random stream
# --------------------------------------------------------------------------------------------


class PromptLearner(nn.Module):
    """The trainable prompts with the official key names and shapes.

    forward() -> prompts [2, 77, W] (normal, anomalous) and the 8 deep prompts [4, W].
    """

    def __init__(self, arch: Arch, token_embedding: Tensor, ctx_pos: Tensor, ctx_neg: Tensor,
                 deep: Sequence[Tensor], projection: nn.Linear) -> None:
        super().__init__()
        width = arch.text.width
        self.compound_prompts_text = nn.ParameterList(nn.Parameter(d.clone()) for d in deep)
        self.compound_prompt_projections = nn.ModuleList(
            copy.deepcopy(projection) for _ in range(N_DEEP_PROMPTS))
        self.ctx_pos = nn.Parameter(ctx_pos.clone())
        self.ctx_neg = nn.Parameter(ctx_neg.clone())
        ids = {tag: torch.tensor(prompt_token_ids(anomalous, arch.text.context),
                                 dtype=torch.int32)
               for tag, anomalous in (("pos", False), ("neg", True))}
        for tag in ("pos", "neg"):  # the official registration order of the buffers
            embedded = token_embedding.float()[ids[tag].long()]
            self.register_buffer(f"token_prefix_{tag}", embedded[None, None, :1].clone())
            self.register_buffer(f"token_suffix_{tag}", embedded[None, None, 1 + N_CTX:].clone())
        for tag in ("pos", "neg"):
            self.register_buffer(f"tokenized_prompts_{tag}", ids[tag][None, None].clone())
        assert self.ctx_pos.shape == (1, 1, N_CTX, width)

    def forward(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        pos = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)
        neg = torch.cat([self.token_prefix_neg, self.ctx_neg, self.token_suffix_neg], dim=2)
        prompts = torch.cat([pos.flatten(0, 1), neg.flatten(0, 1)], dim=0)
        ids = torch.cat([self.tokenized_prompts_pos.flatten(0, 1),
                         self.tokenized_prompts_neg.flatten(0, 1)], dim=0)
        return prompts, ids, list(self.compound_prompts_text)


def seed_everything(seed: int) -> None:
    """The official `setup_seed`."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _consume_block(width: int) -> None:
    nn.MultiheadAttention(width, 1)
    nn.LayerNorm(width)
    nn.Linear(width, 4 * width)
    nn.Linear(4 * width, width)
    nn.LayerNorm(width)


def _consume_model_construction(arch: Arch) -> None:
    """Draw what building the official AnomalyCLIP model draws, in its order, and throw it away.

    The random values are overwritten by the CLIP weights, but they advance the generator; the
    count depends only on the shapes, so heads do not matter.
    """
    v, t = arch.vision, arch.text
    nn.Conv2d(3, v.width, v.patch, v.patch, bias=False)
    torch.randn(v.width)
    torch.randn(v.native_grid ** 2 + 1, v.width)
    for _ in range(v.layers):
        _consume_block(v.width)
    torch.randn(v.width, v.embed_dim)
    for _ in range(t.layers):
        _consume_block(t.width)
    nn.Embedding(t.vocab, t.width)
    # initialize_parameters()
    torch.empty(t.vocab, t.width).normal_(std=0.02)
    torch.empty(t.context, t.width).normal_(std=0.01)
    for _ in range(t.layers):
        torch.empty(3 * t.width, t.width).normal_()
        torch.empty(t.width, t.width).normal_()
        torch.empty(4 * t.width, t.width).normal_()
        torch.empty(t.width, 4 * t.width).normal_()
    torch.empty(t.width, t.embed_dim).normal_()


def official_initial_learner(arch: Arch, clip_state: dict[str, Tensor], seed: int) -> PromptLearner:
    """The prompt learner the official `train.py` starts from for `seed`; leaves the generator
    where the official code has it when its DataLoader first shuffles."""
    seed_everything(seed)
    _consume_model_construction(arch)
    width = arch.text.width
    ctx_pos = torch.empty(1, 1, N_CTX, width)
    ctx_neg = torch.empty(1, 1, N_CTX, width)
    nn.init.normal_(ctx_pos, std=0.02)
    nn.init.normal_(ctx_neg, std=0.02)
    deep = [torch.empty(DEEP_PROMPT_TOKENS, width) for _ in range(N_DEEP_PROMPTS)]
    for d in deep:
        nn.init.normal_(d, std=0.02)
    projection = nn.Linear(width, PROJECTION_WIDTH)
    learner = PromptLearner(arch, clip_state["token_embedding.weight"], ctx_pos, ctx_neg, deep,
                            projection)
    # DAPM_replace(DPAM_layer=20) builds one V-V attention module per block 6..24 (19 of them);
    # for another depth, one per block from vv_start on
    for _ in range(arch.vision.layers - arch.vision.vv_start + 1):
        nn.Linear(arch.vision.width, 3 * arch.vision.width, bias=True)
        nn.Linear(arch.vision.width, arch.vision.width)
    return learner


# --------------------------------------------------------------------------------------------
# Text encoder with gradients to the prompts
# --------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """CLIP text transformer (frozen) taking learned prompt embeddings -> [2, D] L2-normalised."""

    def __init__(self, arch: Arch, clip_state: dict[str, Tensor]) -> None:
        super().__init__()
        t = arch.text
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(clip_state, f"transformer.resblocks.{i}", t.heads)
            for i in range(t.layers))
        self.ln_final = LayerNorm(clip_state["ln_final.weight"], clip_state["ln_final.bias"])
        self.positional_embedding = nn.Parameter(clip_state["positional_embedding"].float(),
                                                 requires_grad=False)
        self.text_projection = nn.Parameter(clip_state["text_projection"].float(),
                                            requires_grad=False)
        self.register_buffer("mask", torch.full((t.context, t.context), float("-inf")).triu(1))

    def forward(self, prompts: Tensor, ids: Tensor, deep: Sequence[Tensor]) -> Tensor:
        x = prompts + self.positional_embedding
        n = x.shape[0]
        for index, block in enumerate(self.blocks):
            if 1 <= index <= len(deep):
                # as the official block: expand, then cast to fp16 (gradients round per prompt)
                ctx = deep[index - 1].expand(n, -1, -1).half()
                x = torch.cat([x[:, :1], ctx, x[:, 1 + ctx.shape[1]:]], dim=1)
            x = block(x, self.mask)
        x = self.ln_final(x)
        feats = x[torch.arange(n, device=x.device), ids.argmax(dim=-1)] @ self.text_projection
        return feats / feats.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Losses (official loss.py semantics)
# --------------------------------------------------------------------------------------------


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """probs [B, C, H, W] (already probabilities), target [B, H, W] in {0, 1}."""
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    one_hot = F.one_hot(target.reshape(-1).long(), c).to(p.dtype)
    one_hot = one_hot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - mean over the batch of (2 sum(p t) + 1) / (sum p + sum t + 1)."""
    n = target.shape[0]
    p, t = pred.reshape(n, -1), target.reshape(n, -1)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / n


def losses(text: Tensor, global_feats: Tensor, patch_feats: Sequence[Tensor], labels: Tensor,
           masks: Tensor | None, size: int) -> tuple[Tensor, Tensor]:
    """(map loss x 4, image loss) of one batch; the map loss is 0 when `masks` is None."""
    logits = global_feats @ text.T / TAU
    image_loss = F.cross_entropy(logits, labels)
    map_loss = logits.new_zeros(())
    if masks is None:
        return map_loss, image_loss
    for feats in patch_feats:
        feats = feats / feats.norm(dim=-1, keepdim=True)
        probs = (feats @ text.T / TAU).softmax(-1)  # [B, N, 2]
        grid = math.isqrt(probs.shape[1])
        probs = probs.reshape(-1, grid, grid, 2).permute(0, 3, 1, 2)
        up = F.interpolate(probs, (size, size), mode="bilinear", align_corners=False)
        map_loss = map_loss + focal_loss(up, masks)
        map_loss = map_loss + dice_loss(up[:, 1], masks)
        map_loss = map_loss + dice_loss(up[:, 0], 1 - masks)
    return LAMBDA * map_loss, image_loss


# --------------------------------------------------------------------------------------------
# Features: the official way (encoder every step) or the cache
# --------------------------------------------------------------------------------------------


class EncoderFeatures:
    """Runs the frozen image encoder on every batch (the official loop's cost)."""

    def __init__(self, encoder: VisualEncoder, items: Sequence[Item], device: torch.device):
        self.encoder, self.items, self.device = encoder, items, device

    @torch.no_grad()
    def batch(self, indices: Sequence[int]) -> tuple[Tensor, list[Tensor], Tensor]:
        size = self.encoder.size
        images = torch.from_numpy(np.stack([load_image(self.items[i], size) for i in indices]))
        out = self.encoder(images.to(self.device))
        masks = torch.from_numpy(np.stack([load_mask(self.items[i], size) for i in indices]))
        return out[0], list(out[1:]), masks.to(self.device)


class FeatureCache:
    """Per-image global + patch features and binarised masks in memory-mapped files.

    Layout in DIR: `cache.json` (fingerprint, shapes, dtype), `features.bin` [N, L*T + 1, D]
    (row 0 the global feature, then T patch rows per feature layer), `masks.bin` [N, S, S] uint8.
    The fingerprint covers the CLIP file's SHA-256, size, layers, dtype and the SHA-256 of every
    image and mask file, in order; any change rebuilds the cache.
    """

    def __init__(self, directory: Path, encoder: VisualEncoder, clip_sha256: str,
                 items: Sequence[Item], dtype: str, device: torch.device,
                 progress: "Progress | None" = None) -> None:
        self.dir = directory
        self.size = encoder.size
        self.layers = len(encoder.feature_layers)
        self.tokens = encoder.grid * encoder.grid
        self.dim = encoder.arch.vision.embed_dim
        self.np_dtype = np.float16 if dtype == "f16" else np.float32
        self.device = device
        fingerprint = self._fingerprint(encoder, clip_sha256, items, dtype)
        meta_path = directory / "cache.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        self.reused = bool(meta and meta.get("fingerprint") == fingerprint)
        if not self.reused:
            self._build(encoder, items, fingerprint, dtype, progress)
        rows = self.layers * self.tokens + 1
        self.features = np.memmap(directory / "features.bin", dtype=self.np_dtype, mode="r",
                                  shape=(len(items), rows, self.dim))
        self.masks = np.memmap(directory / "masks.bin", dtype=np.uint8, mode="r",
                               shape=(len(items), self.size, self.size))

    def _fingerprint(self, encoder: VisualEncoder, clip_sha256: str, items: Sequence[Item],
                     dtype: str) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps({"format": CACHE_FORMAT, "clip": clip_sha256,
                                  "size": encoder.size, "layers": list(encoder.feature_layers),
                                  "dtype": dtype}).encode())
        for item in items:
            digest.update(sha256_file(item.image).encode())
            digest.update(sha256_file(item.mask).encode() if item.mask else b"-")
        return digest.hexdigest()

    @torch.no_grad()
    def _build(self, encoder: VisualEncoder, items: Sequence[Item], fingerprint: str, dtype: str,
               progress: "Progress | None") -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cache.json").unlink(missing_ok=True)  # invalid until complete
        rows = self.layers * self.tokens + 1
        n = len(items)
        need = n * (rows * self.dim * np.dtype(self.np_dtype).itemsize + self.size * self.size)
        old = sum(f.stat().st_size for f in (self.dir / "features.bin", self.dir / "masks.bin")
                  if f.is_file())
        free = shutil.disk_usage(self.dir).free + old
        if need > free:
            raise InputError(self.dir, f"the feature cache needs {need / 1e9:.1f} GB, "
                                       f"{free / 1e9:.1f} GB free (use --cache-dir elsewhere, "
                                       f"--cache-dtype f16, or --no-cache)")
        features = np.memmap(self.dir / "features.bin", dtype=self.np_dtype, mode="w+",
                         shape=(n, rows, self.dim))
        masks = np.memmap(self.dir / "masks.bin", dtype=np.uint8, mode="w+",
                          shape=(n, self.size, self.size))
        batch = 8
        for start in range(0, n, batch):
            chunk = range(start, min(start + batch, n))
            images = torch.from_numpy(np.stack([load_image(items[i], self.size) for i in chunk]))
            out = encoder(images.to(self.device))
            block = torch.cat([out[0][:, None], *out[1:]], dim=1).cpu().numpy()
            features[start:start + len(chunk)] = block.astype(self.np_dtype)
            for i in chunk:
                masks[i] = load_mask(items[i], self.size).astype(np.uint8)
            if progress:
                progress.cache_step(min(start + batch, n), n)
        features.flush()
        masks.flush()
        del features, masks
        (self.dir / "cache.json").write_text(json.dumps({
            "fingerprint": fingerprint, "images": n, "rows": rows, "dim": self.dim,
            "size": self.size, "dtype": dtype}, indent=1) + "\n")

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, list[Tensor], Tensor]:
        idx = np.asarray(indices)
        block = torch.from_numpy(np.ascontiguousarray(self.features[idx])).float()
        block = block.to(self.device)
        patches = [block[:, 1 + k * self.tokens:1 + (k + 1) * self.tokens]
                   for k in range(self.layers)]
        masks = torch.from_numpy(self.masks[idx].astype(np.float32)).to(self.device)
        return block[:, 0], patches, masks

    @property
    def bytes_per_image(self) -> int:
        rows = self.layers * self.tokens + 1
        return rows * self.dim * np.dtype(self.np_dtype).itemsize + self.size * self.size


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------


class Progress:
    """One status line (rewritten in place on a terminal) with the epoch, step, losses, ETA."""

    def __init__(self, total_steps: int, quiet: bool = False) -> None:
        self.total = total_steps
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self.last = 0.0

    def _emit(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r" + text.ljust(100) + ("\n" if final else ""))
            sys.stderr.flush()
        elif final or time.monotonic() - self.last > 30:
            self.last = time.monotonic()
            print(text, file=sys.stderr, flush=True)

    def cache_step(self, done: int, total: int) -> None:
        self._emit(f"caching features {done}/{total}", final=done == total)

    def step(self, epoch: int, epochs: int, step: int, steps: int, loss: float,
             image_loss: float) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        self._emit(f"epoch {epoch}/{epochs} step {step}/{steps} loss {loss:.4f} "
                   f"image_loss {image_loss:.4f} ETA {_hms(eta)}", final=step == steps)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class StepRecord:
    epoch: int
    step: int
    loss: float  # the 4 x map loss, as the official log
    image_loss: float
    seconds: float = 0.0  # wall time of the step, features included


def train(clip_path: Path, data: Path, out: Path, *, epochs: int = 15, batch_size: int = 8,
          size: int | None = None, layers: Sequence[int] | None = None, seed: int = 111,
          split: str = "test", image_loss_only: bool = False, cache: bool = True,
          cache_dir: Path | None = None, cache_dtype: str = "f32", device: str = "cpu",
          resume: bool = False, max_steps: int | None = None, quiet: bool = False,
          initial: dict[str, Tensor] | None = None,
          arch_override: Arch | None = None) -> tuple[list[StepRecord], dict[str, Tensor]]:
    """Train and write `out/epoch_N.pth`; return the per-step losses of this run and the final
    prompt-learner state.

    `max_steps` stops after that many optimizer steps (tests); `initial` replaces the learner's
    initial parameters (after the random stream has advanced as usual); `arch_override` replaces
    the detected architecture by one with the same shapes (tests: other head counts).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device cuda: no CUDA device is available to PyTorch")
    items = read_meta(data, split, image_loss_only)
    clip = load_clip(clip_path)
    arch = clip.arch if arch_override is None else arch_override
    size = arch.default_size if size is None else size
    layers = list(arch.default_feature_layers if layers is None else layers)
    if size <= 0 or size % arch.vision.patch:
        raise InputError(None, f"--size {size}: must be a positive multiple of "
                               f"{arch.vision.patch}")
    bad = [lay for lay in layers if not arch.vision.vv_start <= lay <= arch.vision.layers]
    if bad:
        raise InputError(None, f"--layers {bad}: must lie in {arch.vision.vv_start}.."
                               f"{arch.vision.layers} for {arch.label}")
    out.mkdir(parents=True, exist_ok=True)

    learner = official_initial_learner(arch, clip.state, seed)
    if initial is not None:
        learner.load_state_dict(initial)
    learner.to(dev)
    text_encoder = TextEncoder(arch, clip.state).to(dev)
    encoder = VisualEncoder(arch, clip.state, size, layers).eval().to(dev)
    clip.state = {}
    optimizer = torch.optim.Adam(list(learner.parameters()), lr=LR, betas=BETAS)
    loader = torch.utils.data.DataLoader(range(len(items)), batch_size=batch_size, shuffle=True)

    first_epoch = 0
    state_path = out / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise InputError(state_path, "not found: nothing to resume (run without --resume)")
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved.get("items") != len(items) or saved.get("seed") != seed:
            raise InputError(state_path, "was written for another dataset or seed")
        learner.load_state_dict(saved["prompt_learner"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        np.random.set_state(saved["numpy_rng"])
        random.setstate(saved["python_rng"])
        first_epoch = int(saved["epoch"])

    steps_per_epoch = len(loader)
    progress = Progress((epochs - first_epoch) * steps_per_epoch, quiet)
    if cache:
        directory = cache_dir if cache_dir is not None else out / "feature-cache"
        source: EncoderFeatures | FeatureCache = FeatureCache(
            directory, encoder, clip.sha256, items, cache_dtype, dev, progress)
        del encoder
    else:
        source = EncoderFeatures(encoder, items, dev)
    labels_all = torch.tensor([int(it.anomalous) for it in items])

    records: list[StepRecord] = []
    learner.train()
    for epoch in range(first_epoch, epochs):
        loss_list, image_loss_list = [], []
        for step, indices in enumerate(loader, start=1):
            step_started = time.perf_counter()
            idx = indices.tolist()
            global_feats, patch_feats, masks = source.batch(idx)
            prompts, ids, deep = learner()
            text = text_encoder(prompts, ids, deep)
            map_loss, image_loss = losses(text, global_feats, patch_feats,
                                          labels_all[idx].to(dev),
                                          None if image_loss_only else masks, size)
            optimizer.zero_grad()
            (map_loss + image_loss).backward()
            optimizer.step()
            loss_list.append(map_loss.item())
            image_loss_list.append(image_loss.item())
            records.append(StepRecord(epoch + 1, step, loss_list[-1], image_loss_list[-1],
                                      time.perf_counter() - step_started))
            progress.step(epoch + 1, epochs, step, steps_per_epoch, loss_list[-1],
                          image_loss_list[-1])
            if max_steps is not None and len(records) >= max_steps:
                return records, _detached(learner)
        line = (f"epoch [{epoch + 1}/{epochs}], loss:{np.mean(loss_list):.4f}, "
                f"image_loss:{np.mean(image_loss_list):.4f}")
        with open(out / "log.txt", "a", encoding="utf-8") as log:
            log.write(line + "\n")
        _save_atomic({"prompt_learner": learner.state_dict()}, out / f"epoch_{epoch + 1}.pth")
        _save_atomic({"prompt_learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                      "epoch": epoch + 1, "items": len(items), "seed": seed,
                      "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                      "python_rng": random.getstate()}, state_path)
    return records, _detached(learner)


def _detached(learner: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}


def _save_atomic(obj: object, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train AnomalyCLIP prompts "
                                "(official train.py semantics) with a frozen-feature cache.")
    p.add_argument("--clip", type=Path, required=True, help="CLIP ViT-L-14-336px.pt (or tiny)")
    p.add_argument("--data", type=Path, required=True, help="dataset root holding meta.json")
    p.add_argument("--out", type=Path, required=True, help="directory for epoch_N.pth, log.txt")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="meta.json list to train on (default test, as the official loop)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, help="input edge (default 518; tiny: 112)")
    p.add_argument("--layers", help="feature blocks, comma-separated (default 24; tiny: 4)")
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--image-loss-only", action="store_true",
                   help="train on image labels alone (for datasets without masks)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the image encoder every step (the official loop's cost)")
    p.add_argument("--cache-dir", type=Path, help="feature cache (default OUT/feature-cache)")
    p.add_argument("--cache-dtype", choices=("f32", "f16"), default="f32")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        if args.epochs < 1 or args.batch_size < 1:
            raise InputError(None, "--epochs and --batch-size must be at least 1")
        layers = None
        if args.layers:
            try:
                layers = [int(x) for x in args.layers.split(",") if x.strip()]
            except ValueError:
                raise InputError(None, f"--layers: expected comma-separated block numbers, got "
                                       f"{args.layers!r}") from None
        started = time.monotonic()
        train(args.clip, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
              size=args.size, layers=layers, seed=args.seed, split=args.split,
              image_loss_only=args.image_loss_only, cache=not args.no_cache,
              cache_dir=args.cache_dir, cache_dtype=args.cache_dtype, device=args.device,
              resume=args.resume)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback on request
        if os.environ.get("ANOMALYCLIP_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: training failed: {type(exc).__name__}: {first} "
              f"(set ANOMALYCLIP_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/epoch_{args.epochs}.pth in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
