#!/usr/bin/env python3
"""Check `train.py` against the official AnomalyCLIP `train.py` step by step, on random weights.

Owns the standalone version of the test `test_training_matches_the_official_train_step_for_three_
steps` (engines/tests/test_train.py), at any size: writes a random-weight CLIP file (`--arch tiny`,
or `--arch full` for a random ViT-L/14@336px run at 518 px) and a small synthetic dataset, imports
the official model, prompt learner and losses in-process from a checkout of zqhang/AnomalyCLIP
(the test module's `_import_official`), runs the official loop body (`_official_steps`: seed 111,
DataLoader shuffle, Adam lr 1e-3 betas (0.5, 0.999), feature block 24 and V-V on blocks 6..24 at
full size) and then ours (`train.train`, with the feature cache and with the image encoder every
step) from the same seed, so from the same initial prompt learner and the same batches.

Prints, per step, both runs' loss (the 4 x map loss of the official log) and image loss with the
relative difference, and the difference of the updated prompt parameters after the step:
max |delta| over all elements, and max over the parameter tensors of max |delta| / max |p|
(p: the official tensor; relative to each tensor's scale, not per element: elements near zero are
common, the prompts start from N(0, 0.02)). Exit status 1 if a loss or image-loss relative
difference exceeds --tol (default 1e-5), an updated parameter differs by more than --param-atol
(default 1e-5, absolute), or the initial prompt learners are not bit-identical.

Also printed, not gated: the gradients of each step (max |delta| / max |g| per tensor), the
element with the largest parameter difference and its gradients, and the step-1 gradients per
tensor group (both sides start from the same parameters there). The official text encoder casts
the deep prompts (`compound_prompts_text.*`) to fp16, so their gradients are rounded to fp16: a
last-bit fp32 difference upstream can move one by an fp16 step (~5e-4 relative), and Adam, which
divides every element's step by that element's own gradient scale, carries that into the
parameters from the second step on.

Random weights: this checks the arithmetic and the order of the random stream, nothing about
detection quality.

    python engines/check_train_parity.py --official /path/to/AnomalyCLIP --arch tiny
    python engines/check_train_parity.py --official /path/to/AnomalyCLIP --arch full --tmp /dev/shm
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ENGINES = Path(__file__).resolve().parent
sys.path.insert(0, str(ENGINES))
sys.path.insert(0, str(ENGINES / "tests"))

from anomalyclip_ref import TINY, VIT_L_14_336  # noqa: E402
from checkpoints import load_clip  # noqa: E402
from random_weights import write_random_sources  # noqa: E402
from test_train import _import_official, _official_steps, make_dataset  # noqa: E402
from train import official_initial_learner, train  # noqa: E402


class StepParams:
    """Records the parameters of every optimizer after each `step()` and the gradients that step
    used (a global post-hook), in the optimizer's order: `list(learner.parameters())` on both
    sides. A parameter the loss does not reach has no gradient (None) and does not move."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []
        self.grads: list[list[torch.Tensor | None]] = []
        self._handle = None

    def __enter__(self) -> StepParams:
        def hook(optimizer, args, kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.steps.append([p.detach().cpu().clone() for p in params])
            self.grads.append([None if p.grad is None else p.grad.detach().cpu().clone()
                               for p in params])
        self._handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def param_diff(ours: list[torch.Tensor | None], ref: list[torch.Tensor | None]
               ) -> tuple[float, float, int]:
    """max |delta| over all elements; max over tensors of max |delta| / max |ref|; the index of
    that tensor. Tensors that are None on both sides (no gradient) are skipped."""
    abs_max, rel_max, worst = 0.0, 0.0, 0
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a is None and b is None:
            continue
        d = float((a.to(b.dtype) - b).abs().max())
        abs_max = max(abs_max, d)
        r = d / max(float(b.abs().max()), 1e-12)
        if r > rel_max:
            rel_max, worst = r, k
    return abs_max, rel_max, worst


def worst_element(names, k: int, ours: StepParams, ref: StepParams, step: int) -> str:
    """Where the largest parameter difference after `step` sits, with the official gradients of
    that element so far relative to the largest gradient of its tensor (Adam divides each
    element's step by its own gradient scale: a small gradient's rounding error moves the
    parameter as much as a large gradient's value would)."""
    d = (ours.steps[step][k] - ref.steps[step][k]).abs()
    flat = int(d.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), d.shape))
    parts = []
    for s in range(step + 1):
        g_ref, g_ours = ref.grads[s][k], ours.grads[s][k]
        g = float(g_ref.flatten()[flat])
        parts.append(f"g{s + 1} {g:+.2e} ({abs(g) / float(g_ref.abs().max()):.1e} of the "
                     f"tensor's max, ours {float(g_ours.flatten()[flat]) - g:+.1e})")
    return (f"{names[k]}{list(index)}: |delta| {float(d.flatten()[flat]):.1e}; "
            + "; ".join(parts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", type=Path, required=True,
                   help="checkout of github.com/zqhang/AnomalyCLIP")
    p.add_argument("--arch", choices=("tiny", "full"), default="tiny")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--images", type=int, default=4, help="half normal, half anomalous")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random CLIP weights")
    p.add_argument("--tol", type=float, default=1e-5,
                   help="largest relative difference of the loss and the image loss")
    p.add_argument("--param-atol", type=float, default=1e-5,
                   help="largest absolute difference of an updated prompt parameter")
    p.add_argument("--ours", choices=("both", "cache", "encoder"), default="both",
                   help="our runs: with the feature cache, the image encoder every step, or both")
    p.add_argument("--tmp", type=Path, help="scratch directory (the full CLIP file is 0.9 GB)")
    args = p.parse_args()
    if not (args.official / "prompt_ensemble.py").is_file():
        print(f"{args.official}: not a checkout of zqhang/AnomalyCLIP (no prompt_ensemble.py)",
              file=sys.stderr)
        return 2

    if args.arch == "tiny":
        # the official code derives the head counts from the widths (width // 64 = 1 for the
        # tiny model): ours gets the same architecture; V-V on blocks 2..4, like 6..24
        arch = dataclasses.replace(TINY, vision=dataclasses.replace(TINY.vision, heads=1),
                                   text=dataclasses.replace(TINY.text, heads=1))
        source_arch, dpam = TINY, TINY.vision.layers - TINY.vision.vv_start + 2
    else:
        arch = source_arch = VIT_L_14_336  # heads 16 / 12 = width // 64, as the official code
        dpam = 20  # the official DAPM_replace(DPAM_layer=20): V-V on blocks 6..24
    size, layer = arch.default_size, arch.vision.layers
    started = time.perf_counter()
    print(f"{arch.label} at {size} px, feature block {layer}, {args.images} images, batch "
          f"{args.batch_size}, {args.steps} steps; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}", flush=True)

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="train-parity-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        clip_path, _ = write_random_sources(source_arch, args.seed, tmp, args.arch)
        n_anomalous = args.images // 2
        data = make_dataset(tmp / "data", n_normal=args.images - n_anomalous,
                            n_anomalous=n_anomalous)
        print(f"[{time.perf_counter() - started:6.0f} s] sources written", flush=True)

        off = _import_official(args.official)
        t0 = time.perf_counter()
        with StepParams() as ref_steps:
            ref, initial, final = _official_steps(off, clip_path, data, args.steps,
                                                  args.batch_size, layer, dpam, size)
        del off
        print(f"[{time.perf_counter() - started:6.0f} s] official: {len(ref)} steps in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

        learner = official_initial_learner(arch, load_clip(clip_path).state, 111)
        ours_initial = learner.state_dict()
        names = [n for n, _ in learner.named_parameters()]
        if list(ours_initial) != list(initial):
            failures.append("initial prompt learner: keys differ")
        differing = [k for k, v in initial.items() if not torch.equal(ours_initial[k], v)]
        if differing:
            failures.append(f"initial prompt learner: {differing} differ")
        print(f"initial prompt learner: {len(initial)} tensors, "
              f"{'bit-identical to the official one' if not differing else 'DIFFERENT'}",
              flush=True)
        # the recorded official parameters are in `learner.parameters()` order: check the
        # mapping against the official final state
        for name, value in zip(names, ref_steps.steps[-1], strict=True):
            if not torch.equal(final[name], value):
                failures.append(f"parameter order: {name} does not match the final state")
        del learner, ours_initial

        modes = {"both": (True, False), "cache": (True,), "encoder": (False,)}[args.ours]
        rows, notes = [], []
        for cache in modes:
            label = "ours, fp32 feature cache" if cache else "ours, encoder every step"
            t0 = time.perf_counter()
            with StepParams() as our_steps:
                records, state = train(clip_path, data, tmp / f"ours-{cache}",
                                       batch_size=args.batch_size, cache=cache,
                                       max_steps=args.steps, quiet=True, arch_override=arch)
            print(f"[{time.perf_counter() - started:6.0f} s] {label}: {len(records)} steps in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for name, value in zip(names, our_steps.steps[-1], strict=True):
                if not torch.equal(state[name], value):
                    failures.append(f"{label}: parameter order: {name}")
            for k, ((loss, image_loss), rec) in enumerate(zip(ref, records, strict=True)):
                d_abs, d_rel, worst = param_diff(our_steps.steps[k], ref_steps.steps[k])
                _, g_rel, _ = param_diff(our_steps.grads[k], ref_steps.grads[k])
                row = (label, k + 1, loss, rec.loss, rel(rec.loss, loss), image_loss,
                       rec.image_loss, rel(rec.image_loss, image_loss), d_abs, d_rel, g_rel)
                rows.append(row)
                notes.append(f"{label}, after step {k + 1}: "
                             f"{worst_element(names, worst, our_steps, ref_steps, k)}")
                for what, value in (("loss", row[4]), ("image loss", row[7])):
                    if value > args.tol:
                        failures.append(f"{label}, step {k + 1}: {what} relative difference "
                                        f"{value:.2e} > {args.tol:g}")
                # the criterion: updated parameters within 1e-5 (absolute; the prompts
                # are O(0.02) and move by lr = 1e-3 per step); the scale-relative figure is
                # printed beside it
                if d_abs > args.param_atol:
                    failures.append(f"{label}, step {k + 1}: parameters differ by {d_abs:.2e} "
                                    f"> {args.param_atol:g}")
            # step 1 starts from bit-identical parameters on both sides: its gradients compare
            # the two implementations directly, tensor by tensor (ctx_* enter the text encoder in
            # fp32; the official code casts compound_prompts_text.* to fp16, so their gradients
            # are rounded to fp16 on both sides)
            groups: dict[str, float] = {}
            for name, a_, b_ in zip(names, our_steps.grads[0], ref_steps.grads[0], strict=True):
                if a_ is None and b_ is None:
                    continue
                group = name.split(".")[0] + (".*" if "." in name else "")
                r = float((a_ - b_).abs().max()) / max(float(b_.abs().max()), 1e-12)
                groups[group] = max(groups.get(group, 0.0), r)
            notes.append(f"{label}, step 1 gradients, max |delta| / max |g| per tensor: "
                         + ", ".join(f"{g} {r:.1e}" for g, r in groups.items()))
        moved = max(float((final[n] - initial[n]).abs().max()) for n in names)

    print()
    print("| run | step | loss official | loss ours | rel | image loss official | "
          "image loss ours | rel | params max abs Δ | params max Δ/max abs p | "
          "grads max Δ/max abs g |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.7f} | {r[3]:.7f} | {r[4]:.1e} | {r[5]:.7f} | "
              f"{r[6]:.7f} | {r[7]:.1e} | {r[8]:.1e} | {r[9]:.1e} | {r[10]:.1e} |")
    print()
    print("largest parameter difference (official gradient of that element at each step), "
          "and step-1 gradients:")
    for n in notes:
        print(f"  {n}")
    print(f"largest parameter change over the {args.steps} official steps: {moved:.2e} "
          f"(the comparison is not between untouched copies)")
    print(f"total {time.perf_counter() - started:.0f} s; load average "
          f"{os.getloadavg()[0]:.2f}")
    if moved <= 1e-4:
        failures.append("the official parameters did not move")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    print("PASS" if not failures else f"FAIL ({len(failures)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
