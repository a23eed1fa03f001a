"""The Helm chart (helm/rtdiff-cluster), rendered and linted by the real helm binary.

`bash scripts/tools/install-helm.sh` puts helm in .tools/bin and the operators' schema validators in
.tools/crd-validators. Rendered objects are checked against Kubernetes' own schemas
(kubernetes-validate, offline, strict: unknown fields fail), the ServiceMonitor and ScaledObject
against the prometheus-operator and KEDA API schemas (npm @kubernetes-models, run by node), and the
RayCluster structurally (no package registry ships KubeRay's CRD; its pod templates are checked as
core PodTemplates). The gateway's command line is fed to `rtdiff serve`'s own parser and config
loader, with the files its mounts would provide.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tarfile
import tomllib
import typing
from pathlib import Path

import grpc
import pytest
import yaml

from rtdiff_cluster.cli import build_parser, config_from_args
from rtdiff_cluster.config import BatchingConfig, ModelConfig, ServerConfig

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "rtdiff-cluster"
HELM = REPO / ".tools" / "bin" / "helm"
VALIDATORS = REPO / ".tools" / "crd-validators"
DASHBOARDS = REPO / "deploy" / "grafana"
PROBE_SCRIPT = CHART / "files" / "grpc_health_check.py"
RELEASE, NAMESPACE = "rt", "serving"
FULLNAME = f"{RELEASE}-rtdiff-cluster"
VALUES_FILES = ["default"] + sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))
KUBE_VERSIONS = ("1.27", "latest")  # the chart's kubeVersion floor, and the newest schemas we have
INSTALL_HINT = "run `bash scripts/tools/install-helm.sh` (scripts/setup.sh does)"


# ---- running helm ---------------------------------------------------------------------------

def helm(*args: str) -> subprocess.CompletedProcess:
    if not HELM.is_file():
        pytest.fail(f"helm is missing at {HELM.relative_to(REPO)}: {INSTALL_HINT}")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)


def values_args(values: str) -> list[str]:
    return [] if values == "default" else ["-f", str(CHART / "ci" / f"{values}.yaml")]


@functools.cache
def render(values: str = "default", *sets: str) -> tuple[dict, ...]:
    set_args = [a for s in sets for a in ("--set", s)]
    r = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(values), *set_args)
    assert r.returncode == 0, r.stderr
    return tuple(o for o in yaml.safe_load_all(r.stdout) if o)


def all_of(objs, kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind: str, name: str | None = None) -> dict:
    found = [o for o in all_of(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_pod(objs) -> dict:
    """The pod template that runs `rtdiff serve`: the RayCluster head, or the Deployment's pods."""
    clusters = all_of(objs, "RayCluster")
    if clusters:
        return clusters[0]["spec"]["headGroupSpec"]["template"]
    return one(objs, "Deployment")["spec"]["template"]


def worker_pod(objs) -> dict:
    (group,) = one(objs, "RayCluster")["spec"]["workerGroupSpecs"]
    return group["template"]


def rtdiff_pods(objs) -> list[dict]:
    return [gateway_pod(objs)] + ([worker_pod(objs)] if all_of(objs, "RayCluster") else [])


def config_toml(objs) -> dict:
    return tomllib.loads(one(objs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.toml"])


def serve_args(container: dict) -> list[str]:
    """What follows `rtdiff serve` on the gateway container's command line."""
    if container["command"] == ["rtdiff", "serve"]:
        return container.get("args", [])
    # kuberay head: bash -c SCRIPT $0 ARGS..., the script ending in `exec rtdiff serve "$@"`.
    assert container["command"] == ["/bin/bash", "-c"]
    assert container["args"][0].rstrip().endswith('exec rtdiff serve "$@"')
    return container["args"][2:]


def loaded_server_config(objs, tmp_path: Path) -> ServerConfig:
    """The gateway's command line parsed and loaded by rtdiff itself, every file it names coming
    from the pod's mounts (ConfigMaps with their rendered data; secrets with stand-in keys)."""
    pod = gateway_pod(objs)["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    local = {}
    for mount in container["volumeMounts"]:
        volume, target = volumes[mount["name"]], tmp_path / mount["name"]
        target.mkdir()
        if "configMap" in volume:
            for key, text in one(objs, "ConfigMap", volume["configMap"]["name"])["data"].items():
                (target / key).write_text(text)
        elif "secret" in volume:
            keys = [i["path"] for i in volume["secret"].get("items", [])] or ["tls.crt", "tls.key", "ca.crt"]
            for key in keys:
                (target / key).write_text("stand-in token\n")
        local[mount["mountPath"]] = target
    args = []
    for arg in serve_args(container):
        if arg.startswith("/"):
            mount = next((m for m in local if arg.startswith(m + "/")), None)
            assert mount, f"{arg} is on no mounted volume"
            arg = str(local[mount] / arg[len(mount) + 1:])
        args.append(arg)
    return config_from_args(build_parser().parse_args(["serve", *args]))


def port_named(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- helm lint and schemas ------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUES_FILES)
def test_helm_lint_passes(values):
    r = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(values))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in r.stdout


def is_kubernetes_kind(obj: dict) -> bool:
    """Core and built-in API groups (v1, apps, policy, autoscaling, *.k8s.io), not custom resources."""
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def kubernetes_objects(objs) -> list[dict]:
    """Everything Kubernetes itself defines, RayCluster pod templates included as PodTemplates."""
    out = [o for o in objs if is_kubernetes_kind(o)]
    for cluster in all_of(objs, "RayCluster"):
        for i, tpl in enumerate([cluster["spec"]["headGroupSpec"]["template"]]
                                + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]):
            out.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"raycluster-{i}"}, "template": tpl})
    return out


@pytest.mark.parametrize("values", VALUES_FILES)
def test_manifests_match_kubernetes_schemas(values):
    import kubernetes_validate

    objs = kubernetes_objects(render(values))
    assert {"ConfigMap", "Service", "PodDisruptionBudget"} <= {o["kind"] for o in objs}
    assert {"PodTemplate", "Deployment"} & {o["kind"] for o in objs}
    for version in KUBE_VERSIONS:
        v = kubernetes_validate.latest_version() if version == "latest" else version
        for obj in objs:
            kubernetes_validate.validate(obj, v, strict=True)


def test_kubernetes_schema_check_catches_a_bad_field():
    import kubernetes_validate

    deployment = json.loads(json.dumps(one(render("plain-pvc"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureTreshold"] = 3
    with pytest.raises(kubernetes_validate.ValidationError, match="failureTreshold"):
        kubernetes_validate.validate(deployment, "1.27", strict=True)


VALIDATE_JS = """
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
const models = { ServiceMonitor, ScaledObject };
const objects = JSON.parse(readFileSync(0, "utf8"));
console.log(JSON.stringify(objects.map((o) => {
  try { new models[o.kind](o).validate(); return null; } catch (e) { return e.message; }
})));
"""


def operator_schema_errors(objs: list[dict]) -> list[str | None]:
    if not (VALIDATORS / "node_modules").is_dir():
        pytest.fail(f"the operators' schema validators are missing at {VALIDATORS.relative_to(REPO)}: {INSTALL_HINT}")
    r = subprocess.run(["node", "--input-type=module", "-e", VALIDATE_JS], cwd=VALIDATORS, input=json.dumps(objs),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_servicemonitor_and_scaledobject_match_operator_schemas():
    objs = [o for values in VALUES_FILES for o in render(values) if o["kind"] in ("ServiceMonitor", "ScaledObject")]
    assert {o["kind"] for o in objs} == {"ServiceMonitor", "ScaledObject"}
    # Broken copies prove the validators look: a port number where the name belongs, no triggers.
    monitor = json.loads(json.dumps(next(o for o in objs if o["kind"] == "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["port"] = 9400
    scaled = json.loads(json.dumps(next(o for o in objs if o["kind"] == "ScaledObject")))
    del scaled["spec"]["triggers"]
    *errors, monitor_error, scaled_error = operator_schema_errors(objs + [monitor, scaled])
    assert errors == [None] * len(objs)
    assert "endpoints/0/port" in monitor_error
    assert "triggers" in scaled_error


RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs", "autoscalerOptions",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"template", "rayStartParams", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
                "scaleStrategy", "suspend", "idleTimeoutSeconds"}


@pytest.mark.parametrize("values", [v for v in VALUES_FILES if not v.startswith(("plain", "autoscaling"))])
def test_raycluster_has_kuberay_v1_structure(values):
    cluster = one(render(values), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC and set(spec["headGroupSpec"]) <= HEAD_GROUP
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert spec["rayVersion"] == yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # rayStartParams is map[string]string in KubeRay's API: a bare number is refused.
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in group["rayStartParams"].items())
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP and group["groupName"]
        assert all(isinstance(group[k], int) for k in ("replicas", "minReplicas", "maxReplicas"))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# ---- what users rely on ---------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUES_FILES)
def test_gateway_command_loads_in_rtdiff_serve(values, tmp_path):
    objs = render(values)
    cfg = loaded_server_config(objs, tmp_path)
    container = gateway_pod(objs)["spec"]["containers"][0]
    assert cfg.port == port_named(container, "grpc") and cfg.metrics_port == port_named(container, "metrics")
    assert cfg.ray_address == ("auto" if all_of(objs, "RayCluster") else "")
    assert config_toml(objs)["host"] == "0.0.0.0"


def test_kuberay_tp2_cfg_parallel_sizes_the_gpu_workers(tmp_path):
    objs = render("kuberay-tp2-cfg-parallel")
    model = loaded_server_config(objs, tmp_path).models[0]
    assert (model.tp, model.cfg_parallel, model.replicas) == (2, 2, 2)
    assert model.fast_paths.quantization == "fp8" and model.stream_cache.memory_mb == 2048
    # The gateway starts before the GPU workers join: ranks must ask for a GPU, not probe for one.
    assert model.num_gpus == 1
    (group,) = one(objs, "RayCluster")["spec"]["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 4
    assert group["replicas"] == 2  # one 4-GPU replica per 4-GPU pod
    head = gateway_pod(objs)["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert one(objs, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert worker_pod(objs)["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def test_kuberay_cpu_model_is_not_given_a_gpu(tmp_path):
    objs = render("default", "models[0].source=synthetic:tiny", "models[0].device=cpu")
    assert loaded_server_config(objs, tmp_path).models[0].num_gpus == -1  # the server's default: none on CPU


def test_kuberay_packs_each_models_replicas_on_whole_workers():
    (group,) = one(render("kuberay-two-models"), "RayCluster")["spec"]["workerGroupSpecs"]
    # flux: 3 replicas x 4 GPUs on 8-GPU pods -> 2 pods; small: 10 x 1 -> 2 pods.
    assert group["replicas"] == math.ceil(12 / 8) + math.ceil(10 / 8) == 4


def test_plain_mode_serves_a_model_from_a_pvc(tmp_path):
    objs = render("plain-pvc")
    assert not all_of(objs, "RayCluster")
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": "diffusion-models", "readOnly": True}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert mount["mountPath"] == "/models" and mount["readOnly"]
    cfg = loaded_server_config(objs, tmp_path)
    assert cfg.models[0].source == "/models/sdxl-turbo" and cfg.models[0].vae == "/models/taesdxl"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2  # 2 replicas x 1 GPU, local Ray


def test_plain_mode_mounts_a_host_path():
    pod = one(render("plain-hostpath"), "Deployment")["spec"]["template"]["spec"]
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models["hostPath"] == {"path": "/var/lib/diffusion-models", "type": "Directory"}
    assert config_toml(render("plain-hostpath"))["models"][0]["source"].startswith("/weights/")
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2  # tp=2


def secret_volume_of(pod: dict, path: str) -> tuple[dict, str]:
    """The secret volume that provides file `path` in the gateway container, and the key it reads."""
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume["secret"], path[len(mount["mountPath"]) + 1:]


def test_tls_and_token_secrets_are_mounted_and_passed(tmp_path):
    objs = render("tls-auth")
    pod = gateway_pod(objs)["spec"]
    args = serve_args(pod["containers"][0])
    flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert secret_volume_of(pod, flag["--tls-cert"]) == ({"secretName": "rtdiff-tls", "defaultMode": 0o440}, "tls.crt")
    assert secret_volume_of(pod, flag["--tls-key"])[1] == "tls.key"
    ca_secret, ca_key = secret_volume_of(pod, flag["--tls-client-ca"])
    assert ca_secret["secretName"] == "rtdiff-client-ca" and ca_key == "ca.crt"
    token_secret, token_key = secret_volume_of(pod, flag["--auth-token-file"])
    assert token_secret["secretName"] == "rtdiff-tokens" and token_key == "tokens"
    cfg = loaded_server_config(objs, tmp_path)
    assert cfg.tls.enabled and cfg.tls.client_ca_file and cfg.auth.token_file


def test_tls_gateway_is_probed_by_the_exec_script():
    objs = render("tls-auth")
    container = gateway_pod(objs)["spec"]["containers"][0]
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "/etc/rtdiff/probe/grpc_health_check.py"]
    assert f"--port={port_named(container, 'grpc')}" in command
    assert "--server-name=rtdiff.example.internal" in command and "--client-dir=/etc/rtdiff/probe-client" in command
    probe_cm = one(objs, "ConfigMap", f"{FULLNAME}-probe")
    assert probe_cm["data"]["grpc_health_check.py"] == PROBE_SCRIPT.read_text()
    # Server-only TLS: no client certificate, the Service's DNS name by default.
    plain = gateway_pod(render("plain-tls"))["spec"]["containers"][0]["livenessProbe"]["exec"]["command"]
    assert f"--server-name={FULLNAME}.{NAMESPACE}.svc" in plain and not any(a.startswith("--client-dir") for a in plain)


@pytest.mark.parametrize("values", ["default", "plain-pvc"])
def test_probes_are_grpc_health_with_a_startup_budget(values):
    objs = render(values)
    container = gateway_pod(objs)["spec"]["containers"][0]
    budget = yaml.safe_load((CHART / "values.yaml").read_text())["probes"]["startupBudgetSeconds"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["grpc"] == {"port": config_toml(objs)["port"]}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= budget >= 600  # model loads take minutes
    longer = gateway_pod(render(values, "probes.startupBudgetSeconds=7200"))["spec"]["containers"][0]["startupProbe"]
    assert longer["periodSeconds"] * longer["failureThreshold"] >= 7200
    pod = gateway_pod(objs)["spec"]
    assert pod["terminationGracePeriodSeconds"] > ServerConfig().drain_timeout_s  # SIGTERM drains first


@pytest.mark.parametrize("values", ["default", "plain-pvc", "kuberay-tp2-cfg-parallel"])
def test_pods_run_as_non_root_with_a_read_only_root(values):
    for pod in rtdiff_pods(render(values)):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        container = spec["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert "emptyDir" in mounts["/tmp"]  # Ray's session files
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"  # Ray's object store
        assert {"name": "HOME", "value": "/tmp"} in container["env"]


@pytest.mark.parametrize("values", ["monitoring", "plain-pvc"])
def test_services_and_servicemonitor_reach_the_gateway(values):
    objs = render(values, "serviceMonitor.enabled=true")
    pod = gateway_pod(objs)
    container = pod["spec"]["containers"][0]
    grpc_svc, metrics_svc = one(objs, "Service", FULLNAME), one(objs, "Service", f"{FULLNAME}-metrics")
    for svc, name in ((grpc_svc, "grpc"), (metrics_svc, "metrics")):
        assert matches(svc["spec"]["selector"], pod["metadata"]["labels"])
        (port,) = svc["spec"]["ports"]
        assert port["targetPort"] == name and port["port"] == port_named(container, name)
    if all_of(objs, "RayCluster"):
        assert not matches(grpc_svc["spec"]["selector"], worker_pod(objs)["metadata"]["labels"])
    monitor = one(objs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert matches(selector, metrics_svc["metadata"]["labels"]) and not matches(selector, grpc_svc["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == metrics_svc["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_servicemonitor_carries_the_labels_prometheus_selects():
    monitor = one(render("monitoring"), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["interval"] == "10s"
    assert not all_of(render(), "ServiceMonitor")


def test_dashboards_are_configmaps_for_the_grafana_sidecar():
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "deploy/grafana holds no dashboard"
    maps = [o for o in all_of(render("monitoring"), "ConfigMap") if o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert sorted(name for m in maps for name in m["data"]) == [f.name for f in files]
    for m in maps:
        ((name, text),) = m["data"].items()
        assert json.loads(text) == json.loads((DASHBOARDS / name).read_text())
        assert m["metadata"]["annotations"]["grafana_folder"] == "rtdiff"
    assert not [o for o in all_of(render(), "ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]]


def test_packaged_chart_carries_the_dashboards(tmp_path):
    r = helm("package", str(CHART), "--destination", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (archive,) = tmp_path.glob("rtdiff-cluster-*.tgz")
    with tarfile.open(archive) as tar:
        packaged = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                    if m.name.startswith("rtdiff-cluster/dashboards/") and m.name.endswith(".json")}
        assert not [m for m in tar.getnames() if m.startswith("rtdiff-cluster/ci/")]
    assert packaged == {f.name: f.read_bytes() for f in DASHBOARDS.glob("*.json")}


def test_keda_scales_the_deployment_on_queue_depth():
    objs = render("autoscaling-keda")
    deployment, scaled = one(objs, "Deployment"), one(objs, "ScaledObject")
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns it
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": deployment["metadata"]["name"]}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 8)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "24"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(rtdiff_queue_depth{")
    assert f'service="{FULLNAME}-metrics"' in query and f'namespace="{NAMESPACE}"' in query
    assert not all_of(objs, "HorizontalPodAutoscaler")


def test_hpa_scales_the_deployment_on_the_queue_depth_pods_metric():
    objs = render("autoscaling-hpa")
    deployment, hpa = one(objs, "Deployment"), one(objs, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "rtdiff_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "12"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    assert not all_of(objs, "ScaledObject")


@pytest.mark.parametrize("values,protects", [("default", "worker"), ("plain-pvc", "gateway")])
def test_disruption_budget_covers_the_pods_holding_replicas(values, protects):
    objs = render(values)
    selector = one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    protected = worker_pod(objs) if protects == "worker" else gateway_pod(objs)
    assert matches(selector, protected["metadata"]["labels"])
    if protects == "worker":
        assert not matches(selector, gateway_pod(objs)["metadata"]["labels"])


def run_pod_script(container: dict, tmp_path: Path, gen_cmd: str | None) -> tuple[subprocess.CompletedProcess, list]:
    """Runs a container's bash command with stand-ins for `ray` and `rtdiff` that log their argv."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for tool in ("ray", "rtdiff"):
        (bin_dir / tool).write_text(f'#!{sys.executable}\nimport json, sys\n'
                                    f'open({str(log)!r}, "a").write(json.dumps(["{tool}"] + sys.argv[1:]) + "\\n")\n')
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"} | ({"KUBERAY_GEN_RAY_START_CMD": gen_cmd} if gen_cmd else {})
    r = subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True, timeout=30)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def test_head_starts_ray_then_execs_the_gateway(tmp_path):
    objs = render("tls-auth")
    head = gateway_pod(objs)["spec"]["containers"][0]
    r, calls = run_pod_script(head, tmp_path, "ray start --head --num-cpus=0 --num-gpus=0 --block --metrics-export-port=8080")
    assert r.returncode == 0, r.stderr
    assert calls == [["ray", "start", "--head", "--num-cpus=0", "--num-gpus=0", "--metrics-export-port=8080"],
                     ["rtdiff", "serve", *serve_args(head)]]


def test_head_refuses_to_start_without_kuberays_start_line(tmp_path):
    head = gateway_pod(render())["spec"]["containers"][0]
    r, calls = run_pod_script(head, tmp_path, None)
    assert r.returncode != 0 and "KUBERAY_GEN_RAY_START_CMD" in r.stderr and calls == []


def test_worker_runs_kuberays_start_line_as_is(tmp_path):
    worker = worker_pod(render())["spec"]["containers"][0]
    r, calls = run_pod_script(worker, tmp_path, "ray start --address=rt-head-svc:6379 --block")
    assert r.returncode == 0, r.stderr
    assert calls == [["ray", "start", "--address=rt-head-svc:6379", "--block"]]


# ---- values.schema.json ---------------------------------------------------------------------

def write_values(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


TINY = {"source": "synthetic:tiny"}
BAD_VALUES = {
    "wrong type": ({"batching": {"max_batch_size": "eight"}}, "/batching/max_batch_size"),
    "negative replicas": ({"models": [TINY | {"replicas": -1}]}, "/models/0/replicas"),
    "tp not in the allowed set": ({"models": [TINY | {"tp": 3}]}, "/models/0/tp"),
    "cfg-parallel not 1 or 2": ({"models": [TINY | {"cfg_parallel": 4}]}, "/models/0/cfg_parallel"),
    "unknown top-level key": ({"replica": 3}, "'replica' not allowed"),
    "unknown model key": ({"models": [TINY | {"tensor_parallel": 2}]}, "'tensor_parallel' not allowed"),
    "unknown batching key": ({"batching": {"max_batch": 4}}, "'max_batch' not allowed"),
    "out of the server's range": ({"batching": {"max_queue_delay_ms": 20000}}, "/batching/max_queue_delay_ms"),
    "unknown mode": ({"mode": "swarm"}, "/mode"),
    "negative pods": ({"mode": "plain", "plain": {"replicas": -2}}, "/plain/replicas"),
    "bad port": ({"ports": {"grpc": 70000, "metrics": 9400}}, "/ports/grpc"),
    "tls without a secret": ({"tls": {"enabled": True}}, "/tls/secretName"),
    "mutual tls without tls": ({"tls": {"mutual": True}}, "/tls/enabled"),
    "auth without a secret": ({"auth": {"enabled": True}}, "/auth/secretName"),
    "pvc without a claim": ({"modelStorage": {"type": "pvc"}}, "/modelStorage/claimName"),
    "hostPath not absolute": ({"modelStorage": {"type": "hostPath", "hostPath": "models"}}, "/modelStorage/hostPath"),
    "unknown autoscaler": ({"autoscaling": {"engine": "vpa"}}, "/autoscaling/engine"),
    # Checks across values, made by the templates.
    "replica wider than a worker": ({"models": [TINY | {"tp": 4}], "ray": {"workers": {"gpusPerWorker": 2}}},
                                    "ray.workers.gpusPerWorker: 2 is not a multiple of models[0]'s tp x cfg_parallel = 4"),
    "too few workers": ({"models": [TINY | {"replicas": 3}], "ray": {"workers": {"replicas": 2}}},
                        "ray.workers.replicas: 2 worker pods hold 2 GPUs, the models' replicas need 3"),
    "autoscaling in kuberay mode": ({"autoscaling": {"enabled": True}}, "autoscaling.enabled: needs mode=plain"),
    "min above max": ({"mode": "plain", "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
                      "autoscaling.minReplicas"),
    "same port twice": ({"ports": {"grpc": 9400, "metrics": 9400}}, "ports.metrics: must differ"),
    "too few gpus per pod": ({"mode": "plain", "plain": {"gpus": 1}, "models": [TINY | {"tp": 2}]}, "plain.gpus"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_rejected_naming_the_field(case, tmp_path):
    values, field = BAD_VALUES[case]
    r = helm("template", RELEASE, str(CHART), "-f", str(write_values(tmp_path, values)))
    assert r.returncode != 0, f"{case}: accepted"
    assert field in r.stderr, r.stderr


def test_values_schema_mirrors_the_server_config():
    """Every config key the chart renders exists in rtdiff_cluster/config.py, and every one users
    may set there can be set here (host, ports, ray_address, tls and auth the chart sets itself)."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    fields = lambda cls: {f.name for f in dataclasses.fields(cls)}
    chart_owned = {"host", "port", "metrics_port", "ray_address", "models", "batching", "tls", "auth"}
    assert set(schema["server"]["properties"]) == fields(ServerConfig) - chart_owned
    assert set(schema["batching"]["properties"]) == fields(BatchingConfig)
    model_schema = schema["models"]["items"]["properties"]
    assert set(model_schema) == fields(ModelConfig)
    for name, hint in typing.get_type_hints(ModelConfig).items():
        if dataclasses.is_dataclass(hint):  # fast_paths, stream_cache: [models.<name>] tables
            assert set(model_schema[name]["properties"]) == fields(hint), name


def test_values_defaults_are_the_servers_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    server, batching = ServerConfig(), BatchingConfig()
    assert values["ports"] == {"grpc": server.port, "metrics": server.metrics_port}
    assert values["server"] == {k: getattr(server, k) for k in values["server"]}
    assert values["batching"] == dataclasses.asdict(batching)
    assert config_toml(render())["models"] == [{"source": ModelConfig().source, "replicas": 1, "tp": 1,
                                                "cfg_parallel": 1, "num_gpus": 1}]


# ---- the exec probe of a TLS gateway --------------------------------------------------------

@pytest.fixture
def tls_health_server(certs):
    """Starts real gRPC servers with TLS and grpc.health.v1: start(mutual) -> (port, set_serving)."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    started = []

    def start(mutual: bool):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        creds = grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
                                            root_certificates=certs.ca.read_bytes() if mutual else None,
                                            require_client_auth=mutual)
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        started.append(server)

        def set_serving(serving: bool):
            servicer.set("", health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

        set_serving(False)
        return port, set_serving

    yield start
    for s in started:
        s.stop(None)


def secret_dir(path: Path, **files: Path) -> Path:
    path.mkdir()
    for name, source in files.items():
        (path / name.replace("_", ".")).write_bytes(source.read_bytes())
    return path


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE_SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_tls_probe_passes_only_when_serving(tls_health_server, certs, tmp_path):
    port, set_serving = tls_health_server(mutual=False)
    tls = secret_dir(tmp_path / "tls", tls_crt=certs.server_cert, tls_key=certs.server_key, ca_crt=certs.ca)
    args = (f"--port={port}", f"--tls-dir={tls}", "--server-name=localhost", "--timeout=5")
    r = probe(*args)
    assert r.returncode == 1 and "NOT_SERVING" in r.stderr
    set_serving(True)
    assert probe(*args).returncode == 0
    wrong_name = probe(f"--port={port}", f"--tls-dir={tls}", "--server-name=someone.else", "--timeout=5")
    assert wrong_name.returncode == 1 and "UNAVAILABLE" in wrong_name.stderr


def test_tls_probe_presents_a_client_certificate_for_mutual_tls(tls_health_server, certs, tmp_path):
    port, set_serving = tls_health_server(mutual=True)
    set_serving(True)
    tls = secret_dir(tmp_path / "tls", tls_crt=certs.server_cert, tls_key=certs.server_key, ca_crt=certs.ca)
    client = secret_dir(tmp_path / "client", tls_crt=certs.client_cert, tls_key=certs.client_key)
    base = (f"--port={port}", f"--tls-dir={tls}", "--server-name=localhost", "--timeout=5")
    assert probe(*base, f"--client-dir={client}").returncode == 0
    assert probe(*base).returncode == 1  # no client certificate: the handshake fails
