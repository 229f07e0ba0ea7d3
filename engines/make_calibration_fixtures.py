#!/usr/bin/env python3
"""Reference values for `src/calibration.rs`, on synthetic score samples.

Writes tests/fixtures/calibration/expected.json. Each sample holds float32 scores in [0, 1]
(written as the exact float64 value of each float32) and what the Rust module must compute:

- quantiles at the listed probabilities, Hyndman-Fan type 6: numpy
  `np.quantile(x, p, method="weibull")`, cross-checked here against scipy
  `scipy.stats.mstats.mquantiles(x, p, alphap=0, betap=0)`;
- deciles (p = 0.1 .. 0.9, the PSI bin edges): the same definition;
- thresholds for rates alpha: the order statistic X_(r) for the smallest r with
  (N+1-r)/(N+1) <= alpha, found here by exact rational arithmetic (fractions.Fraction of the
  decimal alpha) over every r -- independent of the Rust formula r = N+1-floor(alpha(N+1));
  `null` when no r exists (alpha < 1/(N+1)), with the frames needed (smallest such N);
- logit statistics: logit(clamp(p, 1e-6, 1-1e-6)), mean and sample std (ddof=1);
- the histogram: 32 equal bins over logit [-8, 8], outside values in the end bins (numpy);
- PSI of "recent" samples against the deciles: numpy searchsorted(side="left") bins, shares
  floored at 1e-4, sum (a - 0.1) ln(a / 0.1).

Also: alarm rates P(Bin(M, alpha) >= N) = scipy.stats.binom.sf(N - 1, M, alpha) for several
(alpha, N, M) up to M = 1000, and score_norm values sigmoid(logit v - logit t) in float64.

Usage: python engines/make_calibration_fixtures.py [OUT_DIR]   (deterministic: fixed seed)
"""

import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.stats import binom
from scipy.stats.mstats import mquantiles

EPS = 1e-6
PS = [0.001, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999]
ALPHAS = ["0.5", "0.1", "0.05", "0.01", "0.005", "0.001", "0.0001"]
BINS, LO, HI = 32, -8.0, 8.0
PSI_EPS = 1e-4


def f32_list(a):
    return [float(v) for v in np.asarray(a, dtype=np.float32)]


def logit(x):
    p = np.clip(np.asarray(x, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def threshold_exact(sorted_x, alpha_text):
    n = len(sorted_x)
    alpha = Fraction(alpha_text)
    for r in range(1, n + 1):
        if Fraction(n + 1 - r, n + 1) <= alpha:
            return sorted_x[r - 1]
    return None


def frames_needed(alpha_text):
    alpha = Fraction(alpha_text)
    n = 1
    while Fraction(1, n + 1) > alpha:
        n += 1
    return n


def psi_ref(deciles, recent):
    bins = np.searchsorted(np.asarray(deciles, dtype=np.float64),
                           np.asarray(recent, dtype=np.float64), side="left")
    counts = np.bincount(bins, minlength=10)
    a = np.maximum(counts / len(recent), PSI_EPS)
    return float(np.sum((a - 0.1) * np.log(a / 0.1)))


def sample_case(name, x, rng, drifts):
    x = np.asarray(x, dtype=np.float32)
    xs = np.sort(x).astype(np.float64)
    n = len(xs)
    q = np.quantile(xs, PS, method="weibull")
    q_scipy = mquantiles(xs, prob=PS, alphap=0, betap=0)
    assert np.allclose(q, q_scipy, rtol=0, atol=1e-12), (name, q, q_scipy)
    dec_p = [i / 10 for i in range(1, 10)]
    deciles = np.quantile(xs, dec_p, method="weibull")
    lg = logit(xs)
    width = (HI - LO) / BINS
    b = np.clip(np.floor((lg - LO) / width), 0, BINS - 1).astype(int)
    hist = np.bincount(b, minlength=BINS)
    thresholds = []
    for a in ALPHAS:
        t = threshold_exact(list(xs), a)
        thresholds.append({"alpha": float(a), "threshold": t,
                           "need": None if t is not None else frames_needed(a)})
    deciles_f32 = f32_list(deciles)
    psis = []
    for dname, recent in drifts:
        recent = f32_list(recent)
        psis.append({"name": dname, "recent": recent, "psi": psi_ref(deciles_f32, recent)})
    return {
        "name": name,
        "scores": f32_list(x),
        "quantiles": [[p, float(v)] for p, v in zip(PS, q)],
        "deciles": [float(v) for v in deciles],
        "mean_logit": float(np.mean(lg)),
        "std_logit": float(np.std(lg, ddof=1)) if n > 1 else 0.0,
        "histogram": [int(c) for c in hist],
        "thresholds": thresholds,
        "psi": psis,
    }


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/fixtures/calibration")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261207)
    big = rng.beta(2.0, 8.0, size=1000)
    samples = [
        sample_case("beta_1000", big, rng, [
            ("same", rng.beta(2.0, 8.0, size=500)),
            ("shifted", rng.beta(3.0, 6.0, size=500)),
            ("all_high", rng.uniform(0.9, 1.0, size=200)),
        ]),
        sample_case("beta_99", rng.beta(5.0, 5.0, size=99), rng, [
            ("same", rng.beta(5.0, 5.0, size=300)),
        ]),
        # Ties, zeros and ones: quantised scores.
        sample_case("quantised_37", np.round(rng.uniform(0, 1, size=37) * 8) / 8, rng, [
            ("same", np.round(rng.uniform(0, 1, size=100) * 8) / 8),
        ]),
        sample_case("tiny_3", [0.2, 0.7, 0.4], rng, []),
    ]
    alarms = []
    for alpha, n, m in [(0.001, 3, 5), (0.01, 3, 5), (0.1, 3, 5), (0.05, 1, 1), (0.2, 5, 10),
                        (0.001, 2, 1000), (0.001, 10, 1000), (0.01, 30, 1000), (0.3, 200, 1000),
                        (0.5, 500, 1000), (0.5, 1, 1000), (1e-5, 5, 20), (0.02, 40, 1000)]:
        alarms.append({"alpha": alpha, "n": n, "m": m, "p": float(binom.sf(n - 1, m, alpha))})
    norms = []
    for v, t in [(0.3, 0.3), (0.1, 0.3), (0.9, 0.3), (0.0, 0.5), (1.0, 0.5), (0.42, 0.61),
                 (0.999, 0.99), (0.5, 0.2)]:
        v32, t32 = float(np.float32(v)), float(np.float32(t))
        lv, lt = logit(v32), logit(t32)
        norms.append({"value": v32, "t2": t32, "norm": float(1 / (1 + math.exp(-(lv - lt))))})
    doc = {"samples": samples, "alarm_rate": alarms, "score_norm": norms}
    path = out / "expected.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
