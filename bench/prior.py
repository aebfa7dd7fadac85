"""Few-sample recalibration: no adaptation, full adaptation, a fixed prior N = 16 and ``auto``.

For each case (digits models of several seeds under three target domains: the demo's shift, a
quarter of it, and none; and a BN MLP on scikit-learn's breast-cancer features under a gain and
offset shift), each n in 2 … 256 and several random draws of n calibration samples, top-1 on the
evaluation split after recalibrating with ``prior_strength`` 0 (full), 16 and ``auto``, against the
model as it is (none). n = 1 cannot be calibrated (train-mode BN needs two samples per channel),
so ``auto`` at n = 1 is the model as it is. Prints a markdown table of means over draws and seeds.

    python bench/prior.py [--seeds 0,1,2] [--draws 5] [--ns 1,2,4,8,16,32,64,256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from worker.digits import accuracy, make_digits_case
from worker.engine import recalibrate

PRIORS = {"full": 0.0, "N=16": 16.0, "auto": "auto"}


def _shift(x: np.ndarray, contrast: float, brightness: float, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    return (contrast * x + brightness + rng.normal(0, noise, size=x.shape)).astype(np.float32)


def digits_cases(seeds: list[int]) -> Iterator[tuple[str, nn.Module, np.ndarray, tuple]]:
    for seed in seeds:
        case = make_digits_case(seed=seed)
        calib, (eval_x, eval_y) = case.calibration[0], case.evaluation
        for name, (c, b, s) in {
            "digits, demo shift": (0.35, 0.5, 0.05),
            "digits, 25 % shift": (0.8375, 0.125, 0.0125),
            "digits, clean": (1.0, 0.0, 0.0),
        }.items():
            yield (name, case.model, _shift(calib, c, b, s, 10 + seed),
                   (_shift(eval_x, c, b, s, 20 + seed), eval_y))  # fmt: skip


def cancer_cases(seeds: list[int]) -> Iterator[tuple[str, nn.Module, np.ndarray, tuple]]:
    """A BN MLP on standardized breast-cancer features; targets: every feature ×2 + 1 (after
    the first Linear a per-channel affine change, which BN undoes), and a per-feature gain in
    [1, 2] + 0.5 (not per-channel after the Linear: BN cannot undo it)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = ((data.data - data.data.mean(0)) / data.data.std(0)).astype(np.float32)
    y = data.target.astype(np.int64)
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(x))
        train, calib, test = order[:200], order[200:460], order[460:]
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(30, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2),
        )  # fmt: skip
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
        model.train()
        for _ in range(60):
            for idx in torch.randperm(len(xt)).split(32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                optimizer.step()
        model.eval()
        rng = np.random.default_rng(100 + seed)
        per_feature = rng.uniform(1.0, 2.0, size=30).astype(np.float32)
        for label, gain, offset in (
            ("breast cancer, gain 2 + offset 1", np.float32(2.0), 1.0),  # BN fixes it
            ("breast cancer, per-feature gain", per_feature, 0.5),  # not per-channel after Linear
        ):

            def shifted(a: np.ndarray, gain: np.ndarray = gain, offset: float = offset):
                return (a * gain + offset).astype(np.float32)

            yield label, model, shifted(x[calib]), (shifted(x[test]), y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--ns", default="1,2,4,8,16,32,64,256")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    ns = [int(n) for n in args.ns.split(",")]
    scores: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for name, model, calib, (eval_x, eval_y) in [*digits_cases(seeds), *cancer_cases(seeds)]:
        none = accuracy(model, eval_x, eval_y)
        for n in ns:
            for draw in range(args.draws):
                scores[(name, n, "none")].append(none)
                pick = np.random.default_rng(1000 * n + draw).choice(len(calib), n, replace=False)
                sample = torch.from_numpy(calib[pick])
                for label, prior in PRIORS.items():
                    if n < 2:
                        value = none if label == "auto" else float("nan")
                    else:
                        adapted = copy.deepcopy(model)
                        recalibrate(adapted, sample.split(64), prior_strength=prior)
                        value = accuracy(adapted, eval_x, eval_y)
                    scores[(name, n, label)].append(value)
    names = list(dict.fromkeys(key[0] for key in scores))
    print("| case | n | none | full | N=16 | auto | auto − max(none, full) |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        for n in ns:
            means = {k: statistics.fmean(scores[(name, n, k)]) for k in ("none", *PRIORS)}
            best = max(means["none"], means["full"]) if n >= 2 else means["none"]
            cells = " | ".join("n/a" if np.isnan(means[k]) else f"{100 * means[k]:.1f}"
                               for k in ("none", *PRIORS))  # fmt: skip
            margin = 100 * (means["auto"] - best)
            print(f"| {name} | {n} | {cells} | {margin:+.1f}{' MISSED' if margin < -1 else ''} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
