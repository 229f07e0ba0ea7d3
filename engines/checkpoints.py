"""Loading and validation of the two user-supplied files.

Owns: reading the OpenAI CLIP file (TorchScript archive or plain `torch.save` state dict) and the
AnomalyCLIP prompt checkpoint (`{"prompt_learner": state_dict}`), converting every floating tensor
to fp32, recognising the architecture from tensor shapes, and checking every key the exporter uses.
Every problem is raised as an `InputError` whose message is one line naming the file and the key or
shape that was expected.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from anomalyclip_ref import (
    KNOWN_ARCHS,
    N_CTX,
    Arch,
    clip_expected_shapes,
    prompt_expected_shapes,
)


class InputError(Exception):
    """A user-facing, one-line error about an input file or option."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        text = f"{path}: {message}" if path is not None else message
        super().__init__(" ".join(text.split()))  # guarantee a single line


@dataclass
class ClipWeights:
    path: Path
    sha256: str
    arch: Arch
    state: dict[str, Tensor]  # fp32


@dataclass
class PromptWeights:
    path: Path
    sha256: str
    state: dict[str, Tensor]  # fp32 (token ids stay integer)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def _read_torch_file(path: Path, what: str) -> Any:
    """Read a TorchScript archive (its state dict) or a `torch.save` file, on the CPU."""
    if not path.exists():
        raise InputError(path, f"{what} file not found")
    if not path.is_file():
        raise InputError(path, f"{what} path is not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if _is_torchscript_archive(path):
                return torch.jit.load(str(path), map_location="cpu").state_dict()
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - every reader failure is a bad file
            raise InputError(path, f"cannot read the {what} file (corrupt, truncated or not a "
                                   f"PyTorch/TorchScript file): {_first_line(exc)}") from None


def _tensors(raw: Mapping[Any, Any]) -> dict[str, Tensor]:
    return {str(key): value.detach() for key, value in raw.items() if isinstance(value, Tensor)}


def _to_fp32(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """fp16 (or any floating) tensors to fp32; integer tensors unchanged."""
    return {key: value.float() if value.is_floating_point() else value
            for key, value in state.items()}


def _check_keys(path: Path, state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]],
                arch: Arch, key_prefix: str = "") -> None:
    for key, shape in expected.items():
        name = f"{key_prefix}{key}"
        if key not in state:
            raise InputError(path, f"missing key '{name}' (expected shape {_shape(shape)} for "
                                   f"{arch.label})")
        if tuple(state[key].shape) != shape:
            raise InputError(path, f"key '{name}' has shape {_shape(state[key].shape)}, expected "
                                   f"{_shape(shape)} for {arch.label}")


def detect_arch(path: Path, state: Mapping[str, Tensor]) -> Arch:
    key = "visual.conv1.weight"
    real = KNOWN_ARCHS[0]
    expected = _shape(clip_expected_shapes(real)[key])
    if key not in state:
        raise InputError(path, f"missing key '{key}' (expected shape {expected} for {real.label}); "
                               f"not an OpenAI CLIP state dict")
    shape = tuple(state[key].shape)
    for arch in KNOWN_ARCHS:
        if clip_expected_shapes(arch)[key] == shape:
            return arch
    raise InputError(path, f"unsupported CLIP architecture: key '{key}' has shape {_shape(shape)}, "
                           f"expected {expected} ({real.label})")


def validate_clip_state(path: Path, state: Mapping[str, Tensor]) -> Arch:
    arch = detect_arch(path, state)
    _check_keys(path, state, clip_expected_shapes(arch), arch)
    for prefix, layers in (("visual.transformer.resblocks", arch.vision.layers),
                           ("transformer.resblocks", arch.text.layers)):
        extra = f"{prefix}.{layers}.ln_1.weight"
        if extra in state:
            raise InputError(path, f"unexpected key '{extra}': {arch.label} has {layers} blocks in "
                                   f"'{prefix}'")
    for key in clip_expected_shapes(arch):
        if not state[key].is_floating_point():
            raise InputError(path, f"key '{key}' has dtype {state[key].dtype}, expected a floating "
                                   f"point tensor")
    return arch


def load_clip(path: str | Path) -> ClipWeights:
    path = Path(path)
    raw = _read_torch_file(path, "CLIP")
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise InputError(path, f"expected a CLIP state dict (mapping of tensors), found "
                               f"{type(raw).__name__}")
    state = _tensors(raw)
    arch = validate_clip_state(path, state)  # on shapes, before any conversion
    return ClipWeights(path=path, sha256=sha256_file(path), arch=arch, state=_to_fp32(state))


def load_prompts(path: str | Path, arch: Arch) -> PromptWeights:
    path = Path(path)
    raw = _read_torch_file(path, "prompt checkpoint")
    if not isinstance(raw, Mapping) or "prompt_learner" not in raw:
        raise InputError(path, "missing key 'prompt_learner' (expected an AnomalyCLIP checkpoint "
                               "{'prompt_learner': state_dict})")
    learner = raw["prompt_learner"]
    if not isinstance(learner, Mapping):
        raise InputError(path, f"'prompt_learner' is a {type(learner).__name__}, expected a state "
                               f"dict")
    state = _tensors(learner)
    _check_keys(path, state, prompt_expected_shapes(arch), arch, key_prefix="prompt_learner.")
    for tag in ("pos", "neg"):
        key = f"tokenized_prompts_{tag}"
        ids = state[key]
        if ids.is_floating_point() or ids.is_complex():
            raise InputError(path, f"key 'prompt_learner.{key}' has dtype {ids.dtype}, expected "
                                   f"integer token ids")
        eot = int(ids[0, 0].argmax())
        if eot <= N_CTX:
            raise InputError(path, f"key 'prompt_learner.{key}': end-of-text token at position "
                                   f"{eot}, expected after the {N_CTX} context tokens")
        state[key] = ids.long()
    return PromptWeights(path=path, sha256=sha256_file(path), state=_to_fp32(state))
