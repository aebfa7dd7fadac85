"""worker.runner.model_cache: a warm runner's loaded models, each job given a fresh copy.

The reference is the cold path: ``run_job`` reading the model file for every job. Two jobs on the
same model with different target domains must end with exactly the BN statistics of two cold
runs, whatever the format (a ``.pt2`` program is changed in place when saved; a TorchScript or
eager module by the recalibration itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from recalib.contract import JobOptions, JobSpec
from tests.worker.formats_files import DIGITS_ALLOWLIST, DIGITS_ARCH, bn_stats, export_program
from worker.digits import shift_domain
from worker.formats.models import load_model, model_source, read_model
from worker.pipeline import run_job
from worker.runner.model_cache import ModelCache, file_sha256, model_bytes


def _model_file(kind: str, model: torch.nn.Module, out_dir: Path) -> tuple[Path, dict]:
    """The digits model as ``kind``, and the spec fields it needs."""
    model = model.eval()
    if kind == "pt2":
        path = out_dir / "digits.pt2"
        torch.export.save(export_program(model, torch.zeros(4, 1, 8, 8)), path)
        return path, {}
    if kind == "torchscript":
        path = out_dir / "scripted.pt"
        torch.jit.save(torch.jit.script(model), str(path))
        return path, {}
    path = out_dir / "digits.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, {"arch": DIGITS_ARCH, "arch_allowlist": list(DIGITS_ALLOWLIST)}


def _checkpoint_stats(report, out_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    path = out_dir / report.checkpoint.file
    if kind == "safetensors":
        return bn_stats(load_model(path, arch=DIGITS_ARCH, arch_allowlist=DIGITS_ALLOWLIST).module)
    return bn_stats(read_model(path).module)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pt2", "torchscript", "safetensors"])
def test_two_jobs_on_a_cached_model_equal_two_cold_runs(
    kind: str, digits_case, digits_files, tmp_path: Path
) -> None:
    model_path, extra = _model_file(kind, digits_case.model, tmp_path)
    inputs, labels = digits_case.shifted_calibration
    other = tmp_path / "other-domain.npz"  # a second target domain: another shift
    np.savez(other, inputs=shift_domain(inputs, seed=11), labels=labels)
    targets = [digits_files["calibration"], other]

    def spec(target: Path, out: str) -> JobSpec:
        return JobSpec(
            model_path=str(model_path),
            calibration_path=str(target),
            eval_path=str(digits_files["evaluation"]),
            out_dir=str(tmp_path / out),
            options=JobOptions(),
            **extra,
        )

    cold = [run_job(spec(t, f"cold-{i}")) for i, t in enumerate(targets)]
    cache = ModelCache(max_bytes=1 << 30)
    with model_source(cache.load):
        warm = [run_job(spec(t, f"warm-{i}")) for i, t in enumerate(targets)]
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)

    for i, (c, w) in enumerate(zip(cold, warm, strict=True)):
        expected = _checkpoint_stats(c, tmp_path / f"cold-{i}", kind)
        got = _checkpoint_stats(w, tmp_path / f"warm-{i}", kind)
        assert expected.keys() == got.keys() and expected
        for name in expected:
            assert torch.equal(expected[name], got[name]), (i, name)
        assert w.after == c.after and w.before == c.before
    assert not torch.equal(  # the two domains did move the statistics differently
        *[_checkpoint_stats(w, tmp_path / f"warm-{i}", kind)["features.1.running_mean"]
          for i, w in enumerate(warm)]
    )  # fmt: skip
    original = bn_stats(read_model(model_path, **_load_kwargs(extra)).module)
    (entry,) = cache._entries.values()
    for name, value in bn_stats(entry.loaded.module).items():  # the cached copy never changed
        assert torch.equal(value, original[name]), name


def _load_kwargs(extra: dict) -> dict:
    if "arch" not in extra:
        return {}
    return {"arch": extra["arch"], "arch_allowlist": tuple(extra["arch_allowlist"])}


def test_a_copy_shares_nothing_with_the_cached_model(digits_files) -> None:
    cache = ModelCache(max_bytes=1 << 30)
    first = cache.load(digits_files["model"])
    second = cache.load(digits_files["model"])
    with torch.no_grad():
        for buffer in first.module.buffers():
            buffer.add_(1)
        for name, value in first.program.state_dict.items():
            first.program.state_dict[name] = value + 1  # what saving a .pt2 does
    fresh = cache.load(digits_files["model"])
    for a, b in zip(second.module.buffers(), fresh.module.buffers(), strict=True):
        assert torch.equal(a, b)
    for name, value in second.program.state_dict.items():
        assert torch.equal(value, fresh.program.state_dict[name])
    assert cache.hits == 2


def test_the_key_is_the_content_and_the_loading_arguments(tmp_path: Path, digits_case) -> None:
    model_path, extra = _model_file("safetensors", digits_case.model, tmp_path)
    kwargs = {"arch": extra["arch"], "arch_allowlist": tuple(extra["arch_allowlist"])}
    cache = ModelCache(max_bytes=1 << 30)
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(model_path.read_bytes())
    cache.load(model_path, **kwargs)
    loaded = cache.load(copy, **kwargs)  # same content, another name: a hit
    assert loaded.source_path == copy  # saved under this job's file name
    assert (cache.hits, cache.misses) == (1, 1)
    cache.load(copy, arch_kwargs={"width": 16}, **kwargs)  # another build of it: a miss
    assert (cache.hits, cache.misses) == (1, 2)
    cache.load(copy, sha256=file_sha256(model_path), **kwargs)  # the upload's sha256: a hit
    assert cache.hits == 2


def test_least_recently_used_models_go_first_and_oversized_ones_are_not_kept(
    tmp_path: Path, digits_case
) -> None:
    paths = []
    for width in (8, 12, 16):
        model = type(digits_case.model)(width=width).eval()
        path = tmp_path / f"w{width}.pt"
        torch.jit.save(torch.jit.script(model), str(path))
        paths.append(path)
    sizes = [model_bytes(read_model(p)) for p in paths]
    cache = ModelCache(max_bytes=sizes[1] + sizes[2])
    cache.load(paths[1])
    cache.load(paths[2])
    cache.load(paths[1])  # w12 is now the most recently used
    cache.load(paths[0])  # needs room: w16 goes
    assert cache.size_bytes <= cache.max_bytes
    cache.load(paths[1])
    assert cache.hits == 2
    cache.load(paths[2])
    assert cache.misses == 4  # w16 was evicted

    tiny = ModelCache(max_bytes=sizes[0] - 1)
    tiny.load(paths[0])
    assert len(tiny) == 0  # over the whole bound: not cached
    off = ModelCache(max_bytes=0)
    off.load(paths[0])
    off.load(paths[0])
    assert (len(off), off.hits, off.misses) == (0, 0, 2)


def test_a_spare_copy_made_between_jobs_serves_the_next_job_once(digits_files) -> None:
    size = model_bytes(read_model(digits_files["model"]))
    cache = ModelCache(max_bytes=2 * size)
    first = cache.load(digits_files["model"])
    cache.prepare_spare()
    (entry,) = cache._entries.values()
    spare = entry.spare
    assert spare is not None and cache.size_bytes == 2 * size
    with torch.no_grad():
        for buffer in first.module.buffers():  # the first job changes its own copy
            buffer.add_(1)
    second = cache.load(digits_files["model"])
    assert second.module is spare.module and entry.spare is None  # taken, not copied again
    for a, b in zip(second.module.buffers(), entry.loaded.module.buffers(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    third = cache.load(digits_files["model"])  # no spare left: copied now
    assert third.module is not second.module and cache.hits == 2

    tight = ModelCache(max_bytes=size)  # no room for a spare: none is made
    tight.load(digits_files["model"])
    tight.prepare_spare()
    assert next(iter(tight._entries.values())).spare is None
