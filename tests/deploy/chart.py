"""The Helm chart (``deploy/helm/recalib``) rendered offline by Helm's own Go library
(``helm-python-sdk``: ``libhelm_c``, no ``helm`` binary, no cluster), and the value sets CI
renders it with.

:func:`render` answers the chart's objects as parsed dicts; a value set the chart refuses
raises :class:`helm_python.HelmRenderError` with the template's ``fail`` message.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "recalib"
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
RELEASE, NAMESPACE = "rc", "ml"
KUBERNETES_VERSIONS = ("1.27.0", "1.33.0")
"""The oldest the chart supports (Chart.yaml ``kubeVersion``) and a current one."""

S3 = {"url": "s3://recalib-bucket/prod", "s3EndpointUrl": "http://seaweedfs.storage:8333"}
EXTERNAL_REDIS = {"url": "redis://:s3cret@redis.data.svc:6380/2"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    # GPU workers scaled by KEDA, a managed Redis with a password, S3-compatible store
    "gpu-keda-external-redis": {
        "redis": EXTERNAL_REDIS,
        "storage": S3,
        "worker": {
            "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
        "secrets": {"RECALIB_API_KEYS": "team-a:k1", "RECALIB_WEBHOOK_SECRETS": "*:whsec_MTIz"},
    },
    # CPU workers at a fixed count (no KEDA), AWS S3 (no endpoint), a managed Redis over TLS
    "cpu-fixed-workers": {
        "redis": {"url": "rediss://redis.example.net:6379/0"},
        "storage": {"url": "s3://recalib-bucket/cpu"},
        "worker": {"gpu": {"enabled": False}, "replicas": 3},
        "keda": {"enabled": False},
    },
    # a trial: the embedded Redis StatefulSet, an ingress with TLS, the ServiceMonitor
    "embedded-redis-ingress": {
        "redis": {"embedded": {"enabled": True}},
        "storage": S3,
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "host": "recalib.example.com",
            "tls": [{"secretName": "recalib-tls", "hosts": ["recalib.example.com"]}],
        },
        "serviceMonitor": {"enabled": True},
        "queue": {"name": "adabn"},
    },
    # one machine's worth: local storage on a claim, one API pod and one worker pod
    "local-storage-single-pods": {
        "redis": EXTERNAL_REDIS,
        "api": {"replicas": 1, "autoscaling": {"enabled": False}},
        "worker": {"gpu": {"enabled": False}, "replicas": 1},
        "keda": {"enabled": False},
    },
    # the strict sandbox, with a seccomp profile of the node's that allows unshare
    "strict-sandbox": {
        "redis": EXTERNAL_REDIS,
        "storage": S3,
        "worker": {
            "sandbox": "strict",
            "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/recalib.json"},
        },
    },
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, dicts recursively (Helm's merge of ``-f`` files)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(str(CHART_DIR))


def render_manifests(values: dict[str, Any]) -> dict[str, str]:
    """Template path → rendered text (NOTES.txt included)."""
    return _chart().render(values, name=RELEASE, namespace=NAMESPACE)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values``."""
    objects = []
    for path, text in render_manifests(values).items():
        if path.endswith(".txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(VALUE_SETS[name]))


def rendered(name: str) -> list[dict[str, Any]]:
    """The objects of value set ``name`` (rendered once per test session; copies)."""
    return copy.deepcopy(list(_rendered(name)))


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The one object of ``kind`` whose name ends with ``name_suffix``."""
    found = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects named *{name_suffix}"
    return found[0]


def container(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    """The container of the ``component`` (``api``, ``worker``) Deployment."""
    deployment = one(objects, "Deployment", f"-{component}")
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def environment(objects: list[dict[str, Any]], component: str) -> dict[str, str]:
    """What the component's container sees: the chart's ConfigMap, Secret, then ``env``."""
    env: dict[str, str] = {}
    spec = container(objects, component)
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            env |= one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            env |= one(objects, "Secret", source["secretRef"]["name"])["stringData"]
    env |= {item["name"]: item["value"] for item in spec.get("env", [])}
    return env
