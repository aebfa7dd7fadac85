"""Derive a JSON Schema from a CustomResourceDefinition, to vendor it for ``check-jsonschema``.

``python -m tests.deploy.crd_schema CRD.yaml VERSION SOURCE > schema.json`` writes the
``openAPIV3Schema`` of the CRD's ``VERSION`` with ``apiVersion`` and ``kind`` pinned, and every
object that lists its properties closed (``additionalProperties: false``), as the API server's
pruning would silently drop a misspelt field: here it is an error instead. ``metadata`` stays
open (the CRD does not describe it). ``SOURCE`` (repository, tag, path) is recorded in the
schema's ``$comment``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def closed(node: Any, *, top: bool = False) -> Any:
    """``node`` with every object schema that has ``properties`` closed, recursively."""
    if isinstance(node, list):
        return [closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: closed(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if top:
        out["properties"]["metadata"] = {"type": "object"}
    return out


def crd_json_schema(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    """The JSON Schema of ``version`` of ``crd`` (a parsed CustomResourceDefinition)."""
    spec = crd["spec"]
    (served,) = [v for v in spec["versions"] if v["name"] == version]
    schema = closed(served["schema"]["openAPIV3Schema"], top=True)
    schema["properties"]["apiVersion"] = {"const": f"{spec['group']}/{version}"}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "spec"})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"derived by tests/deploy/crd_schema.py from {source}",
        **schema,
    }


if __name__ == "__main__":
    crd_path, version, source = sys.argv[1:4]
    crd = yaml.safe_load(Path(crd_path).read_text(encoding="utf-8"))
    sys.stdout.write(json.dumps(crd_json_schema(crd, version, source), indent=1) + "\n")
