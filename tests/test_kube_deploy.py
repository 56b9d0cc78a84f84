"""What ships for Kubernetes, checked offline: the plain manifests (deploy/*.yaml, parsed with PyYAML), the Helm
chart (helm lint and helm template where helm is installed; without it, its values against its own schema and
every .Values path its templates use), the committed gRPC code (what grpcio-tools generates from the .proto
files), and kube/'s place in the layers (imports core only; modules of at most 400 lines). No cluster."""
from __future__ import annotations

import ast
import filecmp
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (./install.sh --test installs it)")

DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "gpuwatch"
MOUNTS = {"/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources", "/run/gpuwatch", "/sys/kernel/debug",
          "/sys/fs/bpf", "/var/lib/gpuwatch/lib"}


def documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d) and d["metadata"].get("name"), f"{path.name}: {d}"
    return docs


def check_daemonset(ds: dict) -> None:
    """What the daemon needs of its pod, wherever the DaemonSet came from."""
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["priorityClassName"] == "system-node-critical"
    (daemon,) = pod["containers"]
    assert daemon["securityContext"].get("privileged") is True
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounted = {paths[m["name"]] for m in daemon["volumeMounts"] if m["name"] in paths}
    assert MOUNTS <= mounted, MOUNTS - mounted
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in daemon["env"]
    (init,) = pod["initContainers"]
    assert "libgpuwatch.so" in " ".join(init["args"]) and paths[init["volumeMounts"][0]["name"]] == \
        "/var/lib/gpuwatch/lib", "the init container copies the interposer into the host directory"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_the_plain_manifests_parse_and_hold_what_the_daemon_needs():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents(DEPLOY / "daemonset.yaml")}
    check_daemonset(docs[("DaemonSet", "gpuwatch")])
    toml = docs[("ConfigMap", "gpuwatch-config")]["data"]["gpuwatch.toml"]
    import tomllib
    assert tomllib.loads(toml)["kubernetes"]["enabled"] is True
    rbac = {(d["kind"], d["metadata"]["name"]): d for d in documents(DEPLOY / "rbac.yaml")}
    assert rbac[("ClusterRole", "gpuwatch-pod-reader")]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}], "read-only, pods only"
    binding = rbac[("ClusterRoleBinding", "gpuwatch-pod-reader")]
    assert binding["subjects"][0]["name"] == docs[("DaemonSet", "gpuwatch")]["spec"]["template"]["spec"][
        "serviceAccountName"]


def schema_problems(docs: list[dict]) -> list[str]:
    """Each document against the Kubernetes API's own schema (kubernetes-validate, offline, strict: no field the
    API does not have); kinds it has no schema for (a ServiceMonitor) are left out."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (./install.sh --test "
                             "installs it)")
    problems = []
    for d in docs:
        try:
            kv.validate(d, kv.latest_version(), strict=True)
        except kv.SchemaNotFoundError:
            continue
        except kv.ValidationError as exc:
            problems.append(f"{d['kind']} {d['metadata']['name']}: {exc}")
    return problems


def test_the_plain_manifests_hold_to_the_kubernetes_schemas():
    docs = [d for name in ("daemonset.yaml", "rbac.yaml") for d in documents(DEPLOY / name)]
    assert {d["kind"] for d in docs} >= {"DaemonSet", "ServiceAccount"}
    assert schema_problems(docs) == []


# ------------------------------------------------------------------------------------------------ the chart


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed: the chart is checked offline below "
                    "(values against values.schema.json, the .Values its templates use)")
def test_helm_lints_and_renders_the_chart():
    lint = subprocess.run(["helm", "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for extra in ([], ["--set", "securityContext.privileged=false", "--set", "metrics.serviceMonitor.enabled=true"]):
        r = subprocess.run(["helm", "template", "gw", str(CHART), "--namespace", "gpuwatch", *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        docs = {d["kind"]: d for d in yaml.safe_load_all(r.stdout) if d}
        assert schema_problems(list(docs.values())) == []
        ds = docs["DaemonSet"]
        if extra:
            sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
            assert sc["privileged"] is False and "BPF" in sc["capabilities"]["add"] and "ServiceMonitor" in docs
        else:
            check_daemonset(ds)
            assert ds["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def validate(value: Any, schema: dict, where: str = "values") -> list[str]:
    """The parts of JSON Schema the chart's schema uses: type, properties, required, additionalProperties, enum,
    minimum, maximum, pattern, minLength, items."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}
    want = schema.get("type")
    if want and (not isinstance(value, types[want]) or (want == "integer" and isinstance(value, bool))):
        return [f"{where}: not {want}: {value!r}"]
    problems = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        problems += [f"{where}.{k}: required" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            problems += [f"{where}.{k}: not in the schema" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                problems += validate(v, props[k], f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            problems += validate(v, schema["items"], f"{where}[{i}]")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not one of {schema['enum']}")
    if isinstance(value, int) and not (schema.get("minimum", value) <= value <= schema.get("maximum", value)):
        problems.append(f"{where}: {value} out of range")
    if isinstance(value, str) and (len(value) < schema.get("minLength", 0) or (
            "pattern" in schema and not re.search(schema["pattern"], value))):
        problems.append(f"{where}: {value!r} does not match")
    return problems


def test_the_charts_values_hold_to_its_schema_and_its_templates_use_only_values_it_has():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert validate(values, schema) == []
    assert validate({**values, "sharesPerGpu": 0}, schema) == ["values.sharesPerGpu: 0 out of range"]
    assert validate({**values, "bogus": 1}, schema) == ["values.bogus: not in the schema"]
    used = set()
    for template in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()))
    assert used, "no template reads a value?"
    for path in sorted(used):
        node: Any = values
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"templates use .Values.{path}, which values.yaml lacks"
            node = node[key]
    for name in ("daemonset.yaml", "configmap.yaml", "rbac.yaml", "service.yaml", "serviceaccount.yaml",
                 "servicemonitor.yaml", "NOTES.txt", "_helpers.tpl"):
        assert (CHART / "templates" / name).exists(), name
    labels = (CHART / "templates" / "_helpers.tpl").read_text()
    for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                  "app.kubernetes.io/managed-by", "helm.sh/chart"):
        assert label in labels


# ------------------------------------------------------------------------------------------------ the code


def test_the_committed_grpc_code_is_what_grpcio_tools_generates(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (./install.sh --test installs it)")
    shutil.copytree(ROOT / "kube" / "api", tmp_path / "api", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    r = subprocess.run(["make", "-s", "-C", str(tmp_path / "api"), f"PYTHON={sys.executable}"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    generated = sorted(p.name for p in (tmp_path / "api").glob("*_pb2*"))
    assert generated == sorted(p.name for p in (ROOT / "kube" / "api").glob("*_pb2*"))
    stale = [n for n in generated if not filecmp.cmp(tmp_path / "api" / n, ROOT / "kube" / "api" / n, shallow=False)]
    assert not stale, f"regenerate with `make -C kube/api`: {stale} differ from what the .proto files give"


def test_the_grpc_method_paths_are_the_kubelets():
    from gpuwatch.kube.api import deviceplugin_pb2 as dp
    from gpuwatch.kube.api import podresources_pb2 as pr
    assert [m.full_name for m in dp.DESCRIPTOR.services_by_name["DevicePlugin"].methods] == [
        f"v1beta1.DevicePlugin.{m}" for m in ("GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation",
                                              "Allocate", "PreStartContainer")]
    assert dp.DESCRIPTOR.services_by_name["Registration"].methods[0].full_name == "v1beta1.Registration.Register"
    assert [m.full_name for m in pr.DESCRIPTOR.services_by_name["PodResourcesLister"].methods] == [
        "v1.PodResourcesLister.List", "v1.PodResourcesLister.GetAllocatableResources", "v1.PodResourcesLister.Get"]
    fields = {f.name: f.number for f in dp.ContainerPreferredAllocationRequest.DESCRIPTOR.fields}
    assert fields == {"available_deviceIDs": 1, "must_include_deviceIDs": 2, "allocation_size": 3}


def test_kube_imports_only_core_and_its_modules_are_small():
    for path in sorted((ROOT / "kube").glob("*.py")):
        text = path.read_text()
        assert text.count("\n") <= 400, f"{path.name}: over 400 lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                top = (node.module or "").split(".")[0]
                assert node.level == 1 or top == "core", f"{path.name}:{node.lineno}: imports ..{node.module}"
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.startswith("gpuwatch.") and not n.startswith(("gpuwatch.core", "gpuwatch.kube"))
                               for n in names), f"{path.name}:{node.lineno}"
