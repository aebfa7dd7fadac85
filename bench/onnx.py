"""ONNX recalibration: the ONNX engine vs the torch engine, and the rewrite vs plain inference.

One model (bench/engine.py's ResNet-style stack, 13 BN layers, random init), exported to ONNX by
torch's legacy exporter with BN kept, and the same batches for every contender; rounds alternate
so machine noise hits all alike; medians of the rounds, with ratios:

- ``torch engine``: :func:`worker.engine.recalibrate` (population) on the torch model;
- ``onnx engine``: :func:`worker.onnx.recalibrate_onnx` (population) on the ONNX model, end to end
  (rewrite, session creation, passes, writing the new model);
- ``onnx plain inference``: an ONNX Runtime session of the original model run on the batches (the
  floor: what a forward costs; ONNX Runtime folds eval-mode BN into the Conv here);
- ``onnx rewrite pass``: the statistics graph's session run on the batches (the forward passes of
  the ONNX engine alone). Target: ≤ 1.3× plain inference.

Ratios are given of the medians and, ``paired``, as the median of each round's own ratio.

Both runtimes get the same intra-op thread count (``--threads``).

    python bench/onnx.py [--rounds 5] [--batches 20] [--batch-size 64] [--threads 2] [--out F]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from bench.common import machine, summary, write_results
from bench.engine import make_model
from worker.engine import recalibrate
from worker.onnx import recalibrate_onnx
from worker.onnx.graph import find_bn_nodes, statistics_graph
from worker.onnx.session import make_session


def export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            input_names=["x"], dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    return onnx.load(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(args.batch_size, 3, 32, 32, generator=generator) * 2 + 0.5
        for _ in range(args.batches)
    ]
    arrays = [b.numpy() for b in batches]
    model = make_model()
    with tempfile.TemporaryDirectory() as folder:
        proto = export(model, batches[0][:4], Path(folder) / "bench.onnx")
    nodes, _ = find_bn_nodes(proto, "bench.onnx")
    rewritten, outputs = statistics_graph(proto, nodes)
    stat_names = [n for out in outputs for n in (out.mean, out.var, out.size)]
    fused, fused_outputs = statistics_graph(proto, nodes, training_bn=True)
    fused_names = [n for out in fused_outputs for n in (out.mean, out.var, out.size)]
    plain = make_session(proto, "plain", threads=args.threads)
    stats = make_session(rewritten, "rewrite", threads=args.threads)
    fused_stats = make_session(fused, "training-mode BN", threads=args.threads)

    def torch_engine() -> None:
        recalibrate(make_model(), batches, estimator="population")

    def onnx_engine() -> None:
        recalibrate_onnx(proto, batches, estimator="population", threads=args.threads)

    def plain_inference() -> None:
        for x in arrays:
            plain.run(None, {"x": x})

    def rewrite_pass() -> None:
        for x in arrays:
            stats.run(stat_names, {"x": x})

    def training_bn_pass() -> None:
        for x in arrays:
            fused_stats.run(fused_names, {"x": x})

    contenders: dict[str, Callable[[], None]] = {
        "torch engine": torch_engine,
        "onnx engine": onnx_engine,
        "onnx plain inference": plain_inference,
        "onnx rewrite pass": rewrite_pass,
        "onnx training-BN pass": training_bn_pass,
    }
    for run in contenders.values():  # warm-up: allocator pools, lazy imports
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}

    def paired(over: str, under: str) -> float:
        """Median over rounds of the ratio within each round (robust to noise between rounds)."""
        return statistics.median(a / b for a, b in zip(times[over], times[under], strict=True))

    write_results(
        {
            "machine": machine(),
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "threads": args.threads,
            "batches": args.batches,
            "batch_size": args.batch_size,
            "bn_nodes": len(nodes),
            "seconds": {name: summary(values, 4) for name, values in times.items()},
            "onnx_engine_over_torch_engine": median["onnx engine"] / median["torch engine"],
            "rewrite_over_plain_inference": median["onnx rewrite pass"]
            / median["onnx plain inference"],
            "training_bn_over_plain_inference": median["onnx training-BN pass"]
            / median["onnx plain inference"],
            "onnx_engine_over_plain_inference": median["onnx engine"]
            / median["onnx plain inference"],
            "paired": {
                "onnx_engine_over_torch_engine": paired("onnx engine", "torch engine"),
                "rewrite_over_plain_inference": paired("onnx rewrite pass", "onnx plain inference"),
                "training_bn_over_plain_inference": paired(
                    "onnx training-BN pass", "onnx plain inference"
                ),
            },
        },
        args.out,
    )


if __name__ == "__main__":
    main()
