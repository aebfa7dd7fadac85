"""A small real domain-shift case: scikit-learn's digits, a BN CNN, and a shifted target domain.

Used by ``recalib demo`` and by the tests (one implementation, so the demo shows what the tests
check). Needs scikit-learn, which ships the digits data set: nothing is downloaded.

The shift mimics a new sensor: lower contrast, a brightness offset and pixel noise. The weights are
unchanged by it, only the input distribution moves, which is exactly what BN recalibration repairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

DIGITS_CLASSES = 10
TRAIN_BATCH_SIZE = 64
TRAIN_MAX_LR = 3e-3


class DigitsNet(nn.Module):
    """Conv-BN-ReLU ×2, pooling, Linear-BN1d-ReLU, Dropout, Linear: 1×8×8 inputs, 10 classes."""

    def __init__(self, width: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(8 * width, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, DIGITS_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float32 ``N×1×8×8`` in [0, 1] and int64 labels ``N``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return inputs, digits.target.astype(np.int64)


def shift_domain(inputs: np.ndarray, seed: int = 0) -> np.ndarray:
    """The target domain: contrast ×0.35, brightness +0.5, Gaussian noise σ=0.05 (float32)."""
    rng = np.random.default_rng(seed)
    shifted = 0.35 * inputs + 0.5 + rng.normal(0.0, 0.05, size=inputs.shape)
    return shifted.astype(np.float32)


def split_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic train / calibration / evaluation index split (60% / 20% / 20%)."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    return order[:a], order[a:b], order[b:]


def train_digits_model(
    inputs: np.ndarray, labels: np.ndarray, *, epochs: int = 30, seed: int = 0
) -> DigitsNet:
    """Train a :class:`DigitsNet` on the given (source-domain) data; returned in eval mode, float32.

    Reproducible across machines as far as torch allows: float64 arithmetic, one thread,
    deterministic algorithms, a seeded initialisation, batch order and dropout, and a one-cycle
    learning rate that anneals to zero. Rounding differences between CPUs (another SIMD path in a
    kernel) start at ~1e-16 in float64; perturbations a million times larger leave the float32
    weights unchanged, where float32 training diverged to a visibly different model (clean top-1
    0.989 with one thread, 0.964 with two). The caller's thread count, determinism flag and
    global random stream are restored afterwards.
    """
    with _reproducible_torch():
        torch.manual_seed(seed)
        model = DigitsNet().double()
        x, y = torch.from_numpy(inputs).double(), torch.from_numpy(labels)
        batches_per_epoch = -(-len(x) // TRAIN_BATCH_SIZE)
        optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_MAX_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=TRAIN_MAX_LR, total_steps=epochs * batches_per_epoch
        )
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).split(TRAIN_BATCH_SIZE):
                if len(idx) >= 2:  # BN needs two samples
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    optimizer.step()
                schedule.step()
    return model.float().eval()


@contextlib.contextmanager
def _reproducible_torch() -> Iterator[None]:
    """One thread, deterministic algorithms and a forked global RNG; all restored on exit."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.set_num_threads(threads)


def accuracy(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (in its current mode) on the arrays, a fraction in [0, 1]."""
    with torch.no_grad():
        predictions = model(torch.from_numpy(inputs)).argmax(1).numpy()
    return float((predictions == labels).mean())


@dataclass(frozen=True)
class DigitsCase:
    """A trained model plus source and shifted target splits, all as arrays."""

    model: DigitsNet
    train: tuple[np.ndarray, np.ndarray]
    calibration: tuple[np.ndarray, np.ndarray]
    evaluation: tuple[np.ndarray, np.ndarray]

    @property
    def shifted_calibration(self) -> tuple[np.ndarray, np.ndarray]:
        return shift_domain(self.calibration[0], seed=1), self.calibration[1]

    @property
    def shifted_evaluation(self) -> tuple[np.ndarray, np.ndarray]:
        return shift_domain(self.evaluation[0], seed=2), self.evaluation[1]


def make_digits_case(seed: int = 0, epochs: int = 30) -> DigitsCase:
    """Train the demo model on the source domain and prepare the target-domain splits."""
    inputs, labels = load_digits_arrays()
    train, calib, evaluation = split_indices(len(inputs), seed)
    model = train_digits_model(inputs[train], labels[train], epochs=epochs, seed=seed)
    return DigitsCase(
        model=model,
        train=(inputs[train], labels[train]),
        calibration=(inputs[calib], labels[calib]),
        evaluation=(inputs[evaluation], labels[evaluation]),
    )


def write_demo_files(case: DigitsCase, out_dir: Path) -> dict[str, Path]:
    """Save the model as a ``.pt2`` program and the shifted splits as ``.npz``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "digits.pt2"
    example = torch.from_numpy(case.calibration[0][:4])
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(case.model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, model_path)
    paths = {"model": model_path}
    for name, (x, y) in {
        "calibration": case.shifted_calibration,
        "evaluation": case.shifted_evaluation,
    }.items():
        paths[name] = out_dir / f"target-{name}.npz"
        np.savez(paths[name], inputs=x, labels=y)
    return paths
