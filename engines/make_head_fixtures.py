#!/usr/bin/env python3
"""Reference fixtures for the CPU head and the Pillow-exact resampler.

Writes, from fixed seeds (re-running gives the same bytes):

  tests/fixtures/head/    index.json + raw little-endian float32 / uint8 files:
      kernel     scipy's Gaussian weights (sigma 4, truncate 4), float64 -> float32
      upsample   torch F.interpolate(bilinear, align_corners=False) in float64
      blur       scipy.ndimage.gaussian_filter(sigma=4, truncate=4, mode="reflect") in float64
      patch      sigmoid(<t/|t|, w>) and the image score, float64
      full       the official head in float32 (torch + scipy), several layers

  tests/fixtures/resize/  index.json + data.bin (entries are [offset, length] into it): Pillow `Image.resize` of small random images
      (L, La, RGB, RGBa as raw channels; RGBA, LA, P, 1 through Pillow's own mode handling, then
      convert("RGB") the way the reference preprocessing does), and a large generated frame whose
      output is only stored as a SHA-256.

  tests/fixtures/images/  small PNG/JPEG/BMP files in every mode (files/), hostile ones (bad/), and in
      index.json + data.bin what Pillow makes of them: mode, pixels, convert("RGB"), and
      resize(...).convert("RGB") as the reference preprocessing does.

Large outputs are stored as a sub-grid (`rows` x `cols` of the full result) to keep the fixtures small.

Usage: engines/make_head_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import scipy
import scipy.ndimage
import torch
import torch.nn.functional as F
import PIL
from PIL import Image


def sub_rows(n: int, edge: int = 20) -> list[int]:
    """Indices kept for a sub-grid: every index near both borders and every `step`-th one."""
    step = max(7, n // 80)
    keep = set(range(min(edge, n))) | set(range(max(0, n - edge), n)) | set(range(0, n, step))
    return sorted(keep)


class Writer:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("*.bin"):
            old.unlink()

    def f32(self, name: str, a) -> str:
        a = np.ascontiguousarray(np.asarray(a, dtype="<f4"))
        (self.root / f"{name}.f32.bin").write_bytes(a.tobytes())
        return f"{name}.f32.bin"

    def u8(self, name: str, a) -> str:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.uint8))
        (self.root / f"{name}.u8.bin").write_bytes(a.tobytes())
        return f"{name}.u8.bin"

    def index(self, obj: dict) -> None:
        (self.root / "index.json").write_text(json.dumps(obj, indent=1) + "\n")


class BlobWriter(Writer):
    """Like Writer, but every array goes into one `data.bin`; entries are `[offset, length]`."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.blob = bytearray()

    def _add(self, data: bytes) -> list[int]:
        entry = [len(self.blob), len(data)]
        self.blob += data
        return entry

    def f32(self, name: str, a) -> list[int]:  # type: ignore[override]
        return self._add(np.ascontiguousarray(np.asarray(a, dtype="<f4")).tobytes())

    def u8(self, name: str, a) -> list[int]:  # type: ignore[override]
        return self._add(np.ascontiguousarray(np.asarray(a, dtype=np.uint8)).tobytes())

    def index(self, obj: dict) -> None:
        (self.root / "data.bin").write_bytes(bytes(self.blob))
        obj["data"] = "data.bin"
        (self.root / "index.json").write_text(json.dumps(obj, indent=1) + "\n")


def torch_upsample64(src: np.ndarray, dst_h: int, dst_w: int) -> np.ndarray:
    t = torch.from_numpy(src.astype(np.float64))[None, None]
    return F.interpolate(t, size=(dst_h, dst_w), mode="bilinear", align_corners=False)[0, 0].numpy()


def head_fixtures(out: Path) -> None:
    w = Writer(out)
    rng = np.random.default_rng(20240517)
    index: dict = {
        "generator": "engines/make_head_fixtures.py",
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__},
    }

    # scipy's kernel: gaussian_filter1d builds it with _gaussian_kernel1d(sigma, 0, radius).
    sigma, truncate = 4.0, 4.0
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / sigma**2 * x**2)
    phi /= phi.sum()
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    assert np.allclose(scipy.ndimage.gaussian_filter1d(impulse, sigma, truncate=truncate, mode="constant"), phi[::-1])
    index["kernel"] = {"sigma": sigma, "truncate": truncate, "taps": len(phi), "ref": w.f32("kernel_s4_t4", phi)}

    # Bilinear resizes, float64 reference.
    ups = []
    for name, (sh, sw), (dh, dw), full in [
        ("up_8_112", (8, 8), (112, 112), True),
        ("up_37_518", (37, 37), (518, 518), False),
        ("up_37_1080x1920", (37, 37), (1080, 1920), False),
        ("down_5x7_13x3", (5, 7), (13, 3), True),
        ("down_8_4", (8, 8), (4, 4), True),
        ("up_1x1_3x5", (1, 1), (3, 5), True),
        ("mixed_3x1_1x4", (3, 1), (1, 4), True),
        ("down_23x40_7x9", (23, 40), (7, 9), True),
    ]:
        src = rng.random((sh, sw), dtype=np.float32)
        ref = torch_upsample64(src, dh, dw)
        case = {"name": name, "src_h": sh, "src_w": sw, "dst_h": dh, "dst_w": dw, "src": w.f32(f"{name}.src", src)}
        if not full:
            rows, cols = sub_rows(dh), sub_rows(dw)
            ref = ref[np.ix_(rows, cols)]
            case["rows"], case["cols"] = rows, cols
        case["ref"] = w.f32(f"{name}.ref", ref)
        ups.append(case)
    index["upsample"] = ups

    # Gaussian blur, float64 reference. Large inputs are stored as u8 (value = q / 255 in float32).
    blurs = []
    for name, (h, wd), as_u8 in [
        ("blur_518", (518, 518), True),
        ("blur_40x23", (40, 23), False),
        ("blur_10x10", (10, 10), False),
        ("blur_1x5", (1, 5), False),
        ("blur_3x1", (3, 1), False),
        ("blur_37x70", (37, 70), False),
    ]:
        case = {"name": name, "h": h, "w": wd, "sigma": sigma, "truncate": truncate}
        if as_u8:
            q = rng.integers(0, 256, size=(h, wd), dtype=np.uint8)
            src = q.astype(np.float32) / np.float32(255)
            case["src_u8"] = w.u8(f"{name}.src", q)
        else:
            src = rng.random((h, wd), dtype=np.float32)
            case["src"] = w.f32(f"{name}.src", src)
        ref = scipy.ndimage.gaussian_filter(src.astype(np.float64), sigma=sigma, truncate=truncate, mode="reflect")
        if h * wd > 20000:
            rows, cols = sub_rows(h), sub_rows(wd)
            ref = ref[np.ix_(rows, cols)]
            case["rows"], case["cols"] = rows, cols
        case["ref"] = w.f32(f"{name}.ref", ref)
        blurs.append(case)
    index["blur"] = blurs

    # Patch probabilities and score, float64 reference.
    patches = []
    for name, n, dim, tau in [("patch_64x64", 64, 64, 0.07), ("patch_40x768", 40, 768, 0.07)]:
        text = rng.standard_normal((2, dim)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        tokens = (rng.standard_normal((n, dim)) * rng.uniform(0.5, 3.0, (n, 1))).astype(np.float32)
        glob = (rng.standard_normal(dim) * 2.5).astype(np.float32)
        t64 = text.astype(np.float64)
        wdir = (t64[1] - t64[0]) / tau
        tok = tokens.astype(np.float64)
        tok /= np.linalg.norm(tok, axis=1, keepdims=True)
        probs = 1.0 / (1.0 + np.exp(-(tok @ wdir)))
        g = glob.astype(np.float64)
        g /= np.linalg.norm(g)
        logits = np.array([g @ t64[0], g @ t64[1]]) / tau
        score = float(np.exp(logits[1] - np.logaddexp(logits[0], logits[1])))
        patches.append(
            {
                "name": name,
                "n": n,
                "dim": dim,
                "tau": tau,
                "text": w.f32(f"{name}.text", text),
                "tokens": w.f32(f"{name}.tokens", tokens),
                "global": w.f32(f"{name}.global", glob),
                "probs": w.f32(f"{name}.probs", probs),
                "w": w.f32(f"{name}.w", wdir),
                "score": score,
            }
        )
    index["patch"] = patches

    # The official head, float32 torch + scipy (the way AnomalyCLIP's test code does it).
    fulls = []
    for name, grid, dim, size, layers in [("full_g8_d64_s112_l2", 8, 64, 112, 2), ("full_g5_d32_s37_l1", 5, 32, 37, 1)]:
        tau = 0.07
        text = rng.standard_normal((2, dim)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        glob = rng.standard_normal(dim).astype(np.float32)
        locs = [(rng.standard_normal((grid * grid, dim)) * 0.3).astype(np.float32) for _ in range(layers)]
        tt = torch.from_numpy(text)
        g = torch.from_numpy(glob)[None]
        g = g / g.norm(dim=-1, keepdim=True)
        score = ((g @ tt.T) / tau).softmax(-1)[0, 1].item()
        maps = []
        patch_sum = torch.zeros(grid * grid, dtype=torch.float64)
        for loc in locs:
            f = torch.from_numpy(loc)[None]
            f = f / f.norm(dim=-1, keepdim=True)
            sim = ((f @ tt.T) / tau).softmax(-1)  # [1, N, 2]
            patch_sum += sim[0, :, 1].double()
            sim = sim.reshape(1, grid, grid, 2).permute(0, 3, 1, 2)
            up = F.interpolate(sim, size=(size, size), mode="bilinear", align_corners=False)
            maps.append((up[:, 1] + 1 - up[:, 0]) / 2.0)
        map_raw = torch.stack(maps).sum(0)[0].numpy().astype(np.float32)
        final = scipy.ndimage.gaussian_filter(map_raw, sigma=4)
        fulls.append(
            {
                "name": name,
                "grid": grid,
                "dim": dim,
                "size": size,
                "tau": tau,
                "sigma": 4.0,
                "text": w.f32(f"{name}.text", text),
                "global": w.f32(f"{name}.global", glob),
                "locals": [w.f32(f"{name}.local{i}", loc) for i, loc in enumerate(locs)],
                "score": score,
                "patch": w.f32(f"{name}.patch", patch_sum.numpy()),
                "map_raw": w.f32(f"{name}.map_raw", map_raw),
                "map": w.f32(f"{name}.map", final),
            }
        )
    index["full"] = fulls
    w.index(index)


def pattern(width: int, height: int, channels: int) -> np.ndarray:
    """A deterministic frame (gradients + hash noise) that tests/preprocess.rs rebuilds bit for bit."""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels), indexing="ij")
    x = x.astype(np.uint64)
    y = y.astype(np.uint64)
    c = c.astype(np.uint64)
    h = ((x * np.uint64(73856093)) ^ (y * np.uint64(19349663)) ^ (c * np.uint64(83492791))) & np.uint64(0xFFFFFFFF)
    noise = ((h * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)) >> np.uint64(24)
    grad = (x * np.uint64(255)) // np.uint64(max(width - 1, 1))
    grad = (grad + (y * np.uint64(255)) // np.uint64(max(height - 1, 1)) * (c + np.uint64(1))) & np.uint64(255)
    return ((noise + grad) // np.uint64(2)).astype(np.uint8)


RAW_MODES = {"L": 1, "La": 2, "RGB": 3, "RGBa": 4}
CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 1, "1": 1, "La": 2, "RGBa": 4}
FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def make_image(mode: str, width: int, height: int, rng) -> tuple[Image.Image, np.ndarray, np.ndarray | None]:
    """A random image of `mode` and its raw bytes (P: indices, plus the 256x3 palette)."""
    ch = CHANNELS[mode]
    if mode == "1":
        raw = (rng.integers(0, 2, (height, width), dtype=np.uint8) * 255).astype(np.uint8)
        return Image.fromarray(raw, "L").convert("1"), raw, None
    if mode == "P":
        raw = rng.integers(0, 256, (height, width), dtype=np.uint8)
        pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        im = Image.frombytes("P", (width, height), raw.tobytes())
        im.putpalette(pal.tobytes(), "RGB")
        return im, raw, pal
    raw = rng.integers(0, 256, (height, width, ch), dtype=np.uint8)
    if mode in ("RGBA", "LA"):
        # Alpha with fully transparent, opaque and partial pixels.
        a = raw[..., -1]
        a[a < 40] = 0
        a[a > 215] = 255
    return Image.frombytes(mode, (width, height), raw.tobytes()), raw, None


def resize_fixtures(out: Path) -> None:
    w = BlobWriter(out)
    rng = np.random.default_rng(7)
    cases = []
    sizes = [
        ("down", (64, 48), (23, 17)),
        ("up", (13, 11), (40, 29)),
        ("nonsquare", (50, 20), (20, 50)),
        ("one_to_many", (1, 1), (7, 5)),
        ("to_one", (9, 7), (1, 1)),
        ("width_only", (32, 24), (11, 24)),
        ("height_only", (32, 24), (32, 10)),
        ("strong_down", (120, 90), (9, 7)),
        ("same", (16, 12), (16, 12)),
        ("odd_up_down", (31, 9), (12, 40)),
    ]
    # Raw channel resizes (no alpha handling): what preprocess::resize_u8 must match.
    for mode in RAW_MODES:
        for fname in ("bicubic", "bilinear", "nearest"):
            for label, (sw, sh), (dw, dh) in sizes:
                if mode in ("La", "RGBa") and label in ("strong_down", "odd_up_down") and fname != "bicubic":
                    continue
                im, raw, _ = make_image(mode, sw, sh, rng)
                res = im.resize((dw, dh), FILTERS[fname])
                assert res.mode == mode
                name = f"raw_{mode}_{fname}_{label}"
                cases.append(
                    {
                        "name": name,
                        "kind": "raw",
                        "mode": mode,
                        "channels": RAW_MODES[mode],
                        "filter": fname,
                        "src_w": sw,
                        "src_h": sh,
                        "dst_w": dw,
                        "dst_h": dh,
                        "src": w.u8(f"{name}.src", raw),
                        "ref": w.u8(f"{name}.ref", np.asarray(res)),
                    }
                )
    # Pillow's mode handling then convert("RGB"): what image_io's to_model_input must match.
    for mode in ("L", "LA", "RGB", "RGBA", "P", "1"):
        for fname in ("bicubic", "bilinear"):
            for label, (sw, sh), (dw, dh) in sizes:
                if label in ("strong_down", "same", "one_to_many") and fname == "bilinear":
                    continue
                im, raw, pal = make_image(mode, sw, sh, rng)
                res = im.resize((dw, dh), FILTERS[fname]).convert("RGB")
                name = f"mode_{mode}_{fname}_{label}"
                case = {
                    "name": name,
                    "kind": "mode",
                    "mode": mode,
                    "channels": CHANNELS[mode],
                    "filter": fname,
                    "src_w": sw,
                    "src_h": sh,
                    "dst_w": dw,
                    "dst_h": dh,
                    "src": w.u8(f"{name}.src", raw),
                    "ref": w.u8(f"{name}.ref", np.asarray(res)),
                }
                if pal is not None:
                    case["palette"] = w.u8(f"{name}.palette", pal)
                cases.append(case)
    # Large generated frames: only the SHA-256 of Pillow's output is stored.
    hashed = []
    for label, (sw, sh), (dw, dh), ch in [
        ("hd_to_518", (1920, 1080), (518, 518), 3),
        ("vga_to_336", (640, 480), (336, 336), 3),
        ("gray_up_to_518", (300, 200), (518, 518), 1),
    ]:
        frame = pattern(sw, sh, ch)
        mode = {1: "L", 3: "RGB"}[ch]
        im = Image.frombytes(mode, (sw, sh), frame.tobytes())
        for fname in ("bicubic", "bilinear"):
            res = np.asarray(im.resize((dw, dh), FILTERS[fname]))
            hashed.append(
                {
                    "name": f"pattern_{label}_{fname}",
                    "channels": ch,
                    "filter": fname,
                    "src_w": sw,
                    "src_h": sh,
                    "dst_w": dw,
                    "dst_h": dh,
                    "src_sha256": hashlib.sha256(frame.tobytes()).hexdigest(),
                    "ref_sha256": hashlib.sha256(res.tobytes()).hexdigest(),
                    "ref_row0": res.reshape(dh, -1)[0, :48].tolist(),
                }
            )
    # The model input tensor (ToTensor + Normalize in float32) for one resized image.
    mean = [0.48145466, 0.4578275, 0.40821073]
    std = [0.26862954, 0.26130258, 0.27577711]
    im, raw, _ = make_image("RGB", 45, 30, rng)
    res = im.resize((24, 24), Image.Resampling.BICUBIC).convert("RGB")
    # torchvision: to_tensor = permute + .to(float32).div(255); normalize = sub_(mean).div_(std).
    t = torch.from_numpy(np.asarray(res).copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    t = t.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None, None])
    tensor = {
        "src_w": 45,
        "src_h": 30,
        "size": 24,
        "mean": mean,
        "std": std,
        "src": w.u8("tensor.src", raw),
        "ref": w.f32("tensor.ref", t.numpy()),
    }
    w.index({"generator": "engines/make_head_fixtures.py", "pillow": PIL.__version__, "cases": cases, "hashed": hashed, "tensor": tensor})


def write_png(path: Path, width: int, height: int, depth: int, color: int, rows: list[bytes], plte: bytes | None = None, interlace: int = 0) -> None:
    """A minimal PNG writer for the bit depths Pillow cannot save (filter 0 on every row)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + r for r in rows)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))
    if plte is not None:
        data += chunk(b"PLTE", plte)
    data += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(data)


def write_bmp(
    path: Path,
    width: int,
    height: int,
    bits: int,
    rows: list[bytes] | bytes,
    palette: np.ndarray | None = None,
    compression: int = 0,
    masks: tuple[int, ...] | None = None,
    header: int = 40,
    top_down: bool = False,
) -> None:
    """A BMP writer for the layouts Pillow does not save. `rows` are in file order (padded here),
    or the already encoded RLE stream."""
    import struct

    if header == 12:
        info = struct.pack("<IHHHH", 12, width, height, 1, bits)
        pal = b"" if palette is None else b"".join(bytes([b, g, r]) for r, g, b in palette)
    else:
        info = struct.pack("<IiiHHIIiiII", header, width, -height if top_down else height, 1, bits, compression, 0, 2835, 2835, 0 if palette is None else len(palette), 0)
        if header >= 52 and masks is not None:
            info += struct.pack("<IIII", *(list(masks) + [0] * (4 - len(masks))))
        info += b"\x00" * (header - len(info))
        if header == 40 and masks is not None:
            info += struct.pack("<III", *masks[:3])
        pal = b"" if palette is None else b"".join(bytes([b, g, r, 0]) for r, g, b in palette)
    if isinstance(rows, bytes):
        pixels = rows
    else:
        stride = ((width * bits + 31) >> 3) & ~3
        pixels = b"".join(r + b"\x00" * (stride - len(r)) for r in rows)
    offset = 14 + len(info) + len(pal)
    path.write_bytes(b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pal + pixels)


def rle_encode(rows: list[np.ndarray], rle4: bool) -> bytes:
    """RLE8/RLE4 stream (rows in file order): runs on even rows, absolute runs on odd rows, one
    delta escape, end-of-line after each row and end-of-bitmap at the end."""
    out = bytearray()
    for y, row in enumerate(rows):
        row = [int(v) for v in row]
        i = 0
        if y == 1:
            out += bytes([0, 2, 3, 0])  # delta: skip 3 pixels (they read as index 0)
            row[:3] = [0, 0, 0]
            i = 3
        while i < len(row):
            if y % 2 == 1 and len(row) - i >= 3:
                n = min(len(row) - i, 9)
                seg = row[i : i + n]
                if rle4:
                    packed = bytes((seg[k] << 4) | (seg[k + 1] if k + 1 < n else 0) for k in range(0, n, 2))
                else:
                    packed = bytes(seg)
                out += bytes([0, n]) + packed + (b"\x00" if len(packed) % 2 else b"")
                i += n
                continue
            a = row[i]
            b = row[i + 1] if rle4 and i + 1 < len(row) else a
            n = 1
            while i + n < len(row) and n < 255 and row[i + n] == (a if n % 2 == 0 else b):
                n += 1
            out += bytes([n, (a << 4) | b if rle4 else a])
            i += n
        out += b"\x00\x00"
    out += b"\x00\x01"
    return bytes(out)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Packs one row of `bits`-bit samples, most significant first."""
    per = 8 // bits
    padded = np.zeros(-(-len(values) // per) * per, dtype=np.uint8)
    padded[: len(values)] = values
    out = np.zeros(len(padded) // per, dtype=np.uint8)
    for i in range(per):
        out |= (padded[i::per] << (8 - bits * (i + 1))).astype(np.uint8)
    return out.tobytes()


def smooth_image(width: int, height: int, channels: int, rng) -> np.ndarray:
    """Photo-like content (smooth gradients, edges and mild noise): what JPEG is made for."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = []
    for c in range(channels):
        f = 127 + 80 * np.sin(x / (5 + 3 * c) + y / 11) * np.cos(y / (7 + c))
        f += 40 * ((x - width / 2) ** 2 + (y - height / 3) ** 2 < (min(width, height) / 4) ** 2)
        f += rng.normal(0, 6, f.shape)
        planes.append(f)
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def image_fixtures(out: Path) -> None:
    """Image files and what Pillow makes of them: mode, pixels, RGB, and resizes then RGB."""
    w = BlobWriter(out)
    files = out / "files"
    files.mkdir(exist_ok=True)
    for old in files.glob("*"):
        old.unlink()
    rng = np.random.default_rng(99)
    W, H = 37, 29
    made: list[str] = []

    def pil_save(name: str, im: Image.Image, **kw) -> None:
        im.save(files / name, **kw)
        made.append(name)

    rgb = smooth_image(W, H, 3, rng)
    gray = smooth_image(W, H, 1, rng)[..., 0]
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha[:, :6] = 0
    alpha[:, -6:] = 255
    # PNG, modes Pillow writes itself.
    pil_save("rgb.png", Image.fromarray(rgb, "RGB"))
    pil_save("gray.png", Image.fromarray(gray, "L"))
    pil_save("rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    pil_save("la.png", Image.fromarray(np.dstack([gray, alpha]), "LA"))
    pil_save("palette.png", Image.fromarray(rgb, "RGB").quantize(50))
    pil_save("palette4.png", Image.fromarray(rgb, "RGB").quantize(12), bits=4)
    pil_save("bilevel.png", Image.fromarray(gray, "L").convert("1"))
    # PNG, bit depths Pillow does not write.
    g2 = rng.integers(0, 4, (H, W), dtype=np.uint8)
    write_png(files / "gray2.png", W, H, 2, 0, [pack_bits(r, 2) for r in g2])
    g4 = rng.integers(0, 16, (H, W), dtype=np.uint8)
    write_png(files / "gray4.png", W, H, 4, 0, [pack_bits(r, 4) for r in g4])
    p1 = rng.integers(0, 2, (H, W), dtype=np.uint8)
    write_png(files / "palette1.png", W, H, 1, 3, [pack_bits(r, 1) for r in p1], plte=bytes([200, 30, 10, 5, 90, 250]))
    g16 = (rng.integers(0, 300, (H, W)) + (gray.astype(np.int64) * 3)).astype(">u2")
    write_png(files / "gray16.png", W, H, 16, 0, [r.tobytes() for r in g16])
    rgb16 = (rgb.astype(np.uint16) * 257 + rng.integers(0, 256, rgb.shape).astype(np.uint16)).astype(">u2")
    write_png(files / "rgb16.png", W, H, 16, 2, [r.tobytes() for r in rgb16])
    rgba16 = np.dstack([rgb16, (alpha.astype(np.uint16) * 257).astype(">u2")]).astype(">u2")
    write_png(files / "rgba16.png", W, H, 16, 6, [r.tobytes() for r in rgba16])
    la16 = np.dstack([g16, (alpha.astype(np.uint16) * 257).astype(">u2")]).astype(">u2")
    write_png(files / "la16.png", W, H, 16, 4, [r.tobytes() for r in la16])
    made += ["gray2.png", "gray4.png", "palette1.png", "gray16.png", "rgb16.png", "rgba16.png", "la16.png"]
    # JPEG: the chroma subsamplings, grayscale, progressive, odd and larger sizes.
    big = smooth_image(160, 119, 3, rng)
    pil_save("q90_444.jpg", Image.fromarray(rgb), quality=90, subsampling=0)
    pil_save("q90_422.jpg", Image.fromarray(rgb), quality=90, subsampling=1)
    pil_save("q90_420.jpg", Image.fromarray(rgb), quality=90, subsampling=2)
    pil_save("q75_420_big.jpg", Image.fromarray(big), quality=75, subsampling=2)
    pil_save("q95_444_big.jpg", Image.fromarray(big), quality=95, subsampling=0)
    pil_save("q85_420_progressive.jpg", Image.fromarray(big), quality=85, subsampling=2, progressive=True)
    pil_save("gray.jpg", Image.fromarray(gray, "L"), quality=90)
    # BMP: 24 and 32 bits, 8-bit palette and grayscale, 1 bit.
    pil_save("rgb.bmp", Image.fromarray(rgb, "RGB"))
    pil_save("rgba.bmp", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    pil_save("palette.bmp", Image.fromarray(rgb, "RGB").quantize(40))
    pil_save("gray.bmp", Image.fromarray(gray, "L"))
    pil_save("bilevel.bmp", Image.fromarray(gray, "L").convert("1"))
    pil_save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    # BMP layouts Pillow does not write: rows are in file order (bottom-up unless top_down).
    pal12 = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    idx4 = rng.integers(0, 12, (H, W), dtype=np.uint8)
    write_bmp(files / "palette4.bmp", W, H, 4, [pack_bits(r, 4) for r in idx4[::-1]], palette=pal12)
    pal256 = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx8 = rng.integers(0, 256, (H, W), dtype=np.uint8)
    write_bmp(files / "core8.bmp", W, H, 8, [r.tobytes() for r in idx8[::-1]], palette=pal256, header=12)
    write_bmp(files / "topdown.bmp", W, H, 24, [r[:, ::-1].tobytes() for r in rgb], top_down=True)
    v565 = ((rgb[..., 0].astype(np.uint16) >> 3) << 11) | ((rgb[..., 1].astype(np.uint16) >> 2) << 5) | (rgb[..., 2].astype(np.uint16) >> 3)
    write_bmp(files / "rgb565.bmp", W, H, 16, [r.astype("<u2").tobytes() for r in v565[::-1]], compression=3, masks=(0xF800, 0x7E0, 0x1F))
    v555 = ((rgb[..., 0].astype(np.uint16) >> 3) << 10) | ((rgb[..., 1].astype(np.uint16) >> 3) << 5) | (rgb[..., 2].astype(np.uint16) >> 3)
    write_bmp(files / "rgb555.bmp", W, H, 16, [r.astype("<u2").tobytes() for r in v555[::-1]])
    bgra = np.dstack([rgb[..., 2], rgb[..., 1], rgb[..., 0], alpha])
    write_bmp(files / "bgra_v4.bmp", W, H, 32, [r.tobytes() for r in bgra[::-1]], compression=3, masks=(0xFF0000, 0xFF00, 0xFF, 0xFF000000), header=108)
    pal16 = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    runs = np.repeat(rng.integers(0, 16, (H, (W + 4) // 5), dtype=np.uint8), 5, axis=1)[:, :W]
    write_bmp(files / "rle8.bmp", W, H, 8, rle_encode(list(runs[::-1]), rle4=False), palette=pal16, compression=1)
    write_bmp(files / "rle4.bmp", W, H, 4, rle_encode(list(runs[::-1]), rle4=True), palette=pal16, compression=2)
    made += ["palette4.bmp", "core8.bmp", "topdown.bmp", "rgb565.bmp", "rgb555.bmp", "bgra_v4.bmp", "rle8.bmp", "rle4.bmp"]

    entries = []
    for name in sorted(made):
        im = Image.open(files / name)
        im.load()
        px = np.asarray(im)
        if im.mode == "1":
            px = px.astype(np.uint8) * 255
        elif im.mode == "I;16":
            px = px.astype("<u2").view(np.uint8)
        entry = {
            "file": f"files/{name}",
            "mode": im.mode,
            "width": im.width,
            "height": im.height,
            "pixels": w.u8(f"{name}.pixels", px),
            "rgb": w.u8(f"{name}.rgb", np.asarray(im.convert("RGB"))),
            "resized": [],
        }
        if im.mode == "P":
            pal = np.zeros((256, 3), dtype=np.uint8)
            p = np.frombuffer(bytes(im.getpalette("RGB")), dtype=np.uint8).reshape(-1, 3)
            pal[: len(p)] = p
            entry["palette"] = w.u8(f"{name}.palette", pal)
        for dw, dh, fname in [(24, 24, "bicubic"), (17, 40, "bicubic"), (60, 45, "bilinear")]:
            res = im.resize((dw, dh), FILTERS[fname]).convert("RGB")
            entry["resized"].append({"w": dw, "h": dh, "filter": fname, "rgb": w.u8(f"{name}.{dw}x{dh}", np.asarray(res))})
        entries.append(entry)

    # Broken and hostile files (tests/image_io.rs also makes empty, text and truncated ones).
    import struct
    import zlib

    bad = out / "bad"
    bad.mkdir(exist_ok=True)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    # 30000 x 30000 RGB PNG header (900 MP) with a tiny IDAT: must be refused before decoding.
    (bad / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    # A JPEG whose SOF claims 65000 x 65000.
    jpg = bytearray((files / "q90_420.jpg").read_bytes())
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    (bad / "huge.jpg").write_bytes(bytes(jpg))
    # A BMP whose header claims 40000 x 40000 at 24 bits.
    bmp = bytearray((files / "rgb.bmp").read_bytes())
    bmp[18:26] = struct.pack("<ii", 40000, 40000)
    (bad / "huge.bmp").write_bytes(bytes(bmp))
    # A PNG with a corrupt IDAT (bad zlib data, valid CRC).
    (bad / "corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", b"\x78\x9c\xff\xff\xff\xff")
        + chunk(b"IEND", b"")
    )
    (bad / "gif.gif").write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    w.index({"generator": "engines/make_head_fixtures.py", "pillow": PIL.__version__, "images": entries})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    args = ap.parse_args()
    head_fixtures(args.out / "head")
    resize_fixtures(args.out / "resize")
    image_fixtures(args.out / "images")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file() and "fixtures" in p.parts and any(d in p.parts for d in ("head", "resize", "images")))
    print(f"wrote {args.out}/head and {args.out}/resize ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
