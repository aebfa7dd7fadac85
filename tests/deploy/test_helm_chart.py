"""The Helm chart, validated without a cluster: rendered and linted by Helm's Go library for each
value set of :data:`tests.deploy.chart.VALUE_SETS`, every object checked against Kubernetes'
own schemas (``kubernetes-validate``, two pinned versions), KEDA's objects against the CRD
schemas vendored in ``tests/deploy/schemas`` (``check-jsonschema``), and the properties the
chart promises asserted against the code they must agree with (routes, queue key, settings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import redis
import yaml
from rq import Queue
from rq.registry import StartedJobRegistry

from recalib import defaults
from recalib.settings import Settings
from tests.deploy.chart import (
    CHART_DIR,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    SCHEMA_DIR,
    VALUE_SETS,
    container,
    environment,
    merged,
    one,
    render,
    render_manifests,
    rendered,
)

CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-v2.20.2-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-v2.20.2-triggerauthentication.json",
}
NOT_VALIDATED = {("monitoring.coreos.com/v1", "ServiceMonitor")}
"""No schema vendored: the ServiceMonitor is checked by the assertions below only."""
CHECK_JSONSCHEMA = str(Path(sys.executable).with_name("check-jsonschema"))
PODS = ("Deployment", "StatefulSet")
ALL_SETS = sorted(VALUE_SETS)


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in PODS]


# -- Helm: renders, lints ------------------------------------------------------------------


def test_the_sdk_is_helms_own_library() -> None:
    assert helm.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("name", ALL_SETS)
def test_the_chart_lints_clean_for_each_value_set(name: str) -> None:
    for version in KUBERNETES_VERSIONS:
        report = helm.lint(
            str(CHART_DIR), VALUE_SETS[name], strict=True, kube_version=f"v{version}"
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("name", ALL_SETS)
def test_each_value_set_renders_every_object_valid_for_kubernetes(name: str) -> None:
    objects = rendered(name)
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy"} <= {o["kind"] for o in objects}
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_RESOURCES or key in NOT_VALIDATED:
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any error


@pytest.mark.parametrize("name", ALL_SETS)
def test_keda_objects_match_the_vendored_crd_schemas(name: str, tmp_path: Path) -> None:
    objects = rendered(name)
    for (api_version, kind), schema in CUSTOM_RESOURCES.items():
        mine = [o for o in objects if o["apiVersion"] == api_version and o["kind"] == kind]
        for index, obj in enumerate(mine):
            path = tmp_path / f"{kind}-{index}.json"
            path.write_text(json.dumps(obj))
            result = subprocess.run(
                [CHECK_JSONSCHEMA, "--schemafile", str(SCHEMA_DIR / schema), str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stdout + result.stderr


def test_the_vendored_schema_refuses_a_misspelt_trigger_field(tmp_path: Path) -> None:
    """The schemas are closed: a typo (``listname``) fails instead of being pruned."""
    scaled = one(rendered("gpu-keda-external-redis"), "ScaledObject")
    scaled["spec"]["triggers"][0]["metadta"] = scaled["spec"]["triggers"][0].pop("metadata")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(scaled))
    schema = SCHEMA_DIR / CUSTOM_RESOURCES[("keda.sh/v1alpha1", "ScaledObject")]
    result = subprocess.run(
        [CHECK_JSONSCHEMA, "--schemafile", str(schema), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "metadta" in result.stdout


def test_a_misspelt_value_is_refused_by_the_charts_values_schema() -> None:
    """values.schema.json closes the chart's own sections: a typo fails instead of being ignored
    (a GPU pool that silently got CPU workers)."""
    values = merged(VALUE_SETS["gpu-keda-external-redis"], {"worker": {"gpu": {"enable": False}}})
    with pytest.raises(helm.HelmValuesError, match="'enable' not allowed"):
        render(values)
    numbers = merged(VALUE_SETS["gpu-keda-external-redis"], {"settings": {"RECALIB_PORT": 8000}})
    with pytest.raises(helm.HelmValuesError, match="RECALIB_PORT"):
        render(numbers)  # settings are environment strings: "8000"


# -- what the chart promises, against the code ---------------------------------------------


def test_probe_and_metrics_paths_are_routes_of_the_api(tmp_path: Path) -> None:
    from service.main import create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path))
    routes = set(app.openapi()["paths"])  # what the app serves, as it documents it
    objects = rendered("embedded-redis-ingress")
    api = container(objects, "api")
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    kinds = ("livenessProbe", "readinessProbe", "startupProbe")
    probes = [api[p]["httpGet"]["path"] for p in kinds]
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert {*probes, endpoint["path"]} <= routes
    env = environment(objects, "api")
    assert env["RECALIB_READY_REQUIRES_WORKER"] == "false"  # workers may scale to zero


@pytest.mark.parametrize("name", ["gpu-keda-external-redis", "embedded-redis-ingress"])
def test_keda_counts_the_queue_and_the_runs_of_the_queue_the_code_uses(name: str) -> None:
    objects = rendered(name)
    settings = Settings(queue_name=environment(objects, "worker")["RECALIB_QUEUE_NAME"])
    assert environment(objects, "api")["RECALIB_QUEUE_NAME"] == settings.queue_name
    conn = redis.Redis()  # never used: rq derives the keys from the name alone
    queue = Queue(settings.queue_name, connection=conn)
    started = StartedJobRegistry(settings.queue_name, connection=conn)
    triggers = {t["name"]: t for t in one(objects, "ScaledObject")["spec"]["triggers"]}
    assert triggers["queued"]["metadata"]["listName"] == queue.key
    assert triggers["running"]["metadata"]["listName"] == started.key
    assert one(objects, "ScaledObject")["spec"]["minReplicaCount"] == 0
    target = one(objects, "ScaledObject")["spec"]["scaleTargetRef"]["name"]
    assert target == one(objects, "Deployment", "-worker")["metadata"]["name"]


def test_the_default_queue_is_the_codes_default() -> None:
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert chart_values["queue"]["name"] == defaults.QUEUE_NAME
    assert chart_values["jobTimeoutSeconds"] == defaults.JOB_TIMEOUT_S


def test_keda_reaches_the_redis_of_the_url_with_its_password_from_the_secret() -> None:
    objects = rendered("gpu-keda-external-redis")
    url = urlsplit(environment(objects, "worker")["RECALIB_REDIS_URL"])
    for trigger in one(objects, "ScaledObject")["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == f"{url.hostname}:{url.port}"
        assert trigger["metadata"]["databaseIndex"] == url.path.strip("/")
        assert (
            trigger["authenticationRef"]["name"]
            == one(objects, "TriggerAuthentication")["metadata"]["name"]
        )
    (ref,) = one(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert one(objects, "Secret", "-env")["stringData"][ref["key"]] == url.password
    tls = one(rendered("cpu-fixed-workers"), "Secret", "-env")["stringData"]["RECALIB_REDIS_URL"]
    assert tls.startswith("rediss://")
    keda_off = {o["kind"] for o in rendered("cpu-fixed-workers")}
    assert not {"ScaledObject", "TriggerAuthentication"} & keda_off


def test_workers_never_get_the_api_keys_or_the_webhook_secrets() -> None:
    objects = rendered("gpu-keda-external-redis")
    secrets = VALUE_SETS["gpu-keda-external-redis"]["secrets"]
    api, worker = environment(objects, "api"), environment(objects, "worker")
    for name in ("RECALIB_API_KEYS", "RECALIB_WEBHOOK_SECRETS"):
        assert api[name] == secrets[name]
        assert name not in worker
    assert api["RECALIB_REDIS_URL"] == worker["RECALIB_REDIS_URL"]


def test_gpu_workers_take_one_gpu_each_on_the_gpu_pool() -> None:
    objects = rendered("gpu-keda-external-redis")
    worker = container(objects, "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert environment(objects, "worker")["RECALIB_WORKER_DEVICE"] == "cuda"
    spec = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == VALUE_SETS["gpu-keda-external-redis"]["worker"]["nodeSelector"]
    assert spec["tolerations"] == VALUE_SETS["gpu-keda-external-redis"]["worker"]["tolerations"]

    cpu = rendered("cpu-fixed-workers")
    assert "nvidia.com/gpu" not in container(cpu, "worker")["resources"]["limits"]
    assert environment(cpu, "worker")["RECALIB_WORKER_DEVICE"] == "cpu"
    assert one(cpu, "Deployment", "-worker")["spec"]["replicas"] == 3


@pytest.mark.parametrize("name", ALL_SETS)
def test_every_pod_is_hardened(name: str) -> None:
    """Non-root, read-only root filesystem with a volume at every path written, no privilege
    escalation, no capability, a seccomp profile, no service account token."""
    for workload in (o for o in rendered(name) if o["kind"] in PODS):
        spec = workload["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
        claims = workload["spec"].get("volumeClaimTemplates", [])
        volumes = {v["name"] for v in [*spec.get("volumes", []), *[c["metadata"] for c in claims]]}
        for box in spec["containers"]:
            context = box["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["privileged"] is False
            mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
            assert set(mounts.values()) <= volumes
            if box["name"] in ("api", "worker"):  # TMPDIR, RECALIB_DATA_DIR (HOME)
                assert {"/tmp", "/data"} <= set(mounts)


def test_the_strict_sandbox_is_refused_under_the_runtimes_default_seccomp_profile() -> None:
    values = merged(VALUE_SETS["strict-sandbox"], {"worker": {"seccompProfile": None}})
    values["worker"]["seccompProfile"] = {"type": "RuntimeDefault"}
    with pytest.raises(helm.HelmRenderError, match=r"worker.sandbox=strict.*RuntimeDefault"):
        render(values)
    objects = rendered("strict-sandbox")
    assert environment(objects, "worker")["RECALIB_SANDBOX"] == "strict"
    spec = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "Localhost"
    # the default: basic, which needs no more than RuntimeDefault allows
    default = rendered("gpu-keda-external-redis")
    assert environment(default, "worker")["RECALIB_SANDBOX"] == "basic"


def test_network_policy_ports_match_the_settings() -> None:
    objects = rendered("gpu-keda-external-redis")
    api_port = int(environment(objects, "api")["UVICORN_PORT"])
    (http,) = container(objects, "api")["ports"]
    assert http["containerPort"] == api_port
    redis_port = urlsplit(environment(objects, "worker")["RECALIB_REDIS_URL"]).port
    store_port = urlsplit(environment(objects, "worker")["RECALIB_S3_ENDPOINT_URL"]).port
    assert (redis_port, store_port) == (6380, 8333)
    for component in ("api", "worker"):
        policy = one(objects, "NetworkPolicy", f"-{component}")
        egress = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert {53, redis_port, store_port} <= egress
        assert 6379 not in egress  # the URL's port, not Redis' usual one
    api_in = one(objects, "NetworkPolicy", "-api")["spec"]["ingress"]
    assert [p["port"] for rule in api_in for p in rule["ports"]] == [api_port]
    assert one(objects, "NetworkPolicy", "-worker")["spec"]["ingress"] == []

    embedded = rendered("embedded-redis-ingress")
    redis_in = one(embedded, "NetworkPolicy", "-redis")["spec"]["ingress"]
    embedded_url = urlsplit(environment(embedded, "worker")["RECALIB_REDIS_URL"])
    assert [p["port"] for rule in redis_in for p in rule["ports"]] == [embedded_url.port]
    service = one(embedded, "Service", "-redis")["metadata"]["name"]
    assert embedded_url.hostname == f"{service}.{NAMESPACE}.svc"  # KEDA resolves it elsewhere
    for trigger in one(embedded, "ScaledObject")["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == f"{embedded_url.hostname}:{embedded_url.port}"


def test_local_storage_is_refused_with_more_than_one_pod() -> None:
    for extra in (
        {},  # the defaults: an HPA on the API and KEDA on the workers
        {"api": {"replicas": 2, "autoscaling": {"enabled": False}}},
        {"keda": {"enabled": False}, "worker": {"replicas": 2}},
    ):
        values = merged(VALUE_SETS["local-storage-single-pods"], extra)
        if not extra:
            values = merged(values, {"api": {"autoscaling": {"enabled": True}}})
        with pytest.raises(helm.HelmRenderError, match=r"storage.url is empty"):
            render(values)
    objects = rendered("local-storage-single-pods")
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for spec in pod_specs(objects)
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {one(objects, "PersistentVolumeClaim")["metadata"]["name"]}
    assert environment(objects, "api")["RECALIB_STORAGE_URL"] == ""


def test_every_setting_reaches_the_pods_with_the_codes_default(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECALIB_"):
            monkeypatch.delenv(name)
    objects = rendered("gpu-keda-external-redis")
    env = environment(objects, "worker") | environment(objects, "api")
    fields = {f"RECALIB_{name.upper()}": name for name in Settings.model_fields}
    assert set(fields) - set(env) == set()
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    code_default = Settings()
    for variable, value in chart_values["settings"].items():
        field = fields[variable]
        if field in ("host",):  # the chart's API listens on every interface of its pod
            continue
        monkeypatch.setenv(variable, value)
        assert getattr(Settings(), field) == getattr(code_default, field), variable
        monkeypatch.delenv(variable)


def test_the_grace_period_covers_the_drain_deadline_and_the_hand_back() -> None:
    objects = rendered("gpu-keda-external-redis")
    drain_s = int(environment(objects, "worker")["RECALIB_WORKER_DRAIN_TIMEOUT_S"])
    spec = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert drain_s == 600
    assert spec["terminationGracePeriodSeconds"] == drain_s + 30
    longer = render(
        merged(VALUE_SETS["gpu-keda-external-redis"], {"worker": {"drain": {"timeoutSeconds": 0}}})
    )
    capped = int(environment(longer, "worker")["RECALIB_WORKER_DRAIN_TIMEOUT_S"])
    assert capped == defaults.JOB_TIMEOUT_S  # a job cannot run longer than its timeout


def test_one_attempt_per_job_is_refused_as_a_drain_would_fail_the_job() -> None:
    values = merged(VALUE_SETS["gpu-keda-external-redis"], {"settings": {}})
    values["settings"] = {"RECALIB_JOB_MAX_ATTEMPTS": "1"}
    with pytest.raises(helm.HelmRenderError, match="RECALIB_JOB_MAX_ATTEMPTS is below 2"):
        render(values)


def test_the_embedded_redis_keeps_an_append_only_file_on_its_claim() -> None:
    objects = rendered("embedded-redis-ingress")
    redis = one(objects, "StatefulSet", "-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    assert args[args.index("--dir") + 1] == mount["mountPath"]
    assert redis["spec"]["replicas"] == 1
    assert "StatefulSet" not in {o["kind"] for o in rendered("gpu-keda-external-redis")}


def test_disruption_budgets_never_block_a_node_drain() -> None:
    objects = rendered("gpu-keda-external-redis")
    assert one(objects, "PodDisruptionBudget", "-api")["spec"]["minAvailable"] == 1
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2
    assert one(objects, "PodDisruptionBudget", "-worker")["spec"]["maxUnavailable"] == 1
    single = rendered("local-storage-single-pods")  # one API pod: no budget that holds it
    assert [o["metadata"]["name"] for o in single if o["kind"] == "PodDisruptionBudget"] == [
        one(single, "Deployment", "-worker")["metadata"]["name"]
    ]


def test_ingress_routes_to_the_api_service() -> None:
    objects = rendered("embedded-redis-ingress")
    ingress = one(objects, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    service = one(objects, "Service", "-api")
    assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    assert ingress["spec"]["tls"][0]["secretName"] == "recalib-tls"


def test_the_notes_say_what_scale_to_zero_costs() -> None:
    notes = render_manifests(VALUE_SETS["gpu-keda-external-redis"])["recalib/templates/NOTES.txt"]
    assert "Scale to zero" in notes and "CUDA" in notes and "cache" in notes
