"""PyTorch reference implementation of AnomalyCLIP inference.

This module owns the maths of AnomalyCLIP inference as the official code (zqhang/AnomalyCLIP)
computes it; `PACKAGE.md` states what the exported package and the runtime compute:

* the supported architectures (ViT-L/14@336px and the tiny test model) and the tensor shapes
  that identify them (`Arch`, `KNOWN_ARCHS`);
* the image encoder: a CLIP ViT with the V-V (DPAM) side path, producing the L2-normalised global
  feature and the local features of each requested block (`VisualEncoder`); the same module is the
  eager fp32 reference and the graph handed to the ONNX exporter;
* the positional-embedding resize baked for the package size (`resize_positional_embedding`);
* the CLIP text transformer with learned context and deep compound prompts, evaluated once to give
  the constant T = [t_n; t_a] (`compute_text_constant`);
* the preprocessing of image files exactly like the reference (`preprocess_file`);
* the anomaly head: score, patch probabilities, bilinear upsampling, Gaussian smoothing
  (`anomaly_head`).

Weights are plain ``dict[str, torch.Tensor]`` in OpenAI's CLIP naming, already converted to fp32
(see `checkpoints.py` for loading and validation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
TAU: float = 0.07
GAUSSIAN_SIGMA: float = 4.0
GAUSSIAN_TRUNCATE: float = 4.0
LN_EPS: float = 1e-5

# CLIP BPE ids of the two object-agnostic prompts (spec §2).
SOT_TOKEN = 49406
EOT_TOKEN = 49407
PLACEHOLDER_TOKEN = 343  # "X"
N_CTX = 12
NORMAL_PROMPT_TAIL = (14115, 269)  # "object", "."
ANOMALOUS_PROMPT_TAIL = (13568, 14115, 269)  # "damaged", "object", "."
N_DEEP_PROMPTS = 8  # compound prompts for text blocks 1..8 (0-based)
DEEP_PROMPT_TOKENS = 4


@dataclass(frozen=True)
class VisionArch:
    width: int
    layers: int
    heads: int
    patch: int
    native_grid: int  # side of the patch grid of the positional table stored in the CLIP file
    embed_dim: int
    vv_start: int  # first block (1-based) with the V-V side path


@dataclass(frozen=True)
class TextArch:
    width: int
    layers: int
    heads: int
    context: int
    vocab: int
    embed_dim: int


@dataclass(frozen=True)
class Arch:
    name: str  # manifest `arch`
    label: str  # human-readable name used in messages
    vision: VisionArch
    text: TextArch
    default_size: int
    default_feature_layers: tuple[int, ...]
    tiny: bool

    @property
    def native_size(self) -> int:
        return self.vision.native_grid * self.vision.patch


VIT_L_14_336 = Arch(
    name="ViT-L/14",
    label="ViT-L/14@336px",
    vision=VisionArch(width=1024, layers=24, heads=16, patch=14, native_grid=24, embed_dim=768,
                      vv_start=6),
    text=TextArch(width=768, layers=12, heads=12, context=77, vocab=49408, embed_dim=768),
    default_size=518,
    default_feature_layers=(24,),
    tiny=False,
)

# The tiny test model (spec §8). Its CLIP file holds a 6x6 positional grid (84 px) so that the
# positional-embedding resize to the 8x8 package grid (112 px) is exercised like 24x24 -> 37x37.
TINY = Arch(
    name="tiny",
    label="tiny test model",
    vision=VisionArch(width=64, layers=4, heads=4, patch=14, native_grid=6, embed_dim=32,
                      vv_start=2),
    text=TextArch(width=64, layers=10, heads=4, context=77, vocab=49408, embed_dim=32),
    default_size=112,
    default_feature_layers=(4,),
    tiny=True,
)

KNOWN_ARCHS: tuple[Arch, ...] = (VIT_L_14_336, TINY)


def clip_expected_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every CLIP state-dict key the exporter reads, with its expected shape."""
    v, t = arch.vision, arch.text
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (v.width, 3, v.patch, v.patch),
        "visual.class_embedding": (v.width,),
        "visual.positional_embedding": (v.native_grid * v.native_grid + 1, v.width),
        "visual.ln_pre.weight": (v.width,),
        "visual.ln_pre.bias": (v.width,),
        "visual.ln_post.weight": (v.width,),
        "visual.ln_post.bias": (v.width,),
        "visual.proj": (v.width, v.embed_dim),
        "positional_embedding": (t.context, t.width),
        "ln_final.weight": (t.width,),
        "ln_final.bias": (t.width,),
        "text_projection": (t.width, t.embed_dim),
    }
    for prefix, width, layers in (("visual.transformer", v.width, v.layers),
                                  ("transformer", t.width, t.layers)):
        for i in range(layers):
            shapes.update(block_expected_shapes(f"{prefix}.resblocks.{i}", width))
    return shapes


def block_expected_shapes(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.attn.in_proj_weight": (3 * width, width),
        f"{prefix}.attn.in_proj_bias": (3 * width,),
        f"{prefix}.attn.out_proj.weight": (width, width),
        f"{prefix}.attn.out_proj.bias": (width,),
        f"{prefix}.ln_1.weight": (width,),
        f"{prefix}.ln_1.bias": (width,),
        f"{prefix}.mlp.c_fc.weight": (4 * width, width),
        f"{prefix}.mlp.c_fc.bias": (4 * width,),
        f"{prefix}.mlp.c_proj.weight": (width, 4 * width),
        f"{prefix}.mlp.c_proj.bias": (width,),
        f"{prefix}.ln_2.weight": (width,),
        f"{prefix}.ln_2.bias": (width,),
    }


def prompt_expected_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every prompt-learner key used at inference, with its expected shape."""
    t = arch.text
    suffix_len = t.context - 1 - N_CTX
    shapes: dict[str, tuple[int, ...]] = {}
    for tag in ("pos", "neg"):
        shapes[f"ctx_{tag}"] = (1, 1, N_CTX, t.width)
        shapes[f"token_prefix_{tag}"] = (1, 1, 1, t.width)
        shapes[f"token_suffix_{tag}"] = (1, 1, suffix_len, t.width)
        shapes[f"tokenized_prompts_{tag}"] = (1, 1, t.context)
    for i in range(N_DEEP_PROMPTS):
        shapes[f"compound_prompts_text.{i}"] = (DEEP_PROMPT_TOKENS, t.width)
    return shapes


def prompt_token_ids(anomalous: bool, context: int = 77) -> list[int]:
    """Token ids of the normal (`X*12 object.`) or anomalous (`X*12 damaged object.`) prompt."""
    tail = ANOMALOUS_PROMPT_TAIL if anomalous else NORMAL_PROMPT_TAIL
    ids = [SOT_TOKEN] + [PLACEHOLDER_TOKEN] * N_CTX + list(tail) + [EOT_TOKEN]
    return ids + [0] * (context - len(ids))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _frozen(t: Tensor) -> nn.Parameter:
    """A constant parameter (shares memory with `t` when it is already fp32 and contiguous)."""
    return nn.Parameter(t.detach().float().contiguous(), requires_grad=False)


def l2_normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class LayerNorm(nn.Module):
    """CLIP's LayerNorm (eps 1e-5)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = _frozen(weight)
        self.bias = _frozen(bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.weight.shape[0],), self.weight, self.bias, LN_EPS)


class Linear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = _frozen(weight)
        self.bias = _frozen(bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class ResidualAttentionBlock(nn.Module):
    """A pre-LN CLIP block (multi-head attention + QuickGELU MLP), with the V-V side path."""

    def __init__(self, sd: Mapping[str, Tensor], prefix: str, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = LayerNorm(sd[f"{prefix}.ln_1.weight"], sd[f"{prefix}.ln_1.bias"])
        self.in_proj = Linear(sd[f"{prefix}.attn.in_proj_weight"], sd[f"{prefix}.attn.in_proj_bias"])
        self.out_proj = Linear(sd[f"{prefix}.attn.out_proj.weight"],
                               sd[f"{prefix}.attn.out_proj.bias"])
        self.ln_2 = LayerNorm(sd[f"{prefix}.ln_2.weight"], sd[f"{prefix}.ln_2.bias"])
        self.c_fc = Linear(sd[f"{prefix}.mlp.c_fc.weight"], sd[f"{prefix}.mlp.c_fc.bias"])
        self.c_proj = Linear(sd[f"{prefix}.mlp.c_proj.weight"], sd[f"{prefix}.mlp.c_proj.bias"])
        self.width = int(self.in_proj.weight.shape[1])
        self.scale = (self.width // heads) ** -0.5

    def _heads(self, t: Tensor) -> Tensor:  # [B, N, W] -> [B, H, N, W/H]
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.width // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(t: Tensor) -> Tensor:  # [B, H, N, W/H] -> [B, N, W]
        return t.transpose(1, 2).flatten(2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        return self.out_proj(self._merge(scores.softmax(dim=-1) @ v))

    def _attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Multi-head attention of q [B, Nq, W] over k, v [B, N, W], through out_proj: [B, Nq, W].

        The one place the exporter replaces (``export.py --fused-attention`` emits ONNX
        Runtime's MultiHeadAttention here); unmasked (the image side)."""
        return self._attend(self._heads(q), self._heads(k), self._heads(v), None)

    def _mlp(self, x: Tensor) -> Tensor:
        h = self.c_fc(self.ln_2(x))
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        return self.c_proj(h)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = self.in_proj(self.ln_1(x)).split(self.width, dim=-1)
        if mask is None:
            x = x + self._attention(q, k, v)
        else:  # the text side (causal mask)
            x = x + self._attend(self._heads(q), self._heads(k), self._heads(v), mask)
        return x + self._mlp(x)

    def forward_dual(self, o: Tensor, v_stream: Tensor | None) -> tuple[Tensor, Tensor]:
        """Plain block on `o` plus the V-V attention (q = k = v) added to the side stream.

        The side stream starts as the block's input `o` at the first V-V block, has no MLP, and
        never feeds back into `o`.
        """
        q, k, v = self.in_proj(self.ln_1(o)).split(self.width, dim=-1)
        o_next = o + self._attention(q, k, v)
        o_next = o_next + self._mlp(o_next)
        vv = self._attention(v, v, v)
        v_next = (o if v_stream is None else v_stream) + vv
        return o_next, v_next

    def forward_dual_class_only(self, o: Tensor, v_stream: Tensor | None) -> tuple[Tensor, Tensor]:
        """`forward_dual` for the encoder's last block, whose plain stream is read only at the
        class token afterwards (the global feature): that stream's attention, out_proj and MLP
        run for the class token's query only ([B, 1, W]); the side stream is computed in full.
        Equal to ``forward_dual(o, v_stream)`` with its first output cut to ``[:, :1]``."""
        q, k, v = self.in_proj(self.ln_1(o)).split(self.width, dim=-1)
        o_cls = o[:, :1] + self._attention(q[:, :1], k, v)
        o_cls = o_cls + self._mlp(o_cls)
        vv = self._attention(v, v, v)
        v_next = (o if v_stream is None else v_stream) + vv
        return o_cls, v_next


def resize_positional_embedding(pos: Tensor, grid: int) -> Tensor:
    """Resize the patch part of a [1 + s*s, W] table to [1 + grid*grid, W].

    Bilinear, align_corners=False, no antialias; the class-token entry is kept.
    """
    n, width = pos.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(f"positional table of {n} rows is not 1 + a square")
    if side == grid:
        return pos.clone()
    patches = pos[1:].reshape(1, side, side, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
    patches = patches[0].reshape(width, grid * grid).transpose(0, 1)
    return torch.cat([pos[:1], patches], dim=0)


# --------------------------------------------------------------------------------------------
# Image encoder
# --------------------------------------------------------------------------------------------


class VisualEncoder(nn.Module):
    """CLIP ViT with the V-V side path, for one fixed square input size.

    forward(image [B, 3, S, S] float32) -> (global [B, D], local_<l> [B, G*G, D] for each feature
    layer l in ascending order); all outputs float32 and L2-normalised per token.
    """

    def __init__(self, arch: Arch, sd: Mapping[str, Tensor], size: int,
                 feature_layers: Sequence[int]) -> None:
        super().__init__()
        v = arch.vision
        if size % v.patch != 0:
            raise ValueError(f"input size {size} is not a multiple of the patch size {v.patch}")
        layers = sorted(set(int(layer) for layer in feature_layers))
        if not layers or layers[0] < v.vv_start or layers[-1] > v.layers:
            raise ValueError(f"feature layers must lie in {v.vv_start}..{v.layers} "
                             f"(blocks with the V-V path), got {list(feature_layers)}")
        self.arch = arch
        self.size = size
        self.grid = size // v.patch
        self.patch = v.patch
        self.vv_start = v.vv_start
        self.feature_layers: tuple[int, ...] = tuple(layers)
        # The exporter sets this: the last block computes the plain stream for the class token
        # only (ResidualAttentionBlock.forward_dual_class_only); the outputs do not change.
        self.class_only_last = False

        self.conv1 = _frozen(sd["visual.conv1.weight"])
        self.class_embedding = _frozen(sd["visual.class_embedding"])
        self.positional_embedding = _frozen(
            resize_positional_embedding(sd["visual.positional_embedding"].float(), self.grid))
        self.ln_pre = LayerNorm(sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(sd, f"visual.transformer.resblocks.{i}", v.heads)
            for i in range(v.layers))
        self.ln_post = LayerNorm(sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        self.proj = _frozen(sd["visual.proj"])

    @property
    def output_names(self) -> list[str]:
        return ["global"] + [f"local_{layer}" for layer in self.feature_layers]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        x = F.conv2d(image, self.conv1, stride=self.patch)  # [B, W, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, W], row-major over the grid
        cls = self.class_embedding + torch.zeros_like(x[:, :1, :])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        v_stream: Tensor | None = None
        local_feats: list[Tensor] = []
        for index, block in enumerate(self.blocks, start=1):
            if index < self.vv_start:
                x = block(x)
            elif self.class_only_last and index == len(self.blocks):
                x, v_stream = block.forward_dual_class_only(x, v_stream)
            else:
                x, v_stream = block.forward_dual(x, v_stream)
            if index in self.feature_layers:
                assert v_stream is not None
                local = self.ln_post(v_stream)[:, 1:1 + self.grid * self.grid, :] @ self.proj
                local_feats.append(l2_normalize(local))
        global_feat = l2_normalize(x[:, 0, :] @ self.proj)
        return (global_feat, *local_feats)


# --------------------------------------------------------------------------------------------
# Text side: a constant
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_text_constant(arch: Arch, clip_sd: Mapping[str, Tensor],
                          prompt_sd: Mapping[str, Tensor]) -> Tensor:
    """T = [t_n; t_a] as a [2, D] float32 tensor, each row L2-normalised (spec §2)."""
    t = arch.text
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same summation order on every run
    try:
        blocks = [ResidualAttentionBlock(clip_sd, f"transformer.resblocks.{i}", t.heads)
                  for i in range(t.layers)]
        embeddings = []
        eot = []
        for tag in ("pos", "neg"):  # row 0: normal prompt, row 1: anomalous prompt
            embeddings.append(torch.cat([prompt_sd[f"token_prefix_{tag}"][0, 0],
                                         prompt_sd[f"ctx_{tag}"][0, 0],
                                         prompt_sd[f"token_suffix_{tag}"][0, 0]], dim=0))
            eot.append(int(prompt_sd[f"tokenized_prompts_{tag}"][0, 0].argmax()))
        x = torch.stack(embeddings).float() + clip_sd["positional_embedding"].float()
        mask = torch.full((t.context, t.context), float("-inf")).triu(1)
        n_deep = DEEP_PROMPT_TOKENS
        for index, block in enumerate(blocks):
            if 1 <= index <= N_DEEP_PROMPTS:
                deep = prompt_sd[f"compound_prompts_text.{index - 1}"].half().float()
                x = torch.cat([x[:, :1], deep.expand(x.shape[0], -1, -1), x[:, 1 + n_deep:]], dim=1)
            x = block(x, mask)
        ln_final = LayerNorm(clip_sd["ln_final.weight"], clip_sd["ln_final.bias"])
        x = ln_final(x)
        feats = x[torch.arange(2), torch.tensor(eot)] @ clip_sd["text_projection"].float()
        return l2_normalize(feats).contiguous()
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def preprocess_pil(image: Image.Image, size: int) -> np.ndarray:
    """Resize in the image's own mode (bicubic), convert to RGB, scale, normalise: [3, S, S]."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    arr = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(MEAN, dtype=np.float32)
    std = np.asarray(STD, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def preprocess_file(path: str | Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return preprocess_pil(image, size)


# --------------------------------------------------------------------------------------------
# Anomaly head
# --------------------------------------------------------------------------------------------


@dataclass
class HeadOutput:
    score: float
    patch: np.ndarray  # [G, G] anomaly probabilities of the first feature layer
    map_raw: np.ndarray  # [S, S] summed upsampled maps, before the Gaussian
    map: np.ndarray  # [S, S] final map

    @property
    def map_max(self) -> float:
        return float(self.map.max())


@torch.no_grad()
def anomaly_head(global_feat: Tensor | np.ndarray, local_feats: Sequence[Tensor | np.ndarray],
                 text: Tensor | np.ndarray, size: int, tau: float = TAU) -> HeadOutput:
    """Score and map of one image, following the reference (two-class softmax at 1/tau).

    global_feat [D]; local_feats: one [G*G, D] per feature layer; text [2, D].
    """
    g = torch.as_tensor(global_feat, dtype=torch.float32)
    t = torch.as_tensor(text, dtype=torch.float32)
    score = float(((g @ t.T) / tau).softmax(-1)[1])
    maps = []
    first_patch: np.ndarray | None = None
    for feats in local_feats:
        f = torch.as_tensor(feats, dtype=torch.float32)
        grid = math.isqrt(f.shape[0])
        probs = ((f @ t.T) / tau).softmax(-1)  # [N, 2]
        probs = probs.reshape(grid, grid, 2).permute(2, 0, 1)[None]  # [1, 2, G, G]
        if first_patch is None:
            first_patch = probs[0, 1].numpy().copy()
        up = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)[0]
        maps.append((up[1] + 1 - up[0]) / 2)
    assert first_patch is not None
    map_raw = torch.stack(maps).sum(0).numpy().astype(np.float32)
    smoothed = scipy.ndimage.gaussian_filter(map_raw, sigma=GAUSSIAN_SIGMA,
                                             truncate=GAUSSIAN_TRUNCATE, mode="reflect")
    return HeadOutput(score=score, patch=first_patch, map_raw=map_raw,
                      map=smoothed.astype(np.float32))


def anomaly_head_sigmoid(global_feat: np.ndarray, local_feats: Sequence[np.ndarray],
                         text: np.ndarray, size: int, tau: float = TAU) -> HeadOutput:
    """The runtime's formulation (PACKAGE.md): w = (t_a - t_n)/tau, sigmoid of dot products.

    Equal to `anomaly_head` up to rounding; kept to check that equivalence.
    """
    w = (np.asarray(text[1], np.float64) - np.asarray(text[0], np.float64)) / tau
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    score = float(sig(np.asarray(global_feat, np.float64) @ w))
    total = None
    first_patch = None
    for feats in local_feats:
        grid = math.isqrt(feats.shape[0])
        p = sig(np.asarray(feats, np.float64) @ w).reshape(grid, grid)
        if first_patch is None:
            first_patch = p.astype(np.float32)
        up = F.interpolate(torch.from_numpy(p)[None, None], size=(size, size), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        total = up if total is None else total + up
    assert total is not None and first_patch is not None
    smoothed = scipy.ndimage.gaussian_filter(total, sigma=GAUSSIAN_SIGMA,
                                             truncate=GAUSSIAN_TRUNCATE, mode="reflect")
    return HeadOutput(score=score, patch=first_patch, map_raw=total.astype(np.float32),
                      map=smoothed.astype(np.float32))
