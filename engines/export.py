#!/usr/bin/env python3
"""AnomalyCLIP model exporter: CLIP file + prompt checkpoint -> model package (PACKAGE.md).

Owns the command line and the package writing: loads and validates the inputs
(`checkpoints.py`), builds the image encoder for the package size and computes the text constant
(`anomalyclip_ref.py`), exports the encoder to ONNX with the TorchScript-based exporter of
`torch.onnx` (`dynamo=False`, opset 17; the last block's plain stream for the class token only,
and with `--fused-attention` each attention as ONNX Runtime's MultiHeadAttention operator: see
`export_graph`), optionally an fp16 copy (`fp16.py`, for GPUs) and an int8
copy (`int8.py`, for CPUs), and writes `text.f32` and `manifest.toml` (whose `precisions` lists the
model files written). It prints each stage (load, trace, save, int8, fp16, hash) with the elapsed
time and the peak memory so far on stdout, so a full-size export (minutes) never looks hung. The package is written into a temporary directory next to the destination and
renamed into place only when complete. Output is deterministic: the same inputs give the same
bytes.

    python engines/export.py --clip ViT-L-14-336px.pt --checkpoint epoch_15.pth --out DIR
    python engines/export.py --tiny --seed 0 --out DIR          # random tiny model, for tests
    python engines/export.py --random-full --seed 0 --out DIR   # random ViT-L/14, for parity runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tomllib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import onnx
import torch
from torch import Tensor

from anomalyclip_ref import (
    MEAN,
    STD,
    TAU,
    TINY,
    VIT_L_14_336,
    Arch,
    ResidualAttentionBlock,
    VisualEncoder,
    compute_text_constant,
)
from checkpoints import (
    ClipWeights,
    InputError,
    PromptWeights,
    load_clip,
    load_prompts,
    sha256_file,
)
from fp16 import convert_float_to_float16
from int8 import quantize_int8
from random_weights import write_random_sources

EXPORTER = "anomalyclip-edge export 0.1.0"
OPSET = 17
FORMAT_VERSION = 1
# ONNX protobufs cannot exceed 2 GiB; above this the weights go to `model.onnx.data`.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


@dataclass
class Prepared:
    """Everything needed to write a package, and the fp32 PyTorch reference of its encoder."""

    clip: ClipWeights
    prompts: PromptWeights
    arch: Arch
    encoder: VisualEncoder
    text: Tensor  # [2, D] float32
    # The head's blocks (manifest `feature_layers`); empty: every encoder output.
    head_layers: tuple[int, ...] = ()
    # Blocks for few-shot reference banks (manifest `few_shot_layers`); empty: none recorded.
    few_shot_layers: tuple[int, ...] = ()
    # Attention as ONNX Runtime's fused MultiHeadAttention operator (manifest `attention`).
    fused_attention: bool = False

    @property
    def size(self) -> int:
        return self.encoder.size


def parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(None, f"--layers: expected comma-separated block numbers, got {text!r}")


def prepare(clip_path: str | Path, checkpoint_path: str | Path, size: int | None = None,
            feature_layers: Sequence[int] | None = None,
            few_shot_layers: Sequence[int] | None = None,
            fused_attention: bool = False) -> Prepared:
    stage(f"load: reading {Path(clip_path).name} and {Path(checkpoint_path).name}")
    clip = load_clip(clip_path)
    arch = clip.arch
    prompts = load_prompts(checkpoint_path, arch)
    size = arch.default_size if size is None else size
    v = arch.vision
    if size <= 0 or size % v.patch != 0:
        raise InputError(None, f"--size {size}: must be a positive multiple of the patch size "
                               f"{v.patch} for {arch.label}")
    layers = list(arch.default_feature_layers if feature_layers is None else feature_layers)
    bad = [layer for layer in layers if not v.vv_start <= layer <= v.layers]
    if not layers or bad:
        raise InputError(None, f"--layers {','.join(map(str, layers))}: feature layers must lie in "
                               f"{v.vv_start}..{v.layers} for {arch.label}")
    few = sorted(set(few_shot_layers or ()))
    bad = [layer for layer in few if not v.vv_start <= layer <= v.layers]
    if bad:
        raise InputError(None, f"--few-shot-layers {','.join(map(str, few))}: layers must lie in "
                               f"{v.vv_start}..{v.layers} for {arch.label}")
    torch.manual_seed(0)
    # Extra few-shot layers are extra outputs of the same graph; the head keeps `layers`.
    encoder = VisualEncoder(arch, clip.state, size, sorted(set(layers) | set(few))).eval()
    text = compute_text_constant(arch, clip.state, prompts.state)
    clip.state = {}  # the encoder holds what it needs; let the text weights go
    stage(f"load: done ({arch.label}, {size} px, text constant computed)")
    return Prepared(clip=clip, prompts=prompts, arch=arch, encoder=encoder, text=text,
                    head_layers=tuple(sorted(set(layers))), few_shot_layers=tuple(few),
                    fused_attention=fused_attention)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------

# Model file of each precision; `precisions` in the manifest lists those written, in this order.
PRECISION_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

_STARTED = time.perf_counter()
PROGRESS = True  # stage lines on stdout; the tests that export in-process leave them on


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def stage(message: str) -> None:
    """One progress line: elapsed seconds since start, peak memory, what starts or ended."""
    if PROGRESS:
        print(f"[{time.perf_counter() - _STARTED:7.1f} s, peak {peak_memory_mb():7.0f} MB] "
              f"{message}", flush=True)


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def _set_output_shapes(model: onnx.ModelProto, encoder: VisualEncoder) -> None:
    """Declare the static output shapes: global [batch, D], local_<l> [batch, G*G, D]."""
    dim = encoder.arch.vision.embed_dim
    tokens = encoder.grid * encoder.grid
    for output in model.graph.output:
        wanted: list[int | str] = ["batch", dim] if output.name == "global" else \
            ["batch", tokens, dim]
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(wanted):
            raise RuntimeError(f"output {output.name} has rank {len(dims)}, expected "
                               f"{len(wanted)}")
        for entry, value in zip(dims, wanted):
            if isinstance(value, str):
                entry.dim_param = value
            else:
                if entry.HasField("dim_value") and entry.dim_value != value:
                    raise RuntimeError(f"output {output.name}: dimension {entry.dim_value}, "
                                       f"expected {value}")
                entry.dim_value = value


class _FusedAttention(torch.autograd.Function):
    """Multi-head attention that exports as ONNX Runtime's ``com.microsoft.MultiHeadAttention``
    (CPU and CUDA kernels; scale 1/sqrt(head size), no mask, no bias): q [B, Nq, W], k, v
    [B, N, W] -> [B, Nq, W], before out_proj. `forward` is the unfused computation, so tracing
    and the PyTorch side stay exact."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:  # noqa: ARG004
        b, width = q.shape[0], q.shape[2]
        d = width // heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], heads, d).transpose(1, 2)

        scores = (split(q) * d ** -0.5) @ split(k).transpose(-2, -1)
        return (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).flatten(2)

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, heads: int) -> Any:
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())
        return out


def _fused_attention(self: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return self.out_proj(_FusedAttention.apply(q, k, v, self.heads))


_PLAIN_ATTENTION = ResidualAttentionBlock._attention


@contextmanager
def export_graph(encoder: VisualEncoder, fused_attention: bool) -> Iterator[None]:
    """The encoder as the exporter traces it (restored afterwards): the last block's plain
    stream for the class token only (the outputs are unchanged: nothing else reads it), and
    with `fused_attention` every image-side attention as one MultiHeadAttention node."""
    encoder.class_only_last = True
    if fused_attention:
        ResidualAttentionBlock._attention = _fused_attention  # type: ignore[method-assign]
    try:
        yield
    finally:
        encoder.class_only_last = False
        ResidualAttentionBlock._attention = _PLAIN_ATTENTION  # type: ignore[method-assign]


def trace_onnx(encoder: VisualEncoder, scratch: Path,
               fused_attention: bool = False) -> onnx.ModelProto:
    """Export `encoder` with torch.onnx's TorchScript-based exporter; return the fp32 graph."""
    names = encoder.output_names
    dynamic_axes: dict[str, dict[int, str]] = {"image": {0: "batch"}}
    dynamic_axes.update({name: {0: "batch"} for name in names})
    dummy = torch.zeros(2, 3, encoder.size, encoder.size)
    scratch.mkdir()
    raw_path = scratch / "raw.onnx"
    stage("trace: exporting the encoder to ONNX (the longest stage at full size)"
          + (", fused attention" if fused_attention else ""))
    with torch.no_grad(), warnings.catch_warnings(), export_graph(encoder, fused_attention):
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (dummy,), str(raw_path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=names, dynamic_axes=dynamic_axes,
                          do_constant_folding=True, export_params=True,
                          custom_opsets={"com.microsoft": 1} if fused_attention else None)
    model = onnx.load(str(raw_path))  # also reads external data, if torch wrote any
    shutil.rmtree(scratch)
    _set_output_shapes(model, encoder)
    model.doc_string = f"AnomalyCLIP image encoder ({encoder.arch.label}, {encoder.size} px)"
    stage(f"trace: done ({len(model.graph.node)} nodes)")
    return model


def save_onnx(model: onnx.ModelProto, destination: Path) -> list[str]:
    """Save (weights in `<name>.data` beyond the protobuf limit); return the file names."""
    weight_bytes = sum(len(init.raw_data) for init in model.graph.initializer)
    stage(f"save: {destination.name} ({weight_bytes / 1e6:.1f} MB of weights)")
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data_name = destination.name + ".data"
        onnx.save_model(model, str(destination), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(destination))
        return [destination.name, data_name]
    onnx.checker.check_model(model)
    onnx.save_model(model, str(destination))
    return [destination.name]


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_table(header: str | None, items: dict[str, Any]) -> Iterator[str]:
    if header is not None:
        yield header
    for key, value in items.items():
        yield f"{_toml_key(key)} = {_toml_value(value)}"


def render_manifest(prep: Prepared, name: str, tiny: bool, files: dict[str, str],
                    seed: int | None) -> str:
    arch, enc = prep.arch, prep.encoder
    v = arch.vision
    n_tokens = enc.grid * enc.grid
    lines: list[str] = []
    precisions = [p for p, file in PRECISION_FILES.items() if file in files]
    lines += _toml_table(None, {"format_version": FORMAT_VERSION, "name": name, "tiny": tiny,
                                "precisions": precisions})
    lines += [""]
    lines += _toml_table("[input]", {"name": "image", "size": enc.size, "mean": list(MEAN),
                                     "std": list(STD)})
    lines += [""]
    lines += _toml_table("[model]", {
        "arch": arch.name, "width": v.width, "layers": v.layers, "heads": v.heads,
        "patch": v.patch, "grid": enc.grid, "embed_dim": v.embed_dim, "vv_start": v.vv_start,
        "feature_layers": list(prep.head_layers or enc.feature_layers), "tau": TAU,
        **({"few_shot_layers": list(prep.few_shot_layers)} if prep.few_shot_layers else {}),
        **({"attention": "fused"} if prep.fused_attention else {})})
    lines += [""]
    lines += _toml_table("[text]", {"file": "text.f32", "shape": [2, v.embed_dim]})
    lines += [""]
    lines += _toml_table("[[outputs]]", {"name": "global", "shape": ["batch", v.embed_dim]})
    for layer in enc.feature_layers:
        lines += _toml_table("[[outputs]]", {"name": f"local_{layer}",
                                             "shape": ["batch", n_tokens, v.embed_dim],
                                             "layer": layer})
    lines += [""]
    lines += _toml_table("[files]", files)
    lines += [""]
    source: dict[str, Any] = {
        "clip_file": prep.clip.path.name, "clip_sha256": prep.clip.sha256,
        "checkpoint_file": prep.prompts.path.name, "checkpoint_sha256": prep.prompts.sha256,
        "exporter": EXPORTER, "torch": torch.__version__.split("+")[0]}
    if seed is not None:
        source["seed"] = seed
    lines += _toml_table("[source]", source)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Package
# --------------------------------------------------------------------------------------------


def check_destination(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(out, "already exists (use --force to replace it)")
        if not out.is_dir():
            raise InputError(out, "exists and is not a directory")


def write_package(prep: Prepared, out: str | Path, *, fp16: bool = False, int8: bool = False,
                  force: bool = False,
                  name: str | None = None, tiny: bool | None = None,
                  seed: int | None = None) -> Path:
    """Write the package for `prep` to `out` atomically (temporary sibling dir, then rename)."""
    out = Path(out).absolute()
    check_destination(out, force)
    tiny = prep.arch.tiny if tiny is None else tiny
    if name is None:
        name = f"anomalyclip-vitl14-{prep.size}" if prep.arch is VIT_L_14_336 else prep.arch.name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model = trace_onnx(prep.encoder, tmp / ".scratch", prep.fused_attention)
        files = save_onnx(model, tmp / "model.onnx")
        text = prep.text.detach().cpu().numpy().astype("<f4")
        (tmp / "text.f32").write_bytes(text.tobytes(order="C"))
        files.append("text.f32")
        if int8:
            stage("int8: dynamic quantization of the MatMul/Gemm weights")
            files += save_onnx(quantize_int8(model), tmp / "model.int8.onnx")
        if fp16:
            stage("fp16: converting the graph (LayerNorm/softmax/L2-norm stay fp32)")
            model = convert_float_to_float16(model)
            model.doc_string += ", fp16 with LayerNorm/softmax/L2-norm in fp32"
            files += save_onnx(model, tmp / "model.fp16.onnx")
        del model
        stage(f"hash: SHA-256 of {len(files)} files")
        hashes = {file: sha256_file(tmp / file) for file in files}
        manifest = render_manifest(prep, name, tiny, hashes, seed)
        (tmp / "manifest.toml").write_text(manifest, encoding="utf-8")
        for file in [*files, "manifest.toml"]:
            with open(tmp / file, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "package")
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_random(arch: Arch, seed: int, out: str | Path, *, size: int | None = None,
                  feature_layers: Sequence[int] | None = None, fp16: bool = False,
                  int8: bool = False, force: bool = False,
                  few_shot_layers: Sequence[int] | None = None,
                  fused_attention: bool = False) -> tuple[Path, Prepared]:
    """Generate random source files for `arch`, then export them through the normal path."""
    check_destination(Path(out).absolute(), force)
    stem = "tiny" if arch is TINY else "random-vitl14"
    with tempfile.TemporaryDirectory(prefix="anomalyclip-src-") as src:
        clip_path, prompt_path = write_random_sources(arch, seed, src, stem)
        prep = prepare(clip_path, prompt_path, size, feature_layers, few_shot_layers,
                       fused_attention)
        name = f"tiny-seed{seed}" if arch is TINY else f"random-vitl14-{prep.size}-seed{seed}"
        path = write_package(prep, out, fp16=fp16, int8=int8, force=force, name=name, tiny=True,
                             seed=seed)
    return path, prep


# --------------------------------------------------------------------------------------------
# New prompts for an existing package
# --------------------------------------------------------------------------------------------


def _rewrite_manifest(text: str, updates: dict[str, dict[str, str]]) -> str:
    """Replace `key = value` lines inside the given tables ("" = top level) of a manifest."""
    lines = text.splitlines()
    table = ""
    pending = {name: dict(keys) for name, keys in updates.items()}
    for n, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped
            continue
        if table in pending and "=" in line:
            key = line.split("=", 1)[0].strip()
            bare = key.strip('"')
            if bare in pending[table]:
                lines[n] = f"{_toml_key(bare)} = {_toml_value(pending[table].pop(bare))}"
    missing = [f"{t} {k}" for t, keys in pending.items() for k in keys]
    if missing:
        raise InputError(None, f"manifest.toml: missing {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def update_text(package: str | Path, clip_path: str | Path, checkpoint_path: str | Path,
                out: str | Path, *, force: bool = False, name: str | None = None) -> Path:
    """Write `out`: `package` with `text.f32` recomputed from a new prompt checkpoint.

    The image model files are hard-linked (copied where links are impossible) after their SHA-256
    is checked against the source manifest; the manifest keeps everything but the text hash, the
    checkpoint's name and hash (and `name` when given). `clip_path` must be the CLIP file the
    package was exported from (its text transformer computes the constant; hash checked).
    """
    package = Path(package)
    out = Path(out).absolute()
    manifest_path = package / "manifest.toml"
    try:
        manifest_text = manifest_path.read_text(encoding="utf-8")
        manifest = tomllib.loads(manifest_text)
        files: dict[str, str] = dict(manifest["files"])
        text_file: str = manifest["text"]["file"]
        text_shape = list(manifest["text"]["shape"])
        clip_sha = manifest["source"]["clip_sha256"]
    except FileNotFoundError:
        raise InputError(manifest_path, "not found (expected a model package directory)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(manifest_path, f"unreadable: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise InputError(manifest_path, f"missing key {exc} (expected a package written by "
                                        f"export.py)") from None
    if text_file not in files:
        raise InputError(manifest_path, f"[files] has no entry for the text file {text_file!r}")
    if package.absolute() == out:
        raise InputError(out, "--out must differ from the package being updated")
    check_destination(out, force)
    clip = load_clip(clip_path)
    if clip.sha256 != clip_sha:
        raise InputError(clip_path, f"SHA-256 {clip.sha256} differs from the package's "
                                    f"source.clip_sha256 {clip_sha}: the text constant must come "
                                    f"from the CLIP file the image model was exported from")
    prompts = load_prompts(checkpoint_path, clip.arch)
    text = compute_text_constant(clip.arch, clip.state, prompts.state)
    if list(text.shape) != text_shape:
        raise InputError(checkpoint_path, f"text constant of shape {list(text.shape)}, the "
                                          f"package expects {text_shape}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for file, expected in files.items():
            if file == text_file:
                continue
            src = package / file
            if not src.is_file():
                raise InputError(src, "listed in the package manifest but missing")
            actual = sha256_file(src)
            if actual != expected:
                raise InputError(src, f"SHA-256 {actual} differs from the manifest ({expected}): "
                                      f"the package is damaged")
            dst = tmp / file
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        data = text.detach().cpu().numpy().astype("<f4").tobytes(order="C")
        (tmp / text_file).write_bytes(data)
        updates: dict[str, dict[str, str]] = {
            "[files]": {text_file: sha256_file(tmp / text_file)},
            "[source]": {"checkpoint_file": prompts.path.name,
                         "checkpoint_sha256": prompts.sha256}}
        if name is not None:
            updates[""] = {"name": name}
        new_manifest = _rewrite_manifest(manifest_text, updates)
        (tmp / "manifest.toml").write_text(new_manifest, encoding="utf-8")
        for file in (text_file, "manifest.toml"):
            with open(tmp / file, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "package")
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export.py", description="Export AnomalyCLIP (CLIP ViT-L/14@336px + prompt "
                                      "checkpoint) to an anomalyclip-edge model package.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--clip", type=Path, help="OpenAI CLIP ViT-L-14-336px.pt (TorchScript "
                                                  "archive or torch.save state dict)")
    source.add_argument("--tiny", action="store_true",
                        help="generate a tiny random-weight model (tests only)")
    source.add_argument("--random-full", action="store_true",
                        help="generate a random-weight ViT-L/14@336px (parity checks only)")
    parser.add_argument("--checkpoint", type=Path, help="AnomalyCLIP prompt checkpoint "
                                                        "(epoch_15.pth)")
    parser.add_argument("--out", type=Path, required=True, help="package directory to write")
    parser.add_argument("--size", type=int, help="input edge in pixels (default 518; tiny: 112)")
    parser.add_argument("--layers", help="feature blocks, comma-separated (default 24; tiny: 4)")
    parser.add_argument("--fused-attention", action="store_true",
                        help="export each attention as ONNX Runtime's fused MultiHeadAttention "
                             "operator (CPU and CUDA execution providers; 5-6 %% faster on a CPU "
                             "at full size; not for TensorRT); recorded as attention = \"fused\"")
    parser.add_argument("--few-shot-layers", help="also output these blocks' local features for "
                        "few-shot reference banks, comma-separated (e.g. 6,12,18,24; the head "
                        "still uses --layers); recorded as few_shot_layers in the manifest")
    parser.add_argument("--fp16", action="store_true",
                        help="also write model.fp16.onnx (CUDA GPUs: precision fp16)")
    parser.add_argument("--int8", action="store_true",
                        help="also write model.int8.onnx (CPUs: precision int8; ONNX Runtime "
                             "dynamic quantization of the MatMul/Gemm weights)")
    parser.add_argument("--quiet", action="store_true", help="no stage lines, only the summary")
    parser.add_argument("--force", action="store_true", help="replace an existing package")
    parser.add_argument("--seed", type=int, default=0, help="seed for --tiny/--random-full")
    parser.add_argument("--name", help="package name in the manifest")
    parser.add_argument("--update-text", type=Path, metavar="PACKAGE",
                        help="write --out as PACKAGE with the text constant of --checkpoint "
                             "(needs the --clip PACKAGE was exported from; reuses model.onnx)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    global PROGRESS, _STARTED
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore")
    started = _STARTED = time.perf_counter()
    PROGRESS = not args.quiet
    try:
        layers = parse_layers(args.layers)
        few_shot = parse_layers(args.few_shot_layers) if args.few_shot_layers else None
        out: Path = args.out
        if args.update_text is not None:
            if args.clip is None or args.checkpoint is None:
                raise InputError(None, "--update-text needs --clip (the CLIP file the package was "
                                       "exported from) and --checkpoint")
            if args.size is not None or layers is not None or args.fp16:
                raise InputError(None, "--update-text keeps the package's image model: "
                                       "--size, --layers and --fp16 do not apply")
            update_text(args.update_text, args.clip, args.checkpoint, out, force=args.force,
                        name=args.name)
            print(f"wrote {out} (text constant from {args.checkpoint}, image model of "
                  f"{args.update_text}) in {time.perf_counter() - started:.1f} s")
            return 0
        if args.clip is not None:
            if args.checkpoint is None:
                raise InputError(None, "--checkpoint is required with --clip")
            check_destination(out.absolute(), args.force)
            prep = prepare(args.clip, args.checkpoint, args.size, layers, few_shot,
                           args.fused_attention)
            write_package(prep, out, fp16=args.fp16, int8=args.int8, force=args.force,
                          name=args.name)
        else:
            if args.checkpoint is not None:
                raise InputError(None, "--checkpoint is only used with --clip")
            arch = TINY if args.tiny else VIT_L_14_336
            _, prep = export_random(arch, args.seed, out, size=args.size, feature_layers=layers,
                                    fp16=args.fp16, int8=args.int8, force=args.force,
                                    few_shot_layers=few_shot,
                                    fused_attention=args.fused_attention)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory while exporting", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback on request
        if os.environ.get("ANOMALYCLIP_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: export failed: {type(exc).__name__}: {first} "
              f"(set ANOMALYCLIP_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB"
                      for p in sorted(Path(out).iterdir()))
    print(f"wrote {out} ({prep.arch.label}, {prep.size} px, layers "
          f"{list(prep.encoder.feature_layers)}; {sizes}) in {elapsed:.1f} s, peak memory "
          f"{peak_memory_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
