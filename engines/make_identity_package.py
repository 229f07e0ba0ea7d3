#!/usr/bin/env python3
"""Write the identity model package `tests/fixtures/identity/` (run from anywhere):

    /tmp/setup/venv/bin/python engines/make_identity_package.py [--out DIR]

A package in the format of `engines/PACKAGE.md` whose ONNX graph costs next to nothing: it lets a
benchmark measure the daemon around the model (capture, preprocessing, batching, head, masks,
MQTT) rather than the model. Input `image` float32 [B, 3, 112, 112]; outputs of the right shapes,
computed from the input so that they change with the picture:

* `global` [B, 32]: the per-channel mean over the pixels ([B, 3], ReduceMean), tiled to [B, 33],
  sliced to [B, 32], L2-normalised;
* `local_1` [B, 64, 32]: the first 64 × 32 input values (a reshaped slice), L2-normalised per row.

With `--nan-when-dark` (default `--out tests/fixtures/nan_when_dark/`) the global feature is the
square root of the channel means before the normalisation: NaN for an image whose channel means
are negative after mean/std normalisation (a dark one, e.g. black), finite for a bright one (e.g.
white). It stands for a model that emits NaN on some inputs (tests/head_non_finite.rs).

Size 112, patch 14, grid 8, D = 32 (the tiny package's shapes). `text.f32` is two random unit
rows (seed 0). `tiny = true`: the scores mean nothing. Needs `onnx` and `numpy` only; checked with
`onnxruntime` when it is installed. Deterministic: running it twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SIZE, PATCH, GRID, DIM, LAYER = 112, 14, 8, 32, 1
OPSET = 17
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _l2norm(x: str, out: str, nodes: list, inits: list) -> None:
    """out = x / (||x||₂ over the last axis + 1e-6)."""
    inits.append(numpy_helper.from_array(np.asarray(1e-6, dtype=np.float32), f"{out}_eps"))
    nodes += [
        helper.make_node("ReduceL2", [x], [f"{out}_n"], axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{out}_n", f"{out}_eps"], [f"{out}_d"]),
        helper.make_node("Div", [x, f"{out}_d"], [out]),
    ]


def build_model(nan_when_dark: bool = False) -> onnx.ModelProto:
    nodes: list = []
    inits: list = [
        _i64("tile_repeats", [1, (DIM + 2) // 3]),
        _i64("zero", [0]),
        _i64("dim", [DIM]),
        _i64("axis1", [1]),
        _i64("flat_shape", [0, -1]),
        _i64("local_len", [GRID * GRID * DIM]),
        _i64("local_shape", [0, GRID * GRID, DIM]),
    ]
    # global: channel means → [B, 3] → tile → [B, 33] → [B, 32] → unit rows.
    nodes += [
        helper.make_node("ReduceMean", ["image"], ["chan_mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Tile", ["chan_mean", "tile_repeats"], ["tiled"]),
        helper.make_node("Slice", ["tiled", "zero", "dim", "axis1"], ["global_raw"]),
    ]
    if nan_when_dark:
        nodes.append(helper.make_node("Sqrt", ["global_raw"], ["global_sqrt"]))
        _l2norm("global_sqrt", "global", nodes, inits)
    else:
        _l2norm("global_raw", "global", nodes, inits)
    # local: the first G·G·D values of each image → [B, G·G, D] → unit rows.
    nodes += [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "zero", "local_len", "axis1"], ["local_flat"]),
        helper.make_node("Reshape", ["local_flat", "local_shape"], ["local_raw"]),
    ]
    _l2norm("local_raw", f"local_{LAYER}", nodes, inits)
    graph = helper.make_graph(
        nodes,
        "identity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("global", TensorProto.FLOAT, ["batch", DIM]),
            helper.make_tensor_value_info(
                f"local_{LAYER}", TensorProto.FLOAT, ["batch", GRID * GRID, DIM]
            ),
        ],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="anomalyclip-edge make_identity_package",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def text_constant() -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(0))
    t = rng.standard_normal((2, DIM)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(files: dict[str, str], name: str = "identity-112") -> str:
    f = lambda v: ", ".join(repr(x) for x in v)  # noqa: E731
    hashes = "\n".join(f'"{k}" = "{v}"' for k, v in sorted(files.items()))
    return f"""format_version = 1
name = "{name}"
tiny = true

[input]
name = "image"
size = {SIZE}
mean = [{f(MEAN)}]
std = [{f(STD)}]

[model]
arch = "identity"
width = {DIM}
layers = {LAYER}
heads = 1
patch = {PATCH}
grid = {GRID}
embed_dim = {DIM}
vv_start = 1
feature_layers = [{LAYER}]
tau = 0.07

[text]
file = "text.f32"
shape = [2, {DIM}]

[[outputs]]
name = "global"
shape = ["batch", {DIM}]
[[outputs]]
name = "local_{LAYER}"
shape = ["batch", {GRID * GRID}, {DIM}]
layer = {LAYER}

[files]
{hashes}

[source]
exporter = "anomalyclip-edge make_identity_package.py"
seed = 0
"""


def check_nan_when_dark(path: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: output check skipped")
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mean = np.asarray(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = np.stack([np.zeros((3, SIZE, SIZE)), np.ones((3, SIZE, SIZE))]).astype(np.float32)
    g, loc = sess.run(None, {"image": (pixels - mean) / std})
    assert np.isnan(g[0]).all() and np.isfinite(g[1]).all(), g
    assert np.isfinite(loc).all()
    print(f"onnxruntime {ort.__version__}: global NaN for black, finite for white")


def check_with_onnxruntime(path: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: output check skipped")
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.Generator(np.random.PCG64(1)).standard_normal((3, 3, SIZE, SIZE))
    g, loc = sess.run(None, {"image": x.astype(np.float32)})
    assert g.shape == (3, DIM) and loc.shape == (3, GRID * GRID, DIM), (g.shape, loc.shape)
    assert np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(loc, axis=2), 1, atol=1e-4)
    first = x[0].reshape(-1)[: GRID * GRID * DIM].reshape(GRID * GRID, DIM)
    expected = first / np.linalg.norm(first, axis=1, keepdims=True)
    assert np.allclose(loc[0], expected, atol=1e-4), "local is not the normalised input slice"
    print(f"onnxruntime {ort.__version__}: outputs {g.shape} and {loc.shape}, unit rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--nan-when-dark",
        action="store_true",
        help="global feature NaN for dark images (a model that emits NaN)",
    )
    args = ap.parse_args()
    nan = args.nan_when_dark
    default = "nan_when_dark" if nan else "identity"
    out: Path = args.out or REPO / "tests" / "fixtures" / default
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(nan), out / "model.onnx")
    (out / "text.f32").write_bytes(text_constant().astype("<f4").tobytes())
    files = {name: sha256(out / name) for name in ("model.onnx", "text.f32")}
    name = "nan-when-dark-112" if nan else "identity-112"
    (out / "manifest.toml").write_text(manifest(files, name))
    if nan:
        check_nan_when_dark(out / "model.onnx")
    else:
        check_with_onnxruntime(out / "model.onnx")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
