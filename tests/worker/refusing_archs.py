"""Architectures whose own code fails, for the tests of arch errors (allowlist this module).

``versioned_net`` checks the state_dict's version metadata in ``_load_from_state_dict`` the way
torchvision's MNASNet does, so a ``.safetensors`` file (which keeps no such metadata) is refused
with ``ValueError: version should be set to 1 or 2 instead of None``. ``exploding_net`` raises in
its constructor.
"""

from __future__ import annotations

from typing import Any

from torch import nn

MODULE = __name__


class VersionedNet(nn.Module):
    """Conv-BN-ReLU, pooling, Linear over 1×8×8 inputs; refuses state_dicts without a version."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4, 10)

    def forward(self, x: Any) -> Any:
        return self.head(self.features(x))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if version not in [1, 2]:
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def versioned_net() -> VersionedNet:
    return VersionedNet()


def exploding_net(**kwargs: Any) -> nn.Module:
    raise RuntimeError("this architecture needs a GPU build of its extension")
