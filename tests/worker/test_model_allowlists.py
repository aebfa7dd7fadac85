"""worker.formats.op_allowlist: a model's operators and names are vetted before any of it runs.

The ``*_payload_is_live`` tests prove each hostile model really runs its payload when handed to
torch's own loaders, so that the refusals below them mean something. Every payload leaves a mark
(a file created, or a secret file's bytes in a buffer) that the refusal tests check is absent.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import fx, nn

from recalib.errors import InvalidModelError
from tests.worker.formats_files import export_program
from worker.digits import DigitsNet
from worker.engine import recalibrate
from worker.formats.models import read_model
from worker.formats.op_allowlist import model_allowlists, operator_problem
from worker.formats.pt2_checks import check_graph_targets
from worker.formats.torchscript import check_torchscript_graphs, load_torchscript

SECRET = b"tenant-b's database password\n".ljust(64, b"#")


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def _shell_code(marker: Path) -> str:
    return f"import os;os.system('touch {marker}')"


def _hostile_name(marker: Path) -> str:
    """A submodule name that ``program.module()`` pastes into ``getattr(self, "...")``."""
    code = _shell_code(marker).replace(";", "\\x3b").replace(".", "\\x2e")
    return f'x") if exec("{code}") else ("'


def _hostile_key(marker: Path) -> str:
    """A dict input key that the generated guard function pastes into a string literal."""
    codes = ",".join(str(byte) for byte in _shell_code(marker).encode())
    return f'a"+str(exec(bytes([{codes}]).decode()))+"'


class HostileName(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, nn.Linear(4, 4))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(getattr(self, self.name)(x))


class HostileKey(nn.Module):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.bn = nn.BatchNorm1d(4)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bn(inputs[self.key])


def _save_pt2(model: nn.Module, args: tuple, path: Path) -> Path:
    torch.export.save(torch.export.export(model.eval(), args), path)
    return path


def _hostile_pt2(kind: str, marker: Path, tmp_path: Path) -> tuple[Path, tuple, str]:
    """The file, the forward's arguments, and the hostile name the refusal must quote."""
    if kind == "submodule name":
        name = _hostile_name(marker)
        args: tuple = (torch.randn(3, 4),)
        return _save_pt2(HostileName(name), args, tmp_path / "name.pt2"), args, name
    key = _hostile_key(marker)
    args = ({key: torch.randn(3, 4)},)
    return _save_pt2(HostileKey(key), args, tmp_path / "key.pt2"), args, key


@pytest.mark.parametrize("kind", ["submodule name", "input key"])
def test_hostile_pt2_name_payload_is_live(kind, marker, tmp_path):
    path, args, _ = _hostile_pt2(kind, marker, tmp_path)
    with contextlib.suppress(AttributeError):  # the name's expression fails after it ran
        torch.export.load(path).module()(*args)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["submodule name", "input key"])
def test_pt2_with_code_in_a_name_is_refused_and_nothing_runs(kind, marker, tmp_path):
    path, args, name = _hostile_pt2(kind, marker, tmp_path)
    error = None
    try:
        loaded = read_model(path)
    except InvalidModelError as exc:
        error = exc
    else:  # what the engine would do next
        with contextlib.suppress(AttributeError):  # the name's expression fails after it ran
            loaded.module(*args)
    assert not marker.exists(), "the name's code ran"
    assert error is not None
    assert error.type_slug == "invalid-model"
    assert repr(name)[1:-1] in str(error) and "not a plain name" in str(error)


class Leak(nn.Module):
    """Exploit (b): forward copies any file the worker can read into a buffer."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("loot", torch.zeros(64, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loot.copy_(torch.from_file(self.path, shared=False, size=64, dtype=torch.uint8))
        return self.bn(x)


class Reader(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.register_buffer("loot", torch.zeros(64, dtype=torch.uint8))

    def steal(self) -> None:
        self.loot.copy_(torch.from_file(self.path, shared=False, size=64, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steal()
        return x


class LeakInSubmodule(nn.Module):
    """The read sits in a helper method of a submodule, two calls down from forward."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.BatchNorm1d(4), Reader(path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class LeakInBranch(nn.Module):
    """The read sits in an ``if`` block."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("loot", torch.zeros(64, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e30):
            self.loot.copy_(torch.from_file(self.path, shared=False, size=64, dtype=torch.uint8))
        return self.bn(x)


LEAKS = {"forward": Leak, "submodule method": LeakInSubmodule, "if branch": LeakInBranch}


def _loot(module: nn.Module) -> bytes:
    return b"".join(bytes(b.tolist()) for n, b in module.named_buffers() if n.endswith("loot"))


@pytest.mark.parametrize("where", list(LEAKS))
def test_torchscript_from_file_payload_is_live(where, secret, tmp_path):
    path = tmp_path / "leak.pt"
    torch.jit.save(torch.jit.script(LEAKS[where](str(secret)).eval()), str(path))
    module = torch.jit.load(str(path))
    module(torch.randn(3, 4))
    assert SECRET in _loot(module)


@pytest.mark.parametrize("where", list(LEAKS))
def test_torchscript_from_file_is_refused_before_the_first_forward(where, secret, tmp_path):
    path = tmp_path / "leak.pt"
    torch.jit.save(torch.jit.script(LEAKS[where](str(secret)).eval()), str(path))
    error = None
    try:
        loaded = read_model(path)
    except InvalidModelError as exc:
        error = exc
    else:
        loaded.module(torch.randn(3, 4))
        assert SECRET not in _loot(loaded.module), "the model read the secret file"
    assert error is not None
    assert error.type_slug == "invalid-model"
    assert "aten::from_file" in str(error) and "reads a file" in str(error)
    assert "leak.pt" in str(error)


@pytest.mark.parametrize("where", list(LEAKS))
def test_torchscript_graph_check_finds_from_file_wherever_it_is(where, secret, tmp_path):
    """The check after loading on its own (the source scan before it is the first net)."""
    module = torch.jit.script(LEAKS[where](str(secret)).eval())
    with pytest.raises(
        InvalidModelError, match=r"leak\.pt: method \w+ of .* calls aten::from_file"
    ):
        check_torchscript_graphs(module, tmp_path / "leak.pt")
    assert SECRET not in _loot(module)


class LeakOnLoad(nn.Module):
    """``torch.jit.load`` runs a scripted ``__setstate__``: here it creates the marker file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.register_buffer("loot", torch.zeros(4, dtype=torch.uint8))

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.loot, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.loot = torch.from_file(self.marker, shared=True, size=4, dtype=torch.uint8)
        self.training = state[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_torchscript_setstate_payload_is_live(marker, tmp_path):
    path = tmp_path / "onload.pt"
    torch.jit.save(torch.jit.script(LeakOnLoad(str(marker))), str(path))
    marker.unlink(missing_ok=True)  # scripting does not run __setstate__, but be sure
    torch.jit.load(str(path))
    assert marker.exists()


def test_torchscript_setstate_from_file_is_refused_before_loading(marker, tmp_path):
    path = tmp_path / "onload.pt"
    torch.jit.save(torch.jit.script(LeakOnLoad(str(marker))), str(path))
    marker.unlink(missing_ok=True)
    with pytest.raises(InvalidModelError, match=r"onload\.pt: .*\.py calls aten::from_file"):
        read_model(path)
    assert not marker.exists()


@torch.library.custom_op("recalib_test::passthrough", mutates_args=())
def passthrough(x: torch.Tensor) -> torch.Tensor:
    """Stands for any operator of a library outside torch (it could do anything)."""
    return x.clone()


@passthrough.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.ops.recalib_test.passthrough(x))


@pytest.mark.parametrize("kind", ["pt2", "torchscript"])
def test_custom_namespace_operators_are_refused(kind, tmp_path):
    if kind == "pt2":
        path = _save_pt2(CustomOp(), (torch.randn(3, 4),), tmp_path / "custom.pt2")
    else:
        path = tmp_path / "custom.pt"
        torch.jit.save(torch.jit.script(CustomOp().eval()), str(path))
    with pytest.raises(InvalidModelError, match=r"recalib_test::passthrough.*not torch's own"):
        read_model(path)


def _graph_calling(target, *args) -> SimpleNamespace:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(target, (*args, x)))
    return SimpleNamespace(graph_module=fx.GraphModule({}, graph))


@pytest.mark.parametrize(
    ("target", "args", "refusal"),
    [
        (torch.ops.aten.save.default, ("/tmp/out",), "aten::save, which writes a file"),
        (
            torch.ops.aten.set_.source_Tensor,
            (),
            "aten::set_.source_Tensor, which makes a tensor view",
        ),
        (torch.ops.higher_order.inline_asm_elementwise, (), "higher-order operator inline_asm"),
        (torch.ops.higher_order.with_effects, (), "higher-order operator with_effects"),
        (__import__("operator").call, (), "_operator.call, which is not a torch operator"),
    ],
)
def test_program_graph_calls_outside_the_allowlist_are_refused(target, args, refusal, tmp_path):
    with pytest.raises(InvalidModelError, match=re.escape(refusal)):
        check_graph_targets(_graph_calling(target, *args), tmp_path / "model.pt2")


def test_deny_list_covers_every_aten_operator_that_touches_files_or_storage():
    """Walks every registered schema: a new file/storage operator fails here until reviewed."""
    metadata_only = {
        "aten::storage_offset",
        "aten::sym_storage_offset",
        "aten::_has_same_storage_numel",
        "aten::_nested_tensor_storage_offsets",
    }
    seen = set()
    for schema in torch._C._jit_get_all_schemas():
        if not schema.name.startswith(("aten::", "prims::")):
            continue
        seen.add(schema.name)
        arguments = {(a.name, str(a.type)) for a in schema.arguments}
        touches_files = re.search(r"file|save|load", schema.name, re.IGNORECASE) or any(
            name in ("filename", "path", "file") and "str" in type_ for name, type_ in arguments
        )
        takes_storage = any("Storage" in type_ for _, type_ in arguments)
        if touches_files or takes_storage:
            assert operator_problem(schema.name), f"{schema.name} is allowed"
        elif re.search(r"storage|_share|shared", schema.name, re.IGNORECASE):
            assert schema.name in metadata_only, f"{schema.name}: review it for the deny list"
    assert {"aten::from_file", "aten::save", "aten::set_"} <= seen
    for name in ("aten::from_file", "aten::save", "aten::set_", "aten::set"):
        assert operator_problem(name) and operator_problem(f"{name}.out")


class Fancy(nn.Module):
    """Scripted TorchScript features a real model uses: control flow, containers, helpers."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)])
        self.acts = nn.ModuleDict({"a": nn.ReLU(), "b": nn.GELU()})
        self.ln = nn.LayerNorm(3)
        self.drop = nn.Dropout(0.1)

    @torch.jit.export
    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input, got {x.dim()}")
        x = self.bn(x)
        for conv in self.convs:
            x = conv(x)
        x = self.acts["a"](x) + self.acts["b"](x)
        parts: list[torch.Tensor] = []
        i = 0
        while i < 2:
            parts.append(x[:, i : i + 1])
            i += 1
        x = torch.cat(parts + [x], dim=1)[:, :3]  # noqa: RUF005 (TorchScript)
        if mask is not None:
            x = x * mask
        with torch.no_grad():
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        return {
            "out": self.scale(self.drop(nn.functional.max_pool2d(x, 2))),
            "shape": torch.tensor(x.shape),
        }


def _torchscript_models(tmp_path: Path) -> dict[str, tuple[Path, tuple]]:
    digits, digit = DigitsNet().eval(), torch.randn(4, 1, 8, 8)
    fancy, image = Fancy().eval(), torch.randn(2, 3, 8, 8)
    files = {}
    for name, module, args in (
        ("scripted", torch.jit.script(digits), (digit,)),
        ("traced", torch.jit.trace(digits, digit), (digit,)),
        ("scripted control flow", torch.jit.script(fancy), (image,)),
        ("traced dict output", torch.jit.trace(fancy, (image,), strict=False), (image,)),
    ):
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.jit.save(module, str(path))
        files[name] = (path, args)
    return files


class Cond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: self.bn(t) + 1, lambda t: self.bn(t) - 1, (x,))


class Regions(nn.Module):
    """Keyword inputs, dict inputs and outputs, grad/autocast regions, a BN called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: dict[str, torch.Tensor], *, shift: torch.Tensor) -> dict:
        y = self.bn(self.bn(x["image-left"] + x["image/right"]))
        with torch.no_grad():
            y = y * self.scale + shift
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = y @ y.transpose(-1, -2)
        return {"out": y, "gram": z.float()}


def _pt2_models(tmp_path: Path) -> dict[str, tuple[Path, tuple]]:
    image, digit = torch.randn(2, 3, 4, 4), torch.randn(4, 1, 8, 8)
    sequential = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    files = {
        "nn.Sequential with BN": (export_program(sequential, image), (image,)),
        "torch.cond": (torch.export.export(Cond().eval(), (image,)), (image,)),
        "decomposed": (export_program(DigitsNet().eval(), digit).run_decompositions(), (digit,)),
    }
    inputs = {"image-left": image, "image/right": image}
    regions = torch.export.export(Regions().eval(), (inputs,), {"shift": image})
    files["keyword and dict inputs, regions"] = (regions, (inputs, image))
    out = {}
    for name, (program, args) in files.items():
        path = tmp_path / f"{len(out)}.pt2"
        torch.export.save(program, path)
        out[name] = (path, args)
    return out


@pytest.mark.parametrize("kind", ["torchscript", "pt2"])
def test_real_models_load_and_run(kind, tmp_path):
    models = _torchscript_models(tmp_path) if kind == "torchscript" else _pt2_models(tmp_path)
    for name, (path, args) in models.items():
        loaded = read_model(path)
        with torch.no_grad():
            if name.startswith("keyword"):
                loaded.module(args[0], shift=args[1])
            else:
                loaded.module(*args)
        assert loaded.format == kind, name


def test_allowlists_can_be_switched_off_for_the_sandbox_tests(secret, marker, tmp_path):
    leak = tmp_path / "leak.pt"
    torch.jit.save(torch.jit.script(Leak(str(secret)).eval()), str(leak))
    hostile, _, _ = _hostile_pt2("submodule name", marker, tmp_path)
    with model_allowlists(enabled=False):
        assert read_model(leak).format == "torchscript"
        assert read_model(hostile).format == "pt2"  # not run: it would touch the marker
    assert load_torchscript(leak, check_ops=False) is not None
    with model_allowlists(enabled=False), pytest.raises(InvalidModelError, match="from_file"):
        load_torchscript(leak, check_ops=True)
    for path in (leak, hostile):
        with pytest.raises(InvalidModelError):
            read_model(path)
    assert not marker.exists()


class StatsFree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.free = nn.BatchNorm2d(4, track_running_stats=False)
        self.layers = nn.Sequential(
            nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False, affine=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.free(self.bn(self.conv(x))))


@pytest.mark.parametrize("decomposed", [False, True])
def test_pt2_lists_track_running_stats_false_layers_as_skipped_like_torchscript(
    decomposed, tmp_path
):
    model, x = StatsFree().eval(), torch.randn(6, 3, 4, 4)
    program = torch.export.export(model, (x,))
    torch.export.save(program.run_decompositions() if decomposed else program, tmp_path / "m.pt2")
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    batches = [torch.randn(6, 3, 4, 4) for _ in range(3)]
    skipped = {}
    for kind in ("pt2", "pt"):
        loaded = read_model(tmp_path / f"m.{kind}")
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(x), model(x))  # the rewrite computes the same
        result = recalibrate(loaded.module, batches)
        assert result.layers == ["bn"]
        skipped[kind] = [(s.name, s.type, s.reason) for s in result.skipped]
    assert [name for name, _, _ in skipped["pt"]] == ["free", "layers.1"]
    assert skipped["pt2"] == skipped["pt"]
