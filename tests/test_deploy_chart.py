"""The Helm chart deploy/helm/sd-webui-trt, checked with real Helm (helm-python-sdk embeds Helm 4's library) and the
Kubernetes OpenAPI schemas (kubernetes-validate, strict), without a cluster.

- lint --strict passes for the defaults and every examples/*.yaml; bad values fail lint with the schema's message;
  what the schema cannot say (duplicate pool names, rtx pools without targets or with targets TensorRT-RTX does not
  build for, autoscaling without a metric) fails the render with the chart's message.
- every rendered manifest validates against the newest Kubernetes version kubernetes-validate ships; KEDA's
  ScaledObject (a custom resource it has no schema for) against SCALEDOBJECT_SCHEMA below. Nothing is skipped:
  a kind with no schema fails the test.
- a reviewer's own values (3 pools, given claims, pre-build rtx then tensorrt) render what a fleet needs: one
  Deployment per pool with its nodeSelector, replicas (none when autoscaled) and one GPU, the readiness probe on
  /sdtrt/v1/ready, the engine cache read-only in serving pods with SDTRT_BUILDS=off, a Service, one pre-build Job per
  pool (hooks, after their ConfigMap) whose plan builds every checkpoint with the profiles for that pool, GPU only in
  tensorrt mode, the only read-write mount of the engine cache.
- cross-checks against the code: every SDTRT_*/WEBUI_* variable set is read by the extension or the image's scripts,
  the fleet variables mean what the chart intends (parsed by the extension's own FleetSettings), the probe paths are
  routes (/sdtrt/v1 from the extension's FastAPI routes, /sdapi/v1 from A1111 1.10.1's list in tests/data), /ready
  answers without credentials, the plans parse with `python -m sdtrt prebuild`'s own parser, and every A1111 argument
  the image's entrypoint is given (run in dry-run mode with the rendered environment) exists in A1111 1.10.1.

tests/data/a1111_cmd_args.txt and a1111_api_routes.txt are generated from an A1111 checkout:
    python tests/test_deploy_chart.py /path/to/stable-diffusion-webui
and test_a1111_lists_match_checkout re-derives them when SDTRT_A1111_DIR points at one.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "sd-webui-trt"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DATA = Path(__file__).resolve().parent / "data"
CMD_ARGS_FILE = DATA / "a1111_cmd_args.txt"
API_ROUTES_FILE = DATA / "a1111_api_routes.txt"
DOCKER = ROOT / "deploy" / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
EXT = "/opt/webui/extensions/sd-webui-trt"
PROBE = f"{EXT}/deploy/docker/probe.sh"

#: The image's documented interface (deploy/docker/entrypoint.sh, probe.sh): what the chart may set, used where the
#: scripts are not in the tree yet.
DOCUMENTED_ENTRYPOINT_ENV = {"WEBUI_PORT", "MODELS_DIR", "WEBUI_CKPT", "WEBUI_UI", "SDTRT_API_AUTH_FILE",
                             "WEBUI_EXTRA_ARGS", "SDTRT_PREBUILD_PLAN", "SDTRT_CACHE"}
#: A1111 arguments the entrypoint is documented to pass (always, or from MODELS_DIR, WEBUI_UI, WEBUI_CKPT and
#: SDTRT_API_AUTH_FILE).
DOCUMENTED_A1111_ARGS = ["--api", "--listen", "--port", "--skip-install", "--skip-prepare-environment",
                         "--skip-version-check", "--no-download-sd-model", "--nowebui", "--ckpt-dir", "--lora-dir",
                         "--ckpt"]
#: Variables the chart sets that neither the extension nor the image's scripts read, and who does.
OTHER_READERS = {"NVIDIA_VISIBLE_DEVICES": "the NVIDIA container toolkit (void: no GPU in this container)"}

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
import jsonschema  # a dependency of kubernetes-validate
from kubernetes_validate import utils as kv_utils

K8S_VERSION = kv_utils.latest_version()

#: KEDA 2.x ScaledObject (keda.sh/v1alpha1), the fields of its CRD (kedacore/keda
#: config/crd/bases/keda.sh_scaledobjects.yaml) the chart may render; strict like kubernetes-validate's.
_HPA_BEHAVIOR = {"type": "object"}
SCALEDOBJECT_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": {"type": "string"},
                                                                     "behavior": _HPA_BEHAVIOR}},
                    "scalingModifiers": {"type": "object"}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {
                        "type": {"type": "string", "minLength": 1},
                        "name": {"type": "string"},
                        # the CRD: a map of strings (a number here is refused by the API server)
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        "authenticationRef": {"type": "object", "required": ["name"],
                                              "properties": {"name": {"type": "string"},
                                                             "kind": {"type": "string"}}}}}},
            }},
    }}
CUSTOM_RESOURCE_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALEDOBJECT_SCHEMA}

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# ---- A1111's argument and route lists (generated from a checkout, committed under tests/data) -----------------------
def a1111_cmd_args(a1111: Path) -> list[str]:
    """Every option string of every parser.add_argument call in modules/cmd_args.py and in the built-in extensions'
    preload.py (A1111 adds those to the same parser; --lora-dir is one), sorted."""
    files = [a1111 / "modules" / "cmd_args.py", *sorted((a1111 / "extensions-builtin").glob("*/preload.py"))]
    flags: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
                flags |= {a.value for a in node.args
                          if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-")}
    return sorted(flags)


def a1111_api_routes(a1111: Path) -> list[str]:
    """'METHOD /sdapi/v1/...' for every add_api_route call in modules/api/api.py, sorted."""
    f = a1111 / "modules" / "api" / "api.py"
    routes: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_api_route" and node.args):
            continue
        path = node.args[0]
        if not (isinstance(path, ast.Constant) and isinstance(path.value, str) and path.value.startswith("/sdapi/")):
            continue
        for kw in node.keywords:
            if kw.arg == "methods" and isinstance(kw.value, ast.List):
                routes |= {f"{m.value} {path.value}" for m in kw.value.elts if isinstance(m, ast.Constant)}
    return sorted(routes)


def read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def a1111_version(a1111: Path) -> str:
    for line in (a1111 / "CHANGELOG.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            return line[3:].strip()
    return "unknown"


def write_a1111_lists(a1111: Path) -> None:
    version = a1111_version(a1111)
    header = ("# Generated by `python tests/test_deploy_chart.py A1111_DIR` (ast, nothing imported) from AUTOMATIC1111\n"
              f"# stable-diffusion-webui {version}: {{what}}\n"
              "# tests/test_deploy_chart.py::test_a1111_lists_match_checkout re-derives it when SDTRT_A1111_DIR is set.\n")
    CMD_ARGS_FILE.write_text(header.format(
        what="the option strings of every parser.add_argument call in modules/cmd_args.py and\n"
             "# extensions-builtin/*/preload.py (built-in extensions add theirs, e.g. --lora-dir, to the same parser)."
    ) + "\n".join(a1111_cmd_args(a1111)) + "\n", encoding="utf-8")
    API_ROUTES_FILE.write_text(header.format(
        what="every self.add_api_route(path, ..., methods=[...]) call in modules/api/api.py\n"
             "# (server-kill/-restart/-stop only exist with --api-server-stop)."
    ) + "\n".join(a1111_api_routes(a1111)) + "\n", encoding="utf-8")


# ---- rendering ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _quiet_helm() -> None:
    helm.disable_logging()


@cache
def _chart() -> Any:
    return helm.Chart.load(CHART)


def example_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


class Rendered:
    def __init__(self, values: dict[str, Any] | None, name: str = "rev", namespace: str = "sdtrt") -> None:
        out = _chart().render(copy.deepcopy(values or {}), name=name, namespace=namespace)
        self.notes = ""
        self.docs: list[dict[str, Any]] = []
        for path, text in sorted(out.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            self.docs += [d for d in yaml.safe_load_all(text) if d]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {[d['metadata']['name'] for d in self.kind(kind)]}"
        return found[0]

    def workloads(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(manifest, pod spec) of every Deployment and Job."""
        for d in self.docs:
            if d["kind"] in ("Deployment", "Job"):
                yield d, d["spec"]["template"]["spec"]


def lint(values: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = helm.lint(str(CHART), copy.deepcopy(values) if values is not None else None,
                                       strict=True)
    return report


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def mounts_of(spec: dict[str, Any], container: dict[str, Any], volume_key: str) -> list[tuple[dict[str, Any], Any]]:
    """(volumeMount, the volume's `volume_key` source) for each mount of a volume with that source."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return [(m, volumes[m["name"]][volume_key]) for m in container.get("volumeMounts", [])
            if volume_key in volumes[m["name"]]]


def claim_mounts(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim name, read-only) for every PersistentVolumeClaim mount."""
    return {m["mountPath"]: (src["claimName"], bool(m.get("readOnly")) or bool(src.get("readOnly")))
            for m, src in mounts_of(spec, container, "persistentVolumeClaim")}


def gpu_limit(container: dict[str, Any]) -> Any:
    resources = container.get("resources", {})
    assert "nvidia.com/gpu" not in resources.get("requests", {}), "a GPU is asked for in limits only"
    return resources.get("limits", {}).get("nvidia.com/gpu")


# ---- a reviewer's own values ----------------------------------------------------------------------------------------
CHECKPOINTS = ["Stable-diffusion/sd_xl_base_1.0.safetensors", "Stable-diffusion/juggernaut_xl.safetensors"]
PROFILES = ["1x1024x1024x75:1x1024x1024x75:2x1024x1024x150", "1x768x1344x75"]
CPU_BUILDERS = {"workload": "cpu-build", "kubernetes.io/arch": "amd64"}


def reviewer_values(mode: str) -> dict[str, Any]:
    gpu_taint = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "image": {"repository": "registry.test/ml/sd-webui-trt", "tag": "7.7.7"},
        "pools": [
            {"name": "l40s", "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L40S"}, "tolerations": gpu_taint,
             "targets": ["sm89"], "replicas": 3,
             "resources": {"requests": {"cpu": "6", "memory": "40Gi"}, "limits": {"memory": "60Gi"}}},
            {"name": "a10", "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A10", "zone-group": "b"},
             "targets": ["sm86"], "replicas": 2},
            {"name": "rtx-pro", "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-RTX-PRO-6000"},
             "targets": ["sm120"], "replicas": 5,
             "autoscaling": {"enabled": True, "kind": "hpa", "minReplicas": 1, "maxReplicas": 6}},
        ],
        "models": {"existingClaim": "reviewer-models"},
        "engines": {"existingClaim": "reviewer-engines"},
        "prebuild": {"enabled": True, "mode": mode, "checkpoints": CHECKPOINTS, "profiles": PROFILES,
                     "controlnet": True, "nodeSelector": CPU_BUILDERS, "backoffLimit": 2,
                     "activeDeadlineSeconds": 5000},
        "fleet": {"requireEngine": True, "rescanSeconds": 7},
        "webui": {"checkpoint": "sd_xl_base_1.0.safetensors", "extraArgs": ["--opt-sdp-attention"]},
        "service": {"sessionAffinity": "ClientIP"},
    }


def maximal_values() -> dict[str, Any]:
    """Every optional part of the chart switched on (for the validation and cross-checks)."""
    v = reviewer_values("rtx")
    v["webui"].update(ui=True, readOnlyRootFilesystem=True, apiAuth={"existingSecret": "auth", "key": "auth"},
                      extraArgs=["--opt-sdp-attention", "--no-half-vae"])
    v["models"] = {"existingClaim": "", "subPath": "models", "create": {"storageClass": "-", "size": "1Ti",
                                                                         "accessModes": ["ReadOnlyMany"]}}
    v["engines"] = {"existingClaim": "", "subPath": "engines", "create": {"storageClass": "nfs", "size": "300Gi",
                                                                           "accessModes": ["ReadWriteMany"]}}
    v["service"].update(perPool=True, type="LoadBalancer")
    v["ingress"] = {"enabled": True, "className": "nginx", "cookieAffinity": True,
                    "hosts": [{"host": "sd.test", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                    "tls": [{"secretName": "sd-tls", "hosts": ["sd.test"]}]}
    v["imagePullSecrets"] = [{"name": "pull"}]
    v["serviceAccountName"] = "sd"
    v["priorityClassName"] = "gpu-serving"
    v["podAnnotations"] = {"prometheus.io/scrape": "false"}
    v["pools"][1]["prebuild"] = {"mode": "tensorrt", "priorityClassName": "prebuild"}
    v["pools"][1]["autoscaling"] = {"enabled": True, "kind": "keda", "minReplicas": 0, "maxReplicas": 3,
                                    "keda": {"triggers": [{"type": "prometheus", "metadata": {
                                        "serverAddress": "http://prom:9090", "threshold": "2",
                                        "query": 'sum(queue{pool="{{ .pool.name }}"})'}}],
                                        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                                            "scaleDown": {"stabilizationWindowSeconds": 600}}}}}}
    return v


# ---- 1. lint --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=lambda p: "defaults" if p is None else p.name)
def test_lint_strict_passes(example: Path | None) -> None:
    report = lint(None if example is None else example_values(example))
    assert report["errors"] == [], report
    assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]  # strict: no warnings either


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"two-pools-rtx.yaml", "tensorrt-per-pool.yaml"}


BAD_VALUES = [
    ("pool without a name", {"pools": [{"replicas": 1}]}, "/pools/0", "missing property 'name'"),
    ("prebuild mode foo", {"prebuild": {"mode": "foo"}}, "/prebuild/mode", "'rtx', 'tensorrt'"),
    ("pool name not a DNS label", {"pools": [{"name": "L40S_pool"}]}, "/pools/0/name", "does not match"),
    ("target not written sm<cc>", {"pools": [{"name": "a", "targets": ["8.9"]}]}, "/pools/0/targets/0",
     "does not match"),
    ("profile min:opt:max per dimension", {"prebuild": {"profiles": ["1:1:4x512:512:768x512:512:768x75:75:150"]}},
     "/prebuild/profiles/0", "does not match"),
    ("typo at the top", {"pool": [{"name": "a"}]}, "", "additional properties 'pool' not allowed"),
    ("typo in a pool", {"pools": [{"name": "a", "nodeselector": {}}]}, "/pools/0",
     "additional properties 'nodeselector' not allowed"),
    ("engine cache not ReadWriteMany", {"engines": {"create": {"accessModes": ["ReadOnlyMany"]}}},
     "/engines/create/accessModes", "ReadWriteMany"),
    ("autoscaling on CPU", {"autoscaling": {"kind": "cpu"}}, "/autoscaling/kind", "'hpa', 'keda'"),
    ("numeric image tag", {"image": {"tag": 1.1}}, "/image/tag", "want string"),
    ("keda trigger without metadata", {"autoscaling": {"keda": {"triggers": [{"type": "prometheus"}]}}},
     "/autoscaling/keda/triggers/0", "missing property 'metadata'"),
    ("checkpoint not .safetensors", {"prebuild": {"checkpoints": ["Stable-diffusion/x.ckpt"]}},
     "/prebuild/checkpoints/0", "does not match"),
    ("requireEngine as a string", {"fleet": {"requireEngine": "yes"}}, "/fleet/requireEngine", "want boolean"),
]


@pytest.mark.parametrize(("values", "where", "says"), [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES])
def test_lint_fails_on_bad_values_with_the_schema_message(values: dict[str, Any], where: str, says: str) -> None:
    report = lint(values)
    text = "\n".join(report["errors"])
    assert text, f"lint passed {values}"
    assert f"at '{where}'" in text and says in text, text


RENDER_FAILURES = [
    ("duplicate pool names", {"pools": [{"name": "a"}, {"name": "a"}]}, 'the name "a" is used twice'),
    ("rtx pool without targets",
     {"prebuild": {"enabled": True, "mode": "rtx", "checkpoints": CHECKPOINTS[:1]}, "pools": [{"name": "a"}]},
     "pool a needs targets"),
    ("rtx for Hopper",
     {"prebuild": {"enabled": True, "mode": "rtx", "checkpoints": CHECKPOINTS[:1]},
      "pools": [{"name": "h", "targets": ["sm90"]}]},
     "TensorRT-RTX does not build for sm90"),
    ("prebuild without checkpoints", {"prebuild": {"enabled": True}, "pools": [{"name": "a", "targets": ["sm89"]}]},
     "pool a has no checkpoints"),
    ("keda without triggers", {"autoscaling": {"enabled": True, "kind": "keda"}}, "kind keda needs keda.triggers"),
    ("hpa from zero", {"autoscaling": {"enabled": True, "minReplicas": 0}}, "an HPA needs minReplicas >= 1"),
    ("hpa without metrics", {"autoscaling": {"enabled": True, "hpa": {"metrics": []}}}, "kind hpa needs hpa.metrics"),
    ("max below min", {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}, "is below minReplicas"),
    ("ingress without hosts", {"ingress": {"enabled": True}}, "ingress.enabled needs ingress.hosts"),
]


@pytest.mark.parametrize(("values", "says"), [r[1:] for r in RENDER_FAILURES], ids=[r[0] for r in RENDER_FAILURES])
def test_render_fails_with_the_chart_message(values: dict[str, Any], says: str) -> None:
    """Checks across values (Helm's lint runs templates in lint mode, where `fail` only logs: these fail at
    install/upgrade/template time, which is where they are tested)."""
    with pytest.raises(helm.HelmRenderError, match=re.escape(says)):
        Rendered(values)


def test_a_pool_may_switch_its_prebuild_to_tensorrt_for_hopper() -> None:
    r = Rendered({"prebuild": {"enabled": True, "mode": "rtx", "checkpoints": CHECKPOINTS[:1]},
                  "pools": [{"name": "h", "targets": ["sm90"], "prebuild": {"mode": "tensorrt"}}]})
    assert [j["metadata"]["annotations"]["sd-webui-trt/mode"] for j in r.kind("Job")] == ["tensorrt"]


# ---- 2. Kubernetes schemas ------------------------------------------------------------------------------------------
def validate_manifest(doc: dict[str, Any]) -> None:
    custom = CUSTOM_RESOURCE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if custom is not None:
        jsonschema.Draft7Validator(custom).validate(doc)
    else:  # SchemaNotFoundError for anything unknown: no silent skip
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


VALUE_SETS = {"defaults": dict, "reviewer-rtx": lambda: reviewer_values("rtx"),
              "reviewer-tensorrt": lambda: reviewer_values("tensorrt"), "maximal": maximal_values,
              **{p.name: (lambda p=p: example_values(p)) for p in EXAMPLES}}


@pytest.mark.parametrize("which", sorted(VALUE_SETS))
def test_every_manifest_validates_against_kubernetes(which: str) -> None:
    r = Rendered(VALUE_SETS[which]())
    assert r.docs
    for doc in r.docs:
        try:
            validate_manifest(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{which}: {doc['kind']}/{doc['metadata']['name']} at {where}: {e.message}")


def test_the_validators_are_strict() -> None:
    """A field Kubernetes does not know fails (so a passing validation means something), for both validators."""
    r = Rendered(maximal_values())
    deployment = copy.deepcopy(r.kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(deployment)
    scaled = copy.deepcopy(r.kind("ScaledObject")[0])
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(scaled)
    with pytest.raises(kv_utils.SchemaNotFoundError):
        validate_manifest({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def test_names_fit_kubernetes_limits_with_the_longest_release_and_pool_names() -> None:
    v = maximal_values()
    v["pools"][0]["name"] = "p" * 20
    r = Rendered(v, name="r" * 53)
    for doc in r.docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and DNS_LABEL.match(name), f"{doc['kind']} {name!r}"
        for labels in (doc["metadata"].get("labels", {}),
                       doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})):
            assert all(len(str(value)) <= 63 for value in labels.values()), labels
    assert len({(d["kind"], d["metadata"]["name"]) for d in r.docs}) == len(r.docs), "two resources share a name"


# ---- 3. what a reviewer's values give -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["rtx", "tensorrt"])
def test_reviewer_values(mode: str) -> None:
    values = reviewer_values(mode)
    r = Rendered(values)
    pools = values["pools"]

    deployments = {d["metadata"]["name"]: d for d in r.kind("Deployment")}
    assert sorted(deployments) == sorted(f"rev-sd-webui-trt-{p['name']}" for p in pools)
    for pool in pools:
        d = deployments[f"rev-sd-webui-trt-{pool['name']}"]
        spec = d["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == pool["nodeSelector"]
        assert spec.get("tolerations", []) == pool.get("tolerations", [])
        if pool.get("autoscaling", {}).get("enabled"):
            assert "replicas" not in d["spec"], "an autoscaled Deployment must leave replicas to the autoscaler"
            hpa = r.one("HorizontalPodAutoscaler", d["metadata"]["name"])
            assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                     "name": d["metadata"]["name"]}
            assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
            assert all(m["type"] != "Resource" for m in hpa["spec"]["metrics"]), "CPU does not measure a WebUI"
        else:
            assert d["spec"]["replicas"] == pool["replicas"]
        assert d["spec"]["strategy"] == {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}}
        (c,) = spec["containers"]
        assert gpu_limit(c) == 1
        if "resources" in pool:
            assert c["resources"]["requests"] == pool["resources"]["requests"]
        # probes
        (port,) = c["ports"]
        ready = c["readinessProbe"]["httpGet"]
        assert ready["path"] == "/sdtrt/v1/ready" and ready["port"] in (port["name"], port["containerPort"])
        assert port["containerPort"] == 7860
        assert c["startupProbe"]["exec"]["command"] == [PROBE, "live"]
        assert c["livenessProbe"]["exec"]["command"] == [PROBE, "live"]
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
        # the image's interface
        assert c["image"] == "registry.test/ml/sd-webui-trt:7.7.7"
        assert "command" not in c and c["args"] == ["serve"]  # the image's ENTRYPOINT (tini + entrypoint.sh)
        # volumes: the given claims, both read-only
        claims = claim_mounts(spec, c)
        assert claims["/engines"] == ("reviewer-engines", True)
        assert claims["/models"] == ("reviewer-models", True)
        env = env_of(c)
        assert env["SDTRT_BUILDS"] == "off" and env["SDTRT_CACHE"] == "/engines" and env["MODELS_DIR"] == "/models"
        assert env["WEBUI_CKPT"] == "sd_xl_base_1.0.safetensors"
        assert env["SDTRT_REQUIRE_ENGINE"] == "1" and env["SDTRT_RESCAN_S"] == "7"
        assert spec["securityContext"]["runAsUser"] == 1000 and spec["securityContext"]["fsGroup"] == 1000
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        # a PodDisruptionBudget per pool, selecting exactly this pool's pods
        pdb = r.one("PodDisruptionBudget", d["metadata"]["name"])
        assert pdb["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    # pools' selectors do not overlap: each Deployment owns only its pods
    selectors = [d["spec"]["selector"]["matchLabels"] for d in deployments.values()]
    for d in deployments.values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert sum(s.items() <= labels.items() for s in selectors) == 1

    (service,) = r.kind("Service")
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] == "http"
    for d in deployments.values():  # the Service reaches every pool
        assert service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()

    # pre-build: one Job per pool, a hook after its ConfigMap
    (plans,) = r.kind("ConfigMap")
    jobs = {j["metadata"]["name"]: j for j in r.kind("Job")}
    assert sorted(jobs) == sorted(f"rev-sd-webui-trt-build-{p['name']}" for p in pools)
    backend = {"rtx": "tensorrt-rtx", "tensorrt": "tensorrt"}[mode]
    for pool in pools:
        job = jobs[f"rev-sd-webui-trt-build-{pool['name']}"]
        annotations = job["metadata"]["annotations"]
        assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
        assert set(plans["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
        assert int(plans["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
        assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 5000
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        (c,) = spec["containers"]
        assert "command" not in c and c["args"] == ["prebuild"]
        env = env_of(c)
        assert env["SDTRT_CACHE"] == "/engines" and env["MODELS_DIR"] == "/models"
        # the plan it reads: its key of the ConfigMap, mounted where SDTRT_PREBUILD_PLAN points
        (plan_mount, plan_src) = next((m, s) for m, s in mounts_of(spec, c, "configMap"))
        assert plan_src["name"] == plans["metadata"]["name"]
        (item,) = plan_src["items"]
        assert env["SDTRT_PREBUILD_PLAN"] == f"{plan_mount['mountPath']}/{item['path']}"
        plan = json.loads(plans["data"][item["key"]])
        expected_targets = pool["targets"] if mode == "rtx" else []
        assert plan == {"builds": [{"checkpoint": ckpt, "profiles": PROFILES, "backend": backend,
                                    "targets": expected_targets, "controlnet": True, "refit": True}
                                   for ckpt in CHECKPOINTS]}
        # the engine cache read-write here only
        claims = claim_mounts(spec, c)
        assert claims["/engines"] == ("reviewer-engines", False)
        assert claims["/models"] == ("reviewer-models", True)
        if mode == "tensorrt":  # on one of the pool's own GPUs
            assert spec["nodeSelector"] == pool["nodeSelector"]
            assert spec.get("tolerations", []) == pool.get("tolerations", [])
            assert gpu_limit(c) == 1
        else:  # ahead of time on the CPU build nodes, no GPU
            assert spec["nodeSelector"] == CPU_BUILDERS
            assert gpu_limit(c) is None
            assert env["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_only_the_prebuild_jobs_write_the_engine_cache() -> None:
    for which, make in VALUE_SETS.items():
        r = Rendered(make())
        engines_claim = {d["metadata"]["name"] for d in r.kind("PersistentVolumeClaim")
                         if d["metadata"]["labels"]["app.kubernetes.io/component"] == "engines"}
        engines_claim |= {make().get("engines", {}).get("existingClaim") or "rev-sd-webui-trt-engines"}
        for doc, spec in r.workloads():
            for c in spec["containers"] + spec.get("initContainers", []):
                for path, (claim, read_only) in claim_mounts(spec, c).items():
                    if claim in engines_claim:
                        assert read_only == (doc["kind"] != "Job"), f"{which}: {doc['metadata']['name']} {path}"


def test_created_claims_are_kept_hooks_before_the_jobs() -> None:
    r = Rendered(maximal_values())
    claims = r.kind("PersistentVolumeClaim")
    assert sorted(c["metadata"]["labels"]["app.kubernetes.io/component"] for c in claims) == ["engines", "models"]
    job_weight = min(int(j["metadata"]["annotations"]["helm.sh/hook-weight"]) for j in r.kind("Job"))
    for claim in claims:
        a = claim["metadata"]["annotations"]
        # pre-install only, never deleted by Helm (no before-hook-creation, Helm's default when no policy is given)
        assert a["helm.sh/hook"] == "pre-install"
        assert "before-hook-creation" not in a["helm.sh/hook-delete-policy"]
        assert a["helm.sh/resource-policy"] == "keep"
        assert int(a["helm.sh/hook-weight"]) < job_weight
    models = next(c for c in claims if c["metadata"]["labels"]["app.kubernetes.io/component"] == "models")
    assert models["spec"]["storageClassName"] == "" and models["spec"]["resources"]["requests"]["storage"] == "1Ti"
    # subPath applied in every mount of the claims
    for _, spec in Rendered(maximal_values()).workloads():
        for c in spec["containers"]:
            for m, src in mounts_of(spec, c, "persistentVolumeClaim"):
                assert m["subPath"] == {"/models": "models", "/engines": "engines"}[m["mountPath"]]


def test_given_claims_are_not_created() -> None:
    assert Rendered(reviewer_values("rtx")).kind("PersistentVolumeClaim") == []


def test_pool_overrides() -> None:
    v = reviewer_values("rtx")
    v["pools"][1].update(checkpoint="juggernaut_xl.safetensors", prebuild={"enabled": False})
    v["pools"][0]["prebuild"] = {"refit": False, "checkpoints": CHECKPOINTS[1:]}
    v["autoscaling"] = {"enabled": True, "kind": "hpa", "minReplicas": 2, "maxReplicas": 9}
    v["pools"][2]["autoscaling"] = {"enabled": False}
    r = Rendered(v)
    assert sorted(j["metadata"]["name"] for j in r.kind("Job")) == ["rev-sd-webui-trt-build-l40s",
                                                                     "rev-sd-webui-trt-build-rtx-pro"]
    (plans,) = r.kind("ConfigMap")
    assert sorted(plans["data"]) == ["l40s.json", "rtx-pro.json"]
    l40s = json.loads(plans["data"]["l40s.json"])["builds"]
    assert [(b["checkpoint"], b["refit"]) for b in l40s] == [(CHECKPOINTS[1], False)]
    assert len(json.loads(plans["data"]["rtx-pro.json"])["builds"]) == 2
    a10 = r.one("Deployment", "rev-sd-webui-trt-a10")
    assert env_of(a10["spec"]["template"]["spec"]["containers"][0])["WEBUI_CKPT"] == "juggernaut_xl.safetensors"
    assert sorted(h["metadata"]["name"] for h in r.kind("HorizontalPodAutoscaler")) == ["rev-sd-webui-trt-a10",
                                                                                        "rev-sd-webui-trt-l40s"]
    assert r.one("Deployment", "rev-sd-webui-trt-rtx-pro")["spec"]["replicas"] == 5
    assert "replicas" not in a10["spec"]
    assert "WARNING: pool a10" not in r.notes  # its pre-build is off: nothing to compare with


def test_keda_scaledobject_per_pool_with_templated_triggers() -> None:
    r = Rendered(example_values(CHART / "examples" / "two-pools-rtx.yaml"), name="sd", namespace="gen")
    scaled = {s["metadata"]["name"]: s for s in r.kind("ScaledObject")}
    assert sorted(scaled) == ["sd-sd-webui-trt-h100", "sd-sd-webui-trt-l40s"]
    for name, s in scaled.items():
        assert s["spec"]["scaleTargetRef"]["name"] == name
        assert "replicas" not in r.one("Deployment", name)["spec"]
        query = s["spec"]["triggers"][0]["metadata"]["query"]
        assert f'pod=~"{name}-' in query and 'namespace="gen"' in query, query
    assert scaled["sd-sd-webui-trt-h100"]["spec"]["minReplicaCount"] == 0
    assert r.kind("HorizontalPodAutoscaler") == []  # KEDA makes its own


def test_a_pool_and_its_job_share_the_pool_image() -> None:
    r = Rendered(example_values(CHART / "examples" / "two-pools-rtx.yaml"))
    images = {d["metadata"]["labels"]["sd-webui-trt/pool"] + "/" + d["kind"]:
              d["spec"]["template"]["spec"]["containers"][0]["image"] for d in r.kind("Deployment") + r.kind("Job")}
    assert images == {"l40s/Deployment": "registry.example.com/ml/sd-webui-trt-rtx:0.1.0",
                      "l40s/Job": "registry.example.com/ml/sd-webui-trt-rtx:0.1.0",
                      "h100/Deployment": "registry.example.com/ml/sd-webui-trt:0.1.0",
                      "h100/Job": "registry.example.com/ml/sd-webui-trt:0.1.0"}


def test_image_interface() -> None:
    """The image's Dockerfile (where it is in the tree) has the ENTRYPOINT, user and port the chart relies on: the
    containers set only args, run as uid 1000 and probe port 7860."""
    dockerfile = DOCKER / "Dockerfile"
    if not dockerfile.is_file():
        pytest.skip("deploy/docker/Dockerfile is not in this tree")
    parse = pytest.importorskip("dockerfile_parse")
    instructions = parse.DockerfileParser(str(dockerfile)).structure
    last = {i["instruction"]: i["value"] for i in instructions}
    entrypoint = json.loads(last["ENTRYPOINT"])
    assert entrypoint[-1] == f"{EXT}/deploy/docker/entrypoint.sh", entrypoint
    assert last["USER"].split(":")[0] == "1000"
    assert "7860" in last["EXPOSE"].split()
    for _, spec in Rendered(maximal_values()).workloads():
        for c in spec["containers"]:
            assert "command" not in c, "a command would replace the image's ENTRYPOINT (and its tini)"


def test_ingress_cookie_affinity_and_generation_sized_limits() -> None:
    r = Rendered(example_values(CHART / "examples" / "two-pools-rtx.yaml"))
    (ingress,) = r.kind("Ingress")
    a = ingress["metadata"]["annotations"]
    assert a["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert a["nginx.ingress.kubernetes.io/proxy-body-size"] == "64m"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == r.kind("Service")[0]["metadata"]["name"] and backend["port"]["name"] == "http"
    assert "affinity" not in json.dumps(Rendered({"ingress": {"enabled": True, "hosts": [{"host": "x"}]}})
                                        .kind("Ingress")[0]["metadata"].get("annotations", {}))


def test_api_auth_secret_is_a_file_and_probes_stay_open() -> None:
    r = Rendered(example_values(CHART / "examples" / "tensorrt-per-pool.yaml"))
    for d in r.kind("Deployment"):
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        (mount, secret) = next((m, s) for m, s in mounts_of(spec, c, "secret"))
        assert secret["secretName"] == "sd-api-auth" and mount["readOnly"] is True
        assert env_of(c)["SDTRT_API_AUTH_FILE"] == f"{mount['mountPath']}/{secret['items'][0]['path']}"
        assert "httpHeaders" not in c["readinessProbe"]["httpGet"]  # /ready needs no credentials
        assert "sd-api-auth" not in json.dumps(c.get("env", []))  # never the secret's value in the pod spec


def test_read_only_root_moves_what_a1111_writes() -> None:
    r = Rendered(maximal_values())
    for d in r.kind("Deployment"):
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        writable = {m["mountPath"] for m, _ in mounts_of(spec, c, "emptyDir")}
        assert {"/tmp", "/opt/webui/outputs", "/opt/webui/log", "/opt/webui/cache", "/opt/webui/tmp",
                "/var/lib/webui", "/dev/shm"} <= writable
        (seed,) = spec["initContainers"]  # the settings file starts as the image's
        assert "cp /opt/webui/config.json /var/lib/webui/config.json" in seed["command"][-1]
        assert seed["image"] == c["image"] and seed["securityContext"]["readOnlyRootFilesystem"] is True
        assert [(m["name"], m["mountPath"]) for m in seed["volumeMounts"]] == [
            (m["name"], m["mountPath"]) for m in c["volumeMounts"] if m["mountPath"] == "/var/lib/webui"]
        args = env_of(c)["WEBUI_EXTRA_ARGS"].split()
        assert "--no-prompt-history" in args
        assert args[args.index("--ui-settings-file") + 1].startswith("/var/lib/webui/")
        assert args[args.index("--ui-config-file") + 1].startswith("/var/lib/webui/")
    d = Rendered({}).kind("Deployment")[0]
    assert d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False
    assert "initContainers" not in d["spec"]["template"]["spec"]


def test_notes_warn_about_inconsistent_values() -> None:
    v = reviewer_values("rtx")
    v["webui"]["checkpoint"] = "not_prebuilt.safetensors"
    assert "WARNING: pool l40s loads not_prebuilt.safetensors" in Rendered(v).notes
    assert "WARNING" not in Rendered(reviewer_values("rtx")).notes
    assert "prebuild is off and fleet.requireEngine is on" in Rendered({}).notes
    assert "sticky sessions" in Rendered({"webui": {"ui": True}}).notes


# ---- 4. cross-checks against the code -------------------------------------------------------------------------------
def extension_sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "extension").rglob("*.py")))


def docker_sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCKER.glob("*")) if p.is_file()) \
        if DOCKER.is_dir() else ""


def rendered_env_names() -> set[str]:
    names = set()
    for make in VALUE_SETS.values():
        for _, spec in Rendered(make()).workloads():
            for c in spec["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
    return names


def test_every_variable_the_chart_sets_has_a_reader() -> None:
    ext, docker = extension_sources(), docker_sources()
    have_scripts = ENTRYPOINT.is_file()
    names = rendered_env_names()
    assert {"SDTRT_BUILDS", "SDTRT_CACHE", "SDTRT_REQUIRE_ENGINE", "SDTRT_RESCAN_S", "SDTRT_API_AUTH_FILE",
            "SDTRT_PREBUILD_PLAN", "WEBUI_EXTRA_ARGS", "WEBUI_CKPT"} <= names
    unread = []
    for name in sorted(names):
        word = re.compile(rf"\b{re.escape(name)}\b")
        if name in OTHER_READERS:
            continue
        if name.startswith("SDTRT_") and word.search(ext):
            continue
        if have_scripts and word.search(docker):
            continue
        if not have_scripts and name in DOCUMENTED_ENTRYPOINT_ENV:
            continue
        unread.append(name)
    assert unread == [], f"set by the chart, read by nobody: {unread}"


def test_fleet_variables_mean_what_the_values_say() -> None:
    """The extension's own parser reads the rendered serving environment."""
    from sdtrt.webui.fleet import FleetSettings

    for require, rescan in ((True, 7), (False, 0.5)):
        v = reviewer_values("rtx")
        v["fleet"] = {"requireEngine": require, "rescanSeconds": rescan}
        for d in Rendered(v).kind("Deployment"):
            settings = FleetSettings.from_env(env_of(d["spec"]["template"]["spec"]["containers"][0]))
            assert settings == FleetSettings(builds=False, rescan_s=rescan, require_engine=require)


def sdtrt_routes(credentials: dict[str, str] | None = None) -> tuple[Any, set[tuple[str, str]]]:
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.routing import APIRoute

    from sdtrt.webui.api import PREFIX, mount
    from sdtrt.webui.service import EngineService

    app = FastAPI()
    mount(app, EngineService(), credentials)
    return app, {(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.path.startswith(PREFIX)
                 for m in r.methods or ()}


def probe_paths() -> set[tuple[str, str]]:
    """(method, path) of every HTTP probe in every rendered workload, plus what probe.sh's modes request."""
    paths = set()
    for make in VALUE_SETS.values():
        for _, spec in Rendered(make()).workloads():
            for c in spec["containers"]:
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if "httpGet" in c.get(probe, {}):
                        paths.add(("GET", c[probe]["httpGet"]["path"]))
                    elif "exec" in c.get(probe, {}):
                        assert c[probe]["exec"]["command"] == [PROBE, "live"], c[probe]
                        paths.add(("GET", "/sdapi/v1/memory"))  # probe.sh live: documented interface
    probe_sh = DOCKER / "probe.sh"
    if probe_sh.is_file():  # and what the script really requests
        paths |= {("GET", p) for p in re.findall(r"(/sd(?:api|trt)/v1/[a-z/-]+)", probe_sh.read_text())}
    return paths


def test_probe_paths_are_routes() -> None:
    _, ours = sdtrt_routes()
    a1111 = {tuple(line.split(" ", 1)) for line in read_list(API_ROUTES_FILE)}
    paths = probe_paths()
    assert ("GET", "/sdtrt/v1/ready") in paths and ("GET", "/sdapi/v1/memory") in paths
    for method, path in sorted(paths):
        known = ours if path.startswith("/sdtrt/") else a1111
        assert (method, path) in known, f"{method} {path} is not a route"


def test_readiness_route_answers_without_credentials() -> None:
    """The httpGet readiness probe sends no credentials, also when the WebUI runs with --api-auth."""
    pytest.importorskip("httpx")
    app, _ = sdtrt_routes({"ops": "secret"})
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        ready = client.get("/sdtrt/v1/ready")
        assert ready.status_code in (200, 503) and "ready" in ready.json(), ready.text
        assert client.get("/sdtrt/v1/status").status_code == 401  # the others still need them


def test_plans_are_read_by_the_prebuild_command() -> None:
    from sdtrt.backends import BACKENDS
    from sdtrt.profiles import Profile
    from sdtrt.targets import parse_targets
    from sdtrt.tools.prebuild import parse_plan
    checked = 0
    for which, make in VALUE_SETS.items():
        for cm in Rendered(make()).kind("ConfigMap"):
            for key, text in cm["data"].items():
                plan = json.loads(text)
                for entry in plan["builds"]:
                    assert entry["backend"] in BACKENDS, (which, key, entry)
                    assert parse_targets(entry["targets"]) == tuple(entry["targets"]), (which, key)
                    for p in entry["profiles"]:
                        Profile.parse(p)
                assert len(parse_plan(plan, list(BACKENDS))) == len(plan["builds"])
                checked += 1
    assert checked >= 6


def webui_args_of_values() -> set[str]:
    """A1111 arguments the chart passes through WEBUI_EXTRA_ARGS (examples' extraArgs and its own)."""
    args: set[str] = set()
    for make in VALUE_SETS.values():
        for d in Rendered(make()).kind("Deployment"):
            extra = env_of(d["spec"]["template"]["spec"]["containers"][0]).get("WEBUI_EXTRA_ARGS", "")
            args |= {a for a in extra.split() if a.startswith("-")}
    for p in EXAMPLES:
        args |= {a for a in example_values(p).get("webui", {}).get("extraArgs", []) if a.startswith("-")}
    return args


def test_every_webui_argument_exists_in_a1111() -> None:
    known = set(read_list(CMD_ARGS_FILE))
    args = webui_args_of_values() | set(DOCUMENTED_A1111_ARGS)
    assert {"--no-prompt-history", "--ui-settings-file", "--opt-sdp-attention"} <= args
    assert sorted(args - known) == []


def _map_paths(value: str, mounts: dict[str, Path]) -> str:
    for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(local) + value[len(mount_path):]
    return value


def run_entrypoint(workload: dict[str, Any], tmp: Path, files: dict[str, str]) -> list[str]:
    """Run deploy/docker/entrypoint.sh in dry-run mode with the container's command and environment, its mounts
    mapped to folders under `tmp`, files (path in the container -> content) in place; its argument lines."""
    spec = workload["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: tmp / m["name"] / m.get("subPath", "") for m in c.get("volumeMounts", [])}
    for local in mounts.values():
        local.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        local = Path(_map_paths(path, mounts))
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(content, encoding="utf-8")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WEBUI_DRY_RUN": "1",
           "WEBUI_DIR": str(tmp / "webui"), "WEBUI_PYTHON": "python"}
    (tmp / "webui").mkdir(exist_ok=True)
    env |= {k: _map_paths(v, mounts) for k, v in env_of(c).items()}
    assert "command" not in c  # the image's ENTRYPOINT runs entrypoint.sh (test_image_interface)
    proc = subprocess.run(["sh", str(ENTRYPOINT), *c["args"]], env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.fixture
def entrypoint() -> Path:
    if not ENTRYPOINT.is_file() or "WEBUI_DRY_RUN" not in ENTRYPOINT.read_text(encoding="utf-8"):
        pytest.skip("deploy/docker/entrypoint.sh (with WEBUI_DRY_RUN) is not in this tree")
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    return ENTRYPOINT


@pytest.mark.parametrize("which", ["maximal", "tensorrt-per-pool.yaml", "two-pools-rtx.yaml", "defaults"])
def test_entrypoint_takes_the_serving_environment(which: str, entrypoint: Path, tmp_path: Path) -> None:
    values = VALUE_SETS[which]()
    known = set(read_list(CMD_ARGS_FILE))
    for i, d in enumerate(Rendered(values).kind("Deployment")):
        c = d["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c)
        files = {"/models/Lora/.keep": "", "/engines/.keep": ""}
        if env.get("WEBUI_CKPT"):
            files[f"/models/Stable-diffusion/{env['WEBUI_CKPT']}"] = ""
        else:
            files["/models/Stable-diffusion/.keep"] = ""
        if "SDTRT_API_AUTH_FILE" in env:
            files[env["SDTRT_API_AUTH_FILE"]] = "svc:pw1,ops:pw2\n"
        argv = run_entrypoint(d, tmp_path / str(i), files)
        flags = [a for a in argv if a.startswith("--")]
        assert sorted(set(flags) - known) == [], f"{which}: arguments A1111 1.10.1 does not take"
        assert argv[argv.index("--port") + 1] == "7860"
        assert ("--nowebui" in argv) == (not values.get("webui", {}).get("ui", False))
        # the credentials never reach the command line: the extension's preload.py reads SDTRT_API_AUTH_FILE
        assert "--api-auth" not in argv and not any("pw1" in a for a in argv)
        for a in values.get("webui", {}).get("extraArgs", []):
            assert a in argv


@pytest.mark.parametrize("mode", ["rtx", "tensorrt"])
def test_entrypoint_takes_the_prebuild_job_environment(mode: str, entrypoint: Path, tmp_path: Path) -> None:
    r = Rendered(reviewer_values(mode))
    (plans,) = r.kind("ConfigMap")
    for i, job in enumerate(r.kind("Job")):
        spec = job["spec"]["template"]["spec"]
        c = spec["containers"][0]
        (m, src) = next((m, s) for m, s in mounts_of(spec, c, "configMap"))
        plan_path = f"{m['mountPath']}/{src['items'][0]['path']}"
        argv = run_entrypoint(job, tmp_path / str(i), {plan_path: plans["data"][src["items"][0]["key"]]})
        tail = argv[argv.index("prebuild"):]
        assert tail[0:2] == ["prebuild", str(tmp_path / str(i) / "plan" / "plan.json")]
        assert tail[2:] == ["--models", str(tmp_path / str(i) / "models"), "--cache", str(tmp_path / str(i) / "engines"),
                            "--json"]


# ---- 5. A1111's lists -----------------------------------------------------------------------------------------------
def test_a1111_lists_are_plausible() -> None:
    args = read_list(CMD_ARGS_FILE)
    assert args == sorted(set(args)) and all(a.startswith("-") for a in args)
    assert {"--api", "--nowebui", "--api-auth", "--ckpt-dir", "--lora-dir", "--skip-prepare-environment"} <= set(args)
    routes = read_list(API_ROUTES_FILE)
    assert routes == sorted(set(routes)) and "GET /sdapi/v1/memory" in routes and "POST /sdapi/v1/txt2img" in routes
    assert "1.10.1" in CMD_ARGS_FILE.read_text(encoding="utf-8").split("\n", 2)[1]


def test_a1111_lists_match_checkout() -> None:
    a1111 = os.environ.get("SDTRT_A1111_DIR")
    if not a1111:
        pytest.skip("SDTRT_A1111_DIR is not set")
    root = Path(a1111)
    assert a1111_version(root).startswith("1.10"), "the lists are of A1111 1.10.x"
    assert a1111_cmd_args(root) == read_list(CMD_ARGS_FILE)
    assert a1111_api_routes(root) == read_list(API_ROUTES_FILE)


# ---- documentation --------------------------------------------------------------------------------------------------
def schema_paths(node: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of every value the schema names (pools[].x for list items), not descending into overrides."""
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    for part in node.get("allOf", []):
        yield from schema_paths(part, defs, prefix)
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        yield path
        if path in ("pools[].prebuild", "pools[].autoscaling", "pools[].image") or key == "global":
            continue
        target = defs[sub["$ref"].rsplit("/", 1)[1]] if "$ref" in sub else sub
        if target.get("type") == "array":
            if key in ("pools", "hosts", "paths"):  # lists of the chart's own objects
                yield from schema_paths(target["items"], defs, f"{path}[].")
        elif ("properties" in target or "allOf" in target) and key != "resources":  # resources: Kubernetes'
            yield from schema_paths(sub, defs, f"{path}.")


def test_every_value_is_documented_in_the_readme_and_values_yaml() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    paths = sorted(set(schema_paths(schema, schema["definitions"])) - {"global"})
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    missing = [p for p in paths if f"`{p}`" not in readme]
    assert missing == [], f"values not in README.md: {missing}"
    # values.yaml: every value the schema names has a comment, on the line above it or on its own line
    stack: list[tuple[int, str]] = []
    undocumented = []
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        stack = [(n, k) for n, k in stack if n < indent] + [(indent, m.group(2))]
        path = ".".join(k for _, k in stack)
        if path in paths and not (lines[i - 1].lstrip().startswith("#") or " # " in line):
            undocumented.append(path)
    assert undocumented == [], f"values.yaml keys without a comment: {undocumented}"
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert set(defaults) <= set(schema["properties"])


if __name__ == "__main__":  # regenerate tests/data from an A1111 checkout
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/test_deploy_chart.py A1111_DIR")
    write_a1111_lists(Path(sys.argv[1]))
    print(f"wrote {CMD_ARGS_FILE} and {API_ROUTES_FILE}")
