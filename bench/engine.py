"""Engine overhead: recalib's engine vs a bare train-mode forward loop and torch's update_bn.

Same model (a small ResNet-style BN CNN, random init) and the same batches for every contender;
runs alternate (bare, update_bn, engine population, engine batch_mean) so machine noise hits all
alike; the median of the repetitions is reported with ratios to the bare loop (the floor) and to
update_bn (the peer). Targets: engine ≤ 1.10× bare, ≤ 1.0× update_bn.

    python bench/engine.py [--device cpu|cuda] [--repeats 7] [--batches 20] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from worker.engine import recalibrate


def _block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


def make_model() -> nn.Module:
    """A ResNet-ish stack without skips: 13 BN layers, 32×32 RGB input, 10 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        _block(32, 32, 1),
        _block(32, 64, 2),
        _block(64, 64, 1),
        _block(64, 128, 2),
        _block(128, 128, 1),
        _block(128, 256, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    ).eval()


def bare_loop(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> None:
    """The floor: BN in train mode, forward every batch, nothing else."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    with torch.no_grad():
        for batch in batches:
            model(batch.to(device, non_blocking=True))
    model.eval()


def torch_update_bn(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> None:
    update_bn(batches, model, device=device)


def engine(estimator: str) -> Callable[[nn.Module, list[torch.Tensor], torch.device], None]:
    def run(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> None:
        recalibrate(model, batches, estimator=estimator, device=device)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = make_model().to(device)
    batches = [torch.randn(args.batch_size, 3, 32, 32) * 2 + 1 for _ in range(args.batches)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    contenders = {
        "bare train-mode loop": bare_loop,
        "torch update_bn": torch_update_bn,
        "recalib population": engine("population"),
        "recalib batch_mean": engine("batch_mean"),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn(copy.deepcopy(base), batches[:2], device)
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            model = copy.deepcopy(base)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(model, batches, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    bare = statistics.median(times["bare train-mode loop"])
    peer = statistics.median(times["torch update_bn"])
    print(
        f"device={device} torch={torch.__version__} python={platform.python_version()} "
        f"threads={torch.get_num_threads()} batches={args.batches}×{args.batch_size} "
        f"repeats={args.repeats}"
    )
    print("| contender | median s | × bare | × update_bn |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / bare:.3f} | {median / peer:.3f} |")


if __name__ == "__main__":
    main()
