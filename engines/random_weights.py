"""Random-weight CLIP state dicts and prompt checkpoints with the real files' structure.

Owns the synthetic inputs used by `--tiny` and `--random-full` (spec §8): a CLIP state dict in
OpenAI's naming and dtypes (linear/conv/attention/projection weights fp16, LayerNorm and embeddings
fp32, plus the `input_resolution`/`context_length`/`vocab_size` entries of the TorchScript file) and
an AnomalyCLIP checkpoint `{"prompt_learner": ...}` whose prefix/suffix embeddings are taken from the
random token table like the real prompt learner does.

Numbers come from numpy's PCG64 generator so that a seed gives the same weights on every machine.
These weights are for wiring and tests only, never for real detection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from anomalyclip_ref import (
    DEEP_PROMPT_TOKENS,
    N_CTX,
    N_DEEP_PROMPTS,
    Arch,
    block_expected_shapes,
    prompt_token_ids,
)


class _Normal:
    def __init__(self, seed: int, stream: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64([seed, stream]))

    def __call__(self, shape: tuple[int, ...], std: float, mean: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> Tensor:
        values = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if mean:
            values += np.float32(mean)
        return torch.from_numpy(values).to(dtype)


def _blocks(normal: _Normal, sd: dict[str, Tensor], prefix: str, width: int, layers: int) -> None:
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    half = torch.float16
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        shapes = block_expected_shapes(p, width)
        sd[f"{p}.attn.in_proj_weight"] = normal(shapes[f"{p}.attn.in_proj_weight"], attn_std,
                                                dtype=half)
        sd[f"{p}.attn.in_proj_bias"] = normal((3 * width,), 0.02, dtype=half)
        sd[f"{p}.attn.out_proj.weight"] = normal((width, width), proj_std, dtype=half)
        sd[f"{p}.attn.out_proj.bias"] = normal((width,), 0.02, dtype=half)
        sd[f"{p}.ln_1.weight"] = normal((width,), 0.1, mean=1.0)
        sd[f"{p}.ln_1.bias"] = normal((width,), 0.05)
        sd[f"{p}.mlp.c_fc.weight"] = normal((4 * width, width), fc_std, dtype=half)
        sd[f"{p}.mlp.c_fc.bias"] = normal((4 * width,), 0.02, dtype=half)
        sd[f"{p}.mlp.c_proj.weight"] = normal((width, 4 * width), proj_std, dtype=half)
        sd[f"{p}.mlp.c_proj.bias"] = normal((width,), 0.02, dtype=half)
        sd[f"{p}.ln_2.weight"] = normal((width,), 0.1, mean=1.0)
        sd[f"{p}.ln_2.bias"] = normal((width,), 0.05)


def make_clip_state_dict(arch: Arch, seed: int) -> dict[str, Tensor]:
    v, t = arch.vision, arch.text
    normal = _Normal(seed, 0)
    half = torch.float16
    sd: dict[str, Tensor] = {}
    scale = v.width ** -0.5
    sd["visual.conv1.weight"] = normal((v.width, 3, v.patch, v.patch),
                                       (3 * v.patch * v.patch) ** -0.5, dtype=half)
    sd["visual.class_embedding"] = normal((v.width,), scale)
    sd["visual.positional_embedding"] = normal((v.native_grid ** 2 + 1, v.width), scale)
    sd["visual.ln_pre.weight"] = normal((v.width,), 0.1, mean=1.0)
    sd["visual.ln_pre.bias"] = normal((v.width,), 0.05)
    _blocks(normal, sd, "visual.transformer", v.width, v.layers)
    sd["visual.ln_post.weight"] = normal((v.width,), 0.1, mean=1.0)
    sd["visual.ln_post.bias"] = normal((v.width,), 0.05)
    sd["visual.proj"] = normal((v.width, v.embed_dim), scale, dtype=half)

    sd["positional_embedding"] = normal((t.context, t.width), 0.01)
    sd["text_projection"] = normal((t.width, t.embed_dim), t.width ** -0.5, dtype=half)
    sd["logit_scale"] = torch.tensor(float(np.log(1 / 0.07)))
    sd["token_embedding.weight"] = normal((t.vocab, t.width), 0.02)
    _blocks(normal, sd, "transformer", t.width, t.layers)
    sd["ln_final.weight"] = normal((t.width,), 0.1, mean=1.0)
    sd["ln_final.bias"] = normal((t.width,), 0.05)
    sd["input_resolution"] = torch.tensor(arch.native_size)
    sd["context_length"] = torch.tensor(t.context)
    sd["vocab_size"] = torch.tensor(t.vocab)
    return sd


def make_prompt_checkpoint(arch: Arch, clip_sd: dict[str, Tensor], seed: int) -> dict[str, object]:
    t = arch.text
    normal = _Normal(seed, 1)
    table = clip_sd["token_embedding.weight"].float()
    learner: dict[str, Tensor] = {}
    for tag, anomalous in (("pos", False), ("neg", True)):
        ids = torch.tensor(prompt_token_ids(anomalous, t.context), dtype=torch.int64)
        embedded = table[ids]  # [77, W]
        learner[f"ctx_{tag}"] = normal((1, 1, N_CTX, t.width), 0.3)
        learner[f"token_prefix_{tag}"] = embedded[None, None, :1].clone()
        learner[f"token_suffix_{tag}"] = embedded[None, None, 1 + N_CTX:].clone()
        learner[f"tokenized_prompts_{tag}"] = ids[None, None].clone()
    for i in range(N_DEEP_PROMPTS):
        learner[f"compound_prompts_text.{i}"] = normal((DEEP_PROMPT_TOKENS, t.width), 0.3)
    projected = t.width + t.width // 6  # the real file has 896 for width 768; unused at inference
    for i in range(N_DEEP_PROMPTS):
        learner[f"compound_prompt_projections.{i}.weight"] = normal((projected, t.width), 0.02)
        learner[f"compound_prompt_projections.{i}.bias"] = normal((projected,), 0.02)
    return {"prompt_learner": learner}


def write_random_sources(arch: Arch, seed: int, directory: str | Path,
                         stem: str) -> tuple[Path, Path]:
    """Save a random CLIP file and prompt checkpoint; return their paths."""
    directory = Path(directory)
    clip_sd = make_clip_state_dict(arch, seed)
    clip_path = directory / f"{stem}-clip-seed{seed}.pt"
    prompt_path = directory / f"{stem}-prompts-seed{seed}.pth"
    torch.save(clip_sd, clip_path)
    torch.save(make_prompt_checkpoint(arch, clip_sd, seed), prompt_path)
    return clip_path, prompt_path
