"""Drift score against the gain recalibration brings, on digits: where to set the threshold.

For several trained digits models (seeds) and several shifts of the target domain, from none
(held-out clean digits) through milder versions of the demo's shift to the demo's own (contrast
×0.35, brightness +0.5, noise σ 0.05), prints the drift score (:func:`worker.engine.drift
.measure_drift`) on the calibration split and the top-1 on the evaluation split before and after
recalibration on that split. The threshold belongs between the scores of samples where
recalibration does not help and those where it does.

    python bench/drift.py [--seeds 0,1,2] [--samples 359,64,16]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from worker.digits import accuracy, make_digits_case
from worker.engine import recalibrate
from worker.engine.drift import measure_drift

SHIFTS = {  # name: (contrast, brightness, noise σ)
    "clean": (1.0, 0.0, 0.0),
    "noise 0.05": (1.0, 0.0, 0.05),
    "bright +0.1": (1.0, 0.1, 0.0),
    "10 % of demo": (0.935, 0.05, 0.005),
    "25 % of demo": (0.8375, 0.125, 0.0125),
    "50 % of demo": (0.675, 0.25, 0.025),
    "demo shift": (0.35, 0.5, 0.05),
}


def shifted(inputs: np.ndarray, shift: tuple[float, float, float], seed: int) -> np.ndarray:
    contrast, brightness, noise = shift
    rng = np.random.default_rng(seed)
    out = contrast * inputs + brightness + rng.normal(0.0, noise, size=inputs.shape)
    return out.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", default="359,64,16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| seed | shift | n | drift score | top-1 before | top-1 after | gain |")
    print("|---|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        case = make_digits_case(seed=seed)
        calib_x, _ = case.calibration
        eval_x, eval_y = case.evaluation
        for name, shift in SHIFTS.items():
            target_calib = shifted(calib_x, shift, seed=100 + seed)
            target_eval = shifted(eval_x, shift, seed=200 + seed)
            for n in (int(s) for s in args.samples.split(",")):
                sample = torch.from_numpy(target_calib[:n])
                drift = measure_drift(case.model, sample.split(64))
                before = accuracy(case.model, target_eval, eval_y)
                model = copy.deepcopy(case.model)
                recalibrate(model, sample.split(64))
                after = accuracy(model, target_eval, eval_y)
                print(
                    f"| {seed} | {name} | {n} | {drift.score:.4f} | {before:.3f} | {after:.3f} "
                    f"| {after - before:+.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
