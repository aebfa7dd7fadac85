"""worker.formats.models: each model format loads, recalibrates and saves back in its own format."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn

from recalib.errors import (
    ArchitectureNotAllowedError,
    InvalidModelError,
    InvalidOptionError,
    StatisticsUnchangedError,
    UnsafePickleError,
)
from tests.worker.formats_files import (
    DIGITS_ALLOWLIST,
    DIGITS_ARCH,
    bn_stats,
    write_model_files,
)
from worker.engine import recalibrate
from worker.formats.data import make_loader, open_samples
from worker.formats.models import LoadedModel, read_model

ARCH = {"arch": DIGITS_ARCH, "arch_kwargs": {"width": 16}, "arch_allowlist": DIGITS_ALLOWLIST}
LOAD_KWARGS = {
    "pt2": {},
    "scripted": {},
    "traced": {},
    "safetensors": ARCH,
    "pt": ARCH,
    "checkpoint": ARCH,
    "module": {"allow_unsafe_pickle": True},
}
FORMATS = {
    "pt2": "pt2",
    "scripted": "torchscript",
    "traced": "torchscript",
    "safetensors": "safetensors",
    "pt": "pt",
    "checkpoint": "pt",
    "module": "module",
}


@pytest.fixture(scope="module")
def shifted(digits_case) -> torch.Tensor:
    return torch.from_numpy(digits_case.shifted_calibration[0])


@pytest.fixture(scope="module")
def model_files(digits_case, shifted, tmp_path_factory):
    return write_model_files(digits_case.model, shifted[:4], tmp_path_factory.mktemp("models"))


def _reload(kind: str, loaded: LoadedModel, path) -> dict[str, torch.Tensor]:
    """Load a saved file the *original* way (not through recalib) and return its BN stats."""
    if kind == "pt2":
        program = torch.export.load(path)
        return {k: v for k, v in program.state_dict.items() if k.endswith(("_mean", "_var"))}
    if kind in ("scripted", "traced"):
        return bn_stats(torch.jit.load(str(path)))
    if kind == "safetensors":
        return {k: v for k, v in safetensors.torch.load_file(str(path)).items() if "running" in k}
    if kind == "module":
        return bn_stats(torch.load(path, weights_only=False))
    return {k: v for k, v in torch.load(path, weights_only=True).items() if "running" in k}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_round_trip_keeps_new_statistics(kind, model_files, digits_case, shifted, tmp_path):
    loaded = read_model(model_files[kind], **LOAD_KWARGS[kind])
    assert loaded.format == FORMATS[kind]
    assert not loaded.module.training
    with torch.no_grad():  # loading changes nothing
        torch.testing.assert_close(loaded.module(shifted), digits_case.model(shifted))
    for name, buffer in loaded.module.named_buffers():
        if name.endswith("running_mean"):
            buffer.add_(0.25)  # simulate new statistics, in place as the engine does
    expected = bn_stats(loaded.module)
    artifact = loaded.save(tmp_path)
    suffix = model_files[kind].suffix
    assert artifact.file == f"{model_files[kind].stem}.recalibrated{suffix}"
    assert artifact.format == ("pt" if kind == "module" else FORMATS[kind])
    saved = tmp_path / artifact.file
    assert artifact.bytes == saved.stat().st_size and len(artifact.sha256) == 64
    reloaded = _reload(kind, loaded, saved)
    assert set(reloaded) == set(expected) and len(expected) == 6
    for name, value in expected.items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0)


def test_pt2_bn_modules_are_real_and_shared(model_files):
    loaded = read_model(model_files["pt2"])
    bns = {
        n: type(m).__name__
        for n, m in loaded.module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    assert bns == {
        "features.1": "BatchNorm2d",
        "features.4": "BatchNorm2d",
        "head.1": "BatchNorm1d",
    }
    program = loaded.program
    assert program is not None
    bn = loaded.module.get_submodule("features.1")
    assert bn.running_mean.data_ptr() == program.state_dict["features.1.running_mean"].data_ptr()
    loaded.module.train()  # the unlifted export module refuses this; ours must not
    loaded.module.eval()


def test_pt2_dynamic_batch_survives_save(model_files, shifted, tmp_path):
    loaded = read_model(model_files["pt2"])
    torch.optim.swa_utils.update_bn([shifted[:64], shifted[64:128]], loaded.module)
    loaded.module.eval()
    saved = torch.export.load(tmp_path / loaded.save(tmp_path).file).module()
    with torch.no_grad():
        for batch in (1, 5, 200):
            torch.testing.assert_close(saved(shifted[:batch]), loaded.module(shifted[:batch]))


def test_decomposed_pt2_uses_the_legit_batch_norm_op(digits_case, shifted, tmp_path):
    from tests.worker.formats_files import export_program

    program = export_program(digits_case.model, shifted[:4]).run_decompositions()
    targets = {str(n.target) for n in program.graph.nodes}
    assert "aten._native_batch_norm_legit_no_training.default" in targets
    torch.export.save(program, tmp_path / "decomposed.pt2")
    loaded = read_model(tmp_path / "decomposed.pt2")
    assert len(bn_stats(loaded.module)) == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(shifted), digits_case.model(shifted))


def test_engine_gives_the_same_statistics_in_every_format(model_files, digits_case, tmp_path):
    """pt2, scripted TorchScript and state_dict+arch recalibrate like the eager module."""
    import numpy as np

    x, y = digits_case.shifted_calibration
    np.savez(tmp_path / "calib.npz", inputs=x, labels=y)
    samples = open_samples(tmp_path / "calib.npz")
    eager = read_model(model_files["module"], allow_unsafe_pickle=True)
    recalibrate(eager.module, make_loader(samples, indices=None, batch_size=64))
    reference = bn_stats(eager.module)
    for kind in ("pt2", "scripted", "safetensors", "pt"):
        loaded = read_model(model_files[kind], **LOAD_KWARGS[kind])
        recalibrate(loaded.module, make_loader(samples, indices=None, batch_size=64))
        stats = bn_stats(loaded.module)
        assert set(stats) == set(reference), kind
        for name, value in reference.items():
            torch.testing.assert_close(
                stats[name], value, rtol=1e-4, atol=1e-5, msg=f"{kind} {name}"
            )
        reloaded = _reload(kind, loaded, tmp_path / loaded.save(tmp_path).file)
        for name, value in reference.items():
            torch.testing.assert_close(reloaded[name], value, rtol=1e-4, atol=1e-5)
    traced = read_model(model_files["traced"])
    with pytest.raises(StatisticsUnchangedError):
        recalibrate(traced.module, make_loader(samples, indices=None, batch_size=64))


def test_format_is_detected_by_content_not_extension(model_files, tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(model_files["safetensors"].read_bytes())
    assert read_model(renamed, **ARCH).format == "safetensors"
    renamed.write_bytes(model_files["pt2"].read_bytes())
    assert read_model(renamed).format == "pt2"


def test_state_dict_without_arch_says_to_pass_arch(model_files):
    with pytest.raises(InvalidModelError, match="pass arch as 'module:callable'") as info:
        read_model(model_files["safetensors"])
    assert info.value.file == str(model_files["safetensors"])


@pytest.mark.parametrize(
    ("arch", "allowlist"),
    [
        ("worker.digits:DigitsNet", ("worker.dig",)),  # a prefix, but not on a dot boundary
        ("os:system", ("worker.digits",)),
        ("timmy.models:net", ("timm",)),
    ],
)
def test_arch_outside_allowlist_is_refused(model_files, arch, allowlist):
    with pytest.raises(ArchitectureNotAllowedError, match="is not under the allowed prefixes"):
        read_model(model_files["safetensors"], arch=arch, arch_allowlist=allowlist)


def test_allowlist_prefix_allows_submodules(model_files):
    loaded = read_model(model_files["pt"], arch=DIGITS_ARCH, arch_allowlist=("worker",))
    assert loaded.format == "pt"


def test_bad_arch_and_kwargs_are_option_errors(model_files):
    path = model_files["safetensors"]
    with pytest.raises(InvalidOptionError, match="must be 'module:callable'"):
        read_model(path, arch="worker.digits.DigitsNet", arch_allowlist=DIGITS_ALLOWLIST)
    with pytest.raises(InvalidOptionError, match="has no Missing"):
        read_model(path, arch="worker.digits:Missing", arch_allowlist=DIGITS_ALLOWLIST)
    with pytest.raises(InvalidOptionError, match="rejected arch_kwargs"):
        read_model(path, **{**ARCH, "arch_kwargs": {"depth": 3}})
    with pytest.raises(InvalidOptionError, match="JSON values"):
        read_model(path, **{**ARCH, "arch_kwargs": {"width": object()}})


def test_state_dict_mismatch_names_keys_and_shapes(model_files, tmp_path):
    state = safetensors.torch.load_file(str(model_files["safetensors"]))
    del state["head.4.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(InvalidModelError) as info:
        read_model(path, **ARCH)
    message = str(info.value)
    assert "missing keys [head.4.bias]" in message and "unexpected keys [extra.weight]" in message
    with pytest.raises(
        InvalidModelError, match=r"features.0.weight: file \(16, 1, 3, 3\) vs model \(8, 1, 3, 3\)"
    ):
        read_model(model_files["safetensors"], **{**ARCH, "arch_kwargs": {"width": 8}})


def test_checkpoint_wrappers_and_dataparallel_prefix_unwrap(model_files, tmp_path):
    state = torch.load(model_files["pt"], weights_only=True)
    path = tmp_path / "wrapped.pt"
    prefixed = {f"module.{k}": v for k, v in state.items()}  # as DataParallel saves them
    torch.save({"model": prefixed, "step": 1}, path)
    loaded = read_model(path, **ARCH)
    torch.testing.assert_close(
        bn_stats(loaded.module)["features.1.running_var"], state["features.1.running_var"]
    )
    saved = torch.load(tmp_path / loaded.save(tmp_path).file, weights_only=True)
    assert set(saved) == set(state)  # saved as the plain state_dict the model uses
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(InvalidModelError, match="no state_dict found"):
        read_model(tmp_path / "odd.pt", **ARCH)


def test_safetensors_metadata_is_kept(model_files, tmp_path):
    loaded = read_model(model_files["safetensors"], **ARCH)
    saved = tmp_path / loaded.save(tmp_path).file
    with safetensors.safe_open(str(saved), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "digits"}


def test_whole_module_pickle_needs_opt_in(model_files):
    with pytest.raises(UnsafePickleError) as info:
        read_model(model_files["module"])
    message = str(info.value)
    assert "worker.digits.DigitsNet" in message and "arbitrary code" in message
    assert "--allow-unsafe-pickle" in message and "RECALIB_ALLOW_UNSAFE_PICKLE" in message


def test_arch_with_a_program_is_an_option_error(model_files):
    with pytest.raises(InvalidOptionError, match="arch is for state_dict files"):
        read_model(model_files["pt2"], **ARCH)


@pytest.mark.parametrize("kind", ["pt2", "scripted", "safetensors", "pt"])
def test_truncated_files_are_named(kind, model_files, tmp_path):
    data = model_files[kind].read_bytes()
    path = tmp_path / f"cut{model_files[kind].suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError, match=r"cut\.\w+: .*(corrupt|truncated)") as info:
        read_model(path, **(ARCH if kind in ("safetensors", "pt") else {}))
    assert info.value.file == str(path)


def test_unknown_and_empty_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InvalidModelError, match=r"empty\.pt: the model file is empty"):
        read_model(tmp_path / "empty.pt")
    (tmp_path / "notes.pt").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(InvalidModelError, match=r"notes\.pt: not a recognized model file"):
        read_model(tmp_path / "notes.pt")


def test_state_dict_dtypes_survive_the_round_trip(model_files, tmp_path):
    state = safetensors.torch.load_file(str(model_files["safetensors"]))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    safetensors.torch.save_file(half, str(tmp_path / "half.safetensors"))
    loaded = read_model(tmp_path / "half.safetensors", **ARCH)
    assert loaded.module.get_submodule("features.0").weight.dtype == torch.float32  # arch's dtype
    saved = safetensors.torch.load_file(str(tmp_path / "out" / loaded.save(tmp_path / "out").file))
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in half.items()}
