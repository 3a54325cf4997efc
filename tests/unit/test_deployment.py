"""Deployment: Kubernetes rollouts against a fake AppsV1Api (success, smoke failure, timeout,
idempotence), champion moves and rollbacks in a real MLflow registry, the local target, the Bento."""

import copy
import os
import shutil
import sys

import pytest
from kubernetes.client import (
    V1Container,
    V1Deployment,
    V1DeploymentCondition,
    V1DeploymentSpec,
    V1DeploymentStatus,
    V1EnvVar,
    V1EnvVarSource,
    V1LabelSelector,
    V1ObjectFieldSelector,
    V1ObjectMeta,
    V1PodSpec,
    V1PodTemplateSpec,
)
from kubernetes.client.exceptions import ApiException

from tests.conftest import make_config
from tuneloop import champions, deployment, registry, serving
from tuneloop.artifacts import write_metadata
from tuneloop.deployment import ANNOTATION, DeploymentError
from tuneloop.errors import RegistryError

BLESSED = {"blessed": True, "checks": [], "test_metrics": {"macro_f1": 0.95}}
SMOKE = [{"text": "WINNER!! call now", "expected_label": "spam"}, {"text": "see you at 3", "expected_label": "ham"}]


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = 0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps += 1
        self.now += seconds


class FakeAppsV1Api:
    """The parts of ``kubernetes.client.AppsV1Api`` a rollout uses, over one in-memory Deployment.

    After a patch that changes the pod template the controller needs one poll to observe the new
    generation and one more to finish, unless the version is in ``stuck`` (its pods never get ready).
    """

    def __init__(self, version="1", *, literal_env=False, replicas=2, stuck=()):
        env_var = (V1EnvVar(name="TUNELOOP_MODEL_VERSION", value=version) if literal_env else
                   V1EnvVar(name="TUNELOOP_MODEL_VERSION", value_from=V1EnvVarSource(
                       field_ref=V1ObjectFieldSelector(field_path=f"metadata.labels['{ANNOTATION}']"))))
        self.deployment = V1Deployment(
            metadata=V1ObjectMeta(name="tuneloop-serving", namespace="tuneloop", generation=3,
                                  annotations={ANNOTATION: version}),
            spec=V1DeploymentSpec(
                replicas=replicas,
                selector=V1LabelSelector(match_labels={"app.kubernetes.io/name": "tuneloop-serving"}),
                template=V1PodTemplateSpec(
                    metadata=V1ObjectMeta(labels={"app.kubernetes.io/name": "tuneloop-serving", ANNOTATION: version},
                                          annotations={ANNOTATION: version}),
                    spec=V1PodSpec(containers=[
                        V1Container(name="sidecar", image="proxy"),
                        V1Container(name="serving", image="tuneloop", env=[env_var]),
                    ]),
                ),
            ),
            status=V1DeploymentStatus(observed_generation=3, replicas=replicas, updated_replicas=replicas,
                                      available_replicas=replicas, ready_replicas=replicas),
        )
        self.stuck = set(stuck)
        self.patches = []
        self._polls = 0
        self.missing = False

    @property
    def live_version(self):
        return self.deployment.spec.template.metadata.labels[ANNOTATION]

    def read_namespaced_deployment(self, name, namespace):
        if self.missing or (name, namespace) != ("tuneloop-serving", "tuneloop"):
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.deployment)

    def patch_namespaced_deployment(self, name, namespace, body):
        self.read_namespaced_deployment(name, namespace)
        self.patches.append(copy.deepcopy(body))
        before = copy.deepcopy(self.deployment.spec.template)
        self.deployment.metadata.annotations.update(body.get("metadata", {}).get("annotations", {}))
        template = body.get("spec", {}).get("template", {})
        self.deployment.spec.template.metadata.labels.update(template.get("metadata", {}).get("labels", {}))
        self.deployment.spec.template.metadata.annotations.update(template.get("metadata", {}).get("annotations", {}))
        for patch in template.get("spec", {}).get("containers", []):
            container = next(c for c in self.deployment.spec.template.spec.containers if c.name == patch["name"])
            for variable in patch.get("env", []):
                for existing in container.env:
                    if existing.name == variable["name"]:
                        existing.value = variable["value"]
        if self.deployment.spec.template != before:
            self.deployment.metadata.generation += 1
            self._polls = 0
        return copy.deepcopy(self.deployment)

    def read_namespaced_deployment_status(self, name, namespace):
        self.read_namespaced_deployment(name, namespace)
        self._polls += 1
        generation, replicas = self.deployment.metadata.generation, self.deployment.spec.replicas
        status = self.deployment.status
        if status.observed_generation != generation:
            if self._polls == 1:
                return copy.deepcopy(self.deployment)  # not observed yet
            status.observed_generation = generation
            if self.live_version in self.stuck:  # one new pod that never becomes available
                status.replicas, status.updated_replicas, status.available_replicas = replicas + 1, 1, replicas
            else:
                status.replicas = status.updated_replicas = status.available_replicas = replicas
        elif self.live_version not in self.stuck:
            status.replicas = status.updated_replicas = status.available_replicas = replicas
        return copy.deepcopy(self.deployment)


class FakeServer:
    """The serving Service: answers with the cluster's live version; ``labels`` maps version -> label
    function of the text (default: the smoke test's expected labels)."""

    def __init__(self, cluster, labels=None):
        self.cluster = cluster
        self.labels = labels or {}
        self.requests = []

    def __call__(self, url, *, json, headers, timeout):
        self.requests.append((url, json, headers))
        version = self.cluster.live_version
        expected = {case["text"]: case["expected_label"] for case in SMOKE}
        label_of = self.labels.get(version, lambda text: expected.get(text, "ham"))
        results = []
        for text in json["texts"]:
            label = label_of(text)
            probabilities = {"ham": 0.9 if label == "ham" else 0.1, "spam": 0.1 if label == "ham" else 0.9}
            results.append({"request_id": "r", "label": label, "confidence": 0.9, "probabilities": probabilities,
                            "model_version": version})
        return 200, results


def make_fake_artifact(directory):
    write_metadata(directory, {"kind": "compressed_model", "runtime": "onnxruntime", "labels": ["ham", "spam"]})
    (directory / "model.onnx").write_bytes(b"not loaded on the kubernetes path")
    return directory


@pytest.fixture
def fake_artifact(tmp_path):
    return make_fake_artifact(tmp_path / "artifact")


def k8s_config(tmp_path, **settings):
    return make_config(tmp_path, deployment={
        "target": "kubernetes", "smoke_tests": SMOKE, "rollout_timeout_s": 30, "poll_interval_s": 1,
        "smoke_timeout_s": 5, "build_bento": False, **settings})


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory):
    """One registry for the Kubernetes tests: versions 1, 2 and 3 (registering is the slow part)."""
    from tests.conftest import make_labelled_frame
    from tuneloop.datasets import assign_split

    root = tmp_path_factory.mktemp("k8s-registry")
    frame = make_labelled_frame(20)
    frame["split"] = [assign_split(i, validation=0.2, test=0.2, salt="t") for i in frame["id"]]
    frame.to_parquet(root / "dataset.parquet", index=False)
    config = k8s_config(root)
    artifact = make_fake_artifact(root / "artifact")
    for _ in range(3):
        registry.register(config, artifact, BLESSED, root / "dataset.parquet", aliases=(registry.CHALLENGER,))
    return config


@pytest.fixture
def cluster_registry(shared_registry):
    """Versions 1 (champion), 2 and 3, no champion history; the fake cluster starts on version 1."""
    config = shared_registry
    mlflow = registry.client(config)
    name = config.registry.model_name
    mlflow.set_registered_model_alias(name, registry.CHAMPION, "1")
    for alias in (deployment.PREVIOUS_CHAMPION,):
        try:
            mlflow.delete_registered_model_alias(name, alias)
        except Exception:
            pass
    try:
        mlflow.delete_registered_model_tag(name, deployment.HISTORY_TAG)
    except Exception:
        pass
    clear_state(config)
    return config


def clear_state(config):
    """Forget the champion history and the deploy outcomes the state database holds for this model."""
    from tuneloop import state_store

    name = config.registry.model_name
    with state_store.transaction(config) as connection:
        for table in (state_store.champion_history, state_store.deploy_outcomes):
            connection.execute(table.delete().where(table.c.model_name == name))


def run_deploy(config, version, cluster, server=None, clock=None, **kwargs):
    clock = clock or FakeClock()
    return deployment.deploy(config, version, apps_api=cluster, http=server or FakeServer(cluster),
                             sleep=clock.sleep, clock=clock, **kwargs)


def champion(config):
    return registry.alias_version(config, registry.CHAMPION)


# --------------------------------------------------------------------------------------------
# Kubernetes target


def test_rollout_success_moves_champion(cluster_registry):
    cluster = FakeAppsV1Api("1")
    server = FakeServer(cluster)
    result = run_deploy(cluster_registry, "2", cluster, server)
    assert result.status == "deployed" and result.previous_version == "1" and not result.rolled_back
    assert cluster.live_version == "2" and len(cluster.patches) == 1
    patch = cluster.patches[0]
    assert patch["metadata"]["annotations"] == {ANNOTATION: "2"}
    assert patch["spec"]["template"]["metadata"] == {"labels": {ANNOTATION: "2"}, "annotations": {ANNOTATION: "2"}}
    assert "spec" not in patch["spec"]["template"]  # the env comes from the pod label (downward API)
    assert [check.passed for check in result.smoke] == [True, True]
    assert server.requests[0][0] == "http://tuneloop-serving.tuneloop.svc.cluster.local/predict"
    assert server.requests[0][1] == {"texts": [case["text"] for case in SMOKE]}
    assert champion(cluster_registry) == "2"
    assert registry.alias_version(cluster_registry, deployment.PREVIOUS_CHAMPION) == "1"
    assert result.champion == "2" and result.previous_champion == "1"


def test_smoke_failure_rolls_back_and_leaves_champion(cluster_registry):
    cluster = FakeAppsV1Api("1")
    server = FakeServer(cluster, labels={"2": lambda text: "ham"})  # version 2 misses the spam text
    with pytest.raises(DeploymentError, match="smoke test failed on version 2.*expected 'spam', got 'ham'") as failure:
        run_deploy(cluster_registry, "2", cluster, server)
    result = failure.value.result
    assert result.status == "failed" and result.rolled_back
    assert "rolled Deployment tuneloop/tuneloop-serving back to version 1" in str(failure.value)
    assert cluster.live_version == "1"
    assert [p["metadata"]["annotations"][ANNOTATION] for p in cluster.patches] == ["2", "1"]
    assert cluster.deployment.metadata.annotations[ANNOTATION] == "1"
    assert champion(cluster_registry) == "1"
    assert registry.alias_version(cluster_registry, deployment.PREVIOUS_CHAMPION) is None


def test_rollout_timeout_rolls_back(cluster_registry):
    cluster = FakeAppsV1Api("1", stuck={"2"})
    clock = FakeClock()
    server = FakeServer(cluster)
    with pytest.raises(DeploymentError, match=r"did not finish within 30s \(1 of 2 replicas updated\)") as failure:
        run_deploy(cluster_registry, "2", cluster, server, clock=clock)
    assert failure.value.result.rolled_back
    assert cluster.live_version == "1" and champion(cluster_registry) == "1"
    assert clock.now >= 30 and not server.requests  # no smoke request to a half-rolled Deployment


def test_progress_deadline_exceeded_fails_fast_and_rolls_back(cluster_registry):
    cluster = FakeAppsV1Api("1", stuck={"2"})
    original = cluster.read_namespaced_deployment_status

    def with_deadline(name, namespace):
        state = original(name, namespace)
        if cluster.live_version == "2" and state.status.observed_generation == state.metadata.generation:
            state.status.conditions = [V1DeploymentCondition(type="Progressing", status="False",
                                                             reason="ProgressDeadlineExceeded",
                                                             message="ReplicaSet has timed out progressing.")]
        return state

    cluster.read_namespaced_deployment_status = with_deadline
    clock = FakeClock()
    with pytest.raises(DeploymentError, match="progress deadline"):
        run_deploy(cluster_registry, "2", cluster, clock=clock)
    assert cluster.live_version == "1" and champion(cluster_registry) == "1" and clock.now < 30


def test_deploying_the_live_champion_does_nothing(cluster_registry):
    cluster = FakeAppsV1Api("1")
    server = FakeServer(cluster)
    built = []
    result = run_deploy(cluster_registry, "1", cluster, server, build=lambda config, version: built.append(version))
    assert result.status == "unchanged" and "already live" in result.message
    assert not cluster.patches and not server.requests and not built
    again = run_deploy(cluster_registry, "2", cluster)
    assert again.status == "deployed"
    twice = run_deploy(cluster_registry, "2", cluster)
    assert twice.status == "unchanged" and len(cluster.patches) == 1


def test_live_but_not_promoted_version_is_smoke_tested_and_promoted_without_a_patch(cluster_registry):
    cluster = FakeAppsV1Api("2")
    result = run_deploy(cluster_registry, "2", cluster)
    assert result.status == "deployed" and not cluster.patches and champion(cluster_registry) == "2"


def test_literal_env_variable_is_patched_too(cluster_registry):
    cluster = FakeAppsV1Api("1", literal_env=True)
    run_deploy(cluster_registry, "2", cluster)
    containers = cluster.patches[0]["spec"]["template"]["spec"]["containers"]
    assert containers == [{"name": "serving", "env": [{"name": "TUNELOOP_MODEL_VERSION", "value": "2"}]}]
    serving_container = cluster.deployment.spec.template.spec.containers[1]
    assert serving_container.env[0].value == "2"


def test_smoke_waits_for_the_new_version_to_answer(cluster_registry):
    cluster = FakeAppsV1Api("1")
    server = FakeServer(cluster)
    answers = iter(["1", "1"])  # the first answers still come from old pods
    original = server.__call__

    def draining(url, **kwargs):
        status, body = original(url, **kwargs)
        version = next(answers, None)
        if version:
            body = [{**item, "model_version": version} for item in body]
        return status, body

    result = run_deploy(cluster_registry, "2", cluster, draining)
    assert result.status == "deployed" and len(server.requests) == 3


def test_unknown_version_and_missing_deployment_are_clear_errors(cluster_registry):
    cluster = FakeAppsV1Api("1")
    with pytest.raises(RegistryError, match="version 5 .* does not exist"):
        run_deploy(cluster_registry, "5", cluster)
    assert not cluster.patches
    cluster.missing = True
    with pytest.raises(DeploymentError, match="Deployment tuneloop/tuneloop-serving does not exist"):
        run_deploy(cluster_registry, "2", cluster)
    assert champion(cluster_registry) == "1"


def test_api_key_is_sent_with_smoke_requests(cluster_registry, monkeypatch):
    monkeypatch.setenv("TUNELOOP_API_KEY", "k8s-key")
    cluster = FakeAppsV1Api("1")
    server = FakeServer(cluster)
    run_deploy(cluster_registry, "2", cluster, server)
    assert server.requests[0][2]["X-API-Key"] == "k8s-key"


def test_promote_rerolls_and_rollback_walks_back(cluster_registry):
    config = cluster_registry
    cluster = FakeAppsV1Api("1")
    clock = FakeClock()
    options = dict(apps_api=cluster, http=FakeServer(cluster), sleep=clock.sleep, clock=clock)
    assert deployment.promote(config, "2", **options).status == "deployed"
    assert deployment.promote(config, "3", **options).status == "deployed"
    assert (cluster.live_version, champion(config)) == ("3", "3")
    back = deployment.rollback(config, **options)
    assert (back.version, cluster.live_version, champion(config)) == ("2", "2", "2")
    assert "rolled back champion 3 -> 2" in back.message
    assert registry.alias_version(config, deployment.PREVIOUS_CHAMPION) == "1"
    back = deployment.rollback(config, **options)
    assert (cluster.live_version, champion(config)) == ("1", "1")
    with pytest.raises(DeploymentError, match="nothing to roll back to"):
        deployment.rollback(config, **options)
    assert (cluster.live_version, champion(config)) == ("1", "1")


def test_failed_rollback_rollout_keeps_the_champion(cluster_registry):
    config = cluster_registry
    cluster = FakeAppsV1Api("1")
    clock = FakeClock()
    run_deploy(config, "2", cluster, clock=clock)
    server = FakeServer(cluster, labels={"1": lambda text: "ham"})  # version 1 now fails its smoke test
    with pytest.raises(DeploymentError, match="smoke test failed on version 1"):
        deployment.rollback(config, apps_api=cluster, http=server, sleep=clock.sleep, clock=clock)
    assert (cluster.live_version, champion(config)) == ("2", "2")


# --------------------------------------------------------------------------------------------
# Deploy outcomes per pipeline run: a KFP retry looks for its own earlier attempt


def test_a_retry_after_a_failed_smoke_test_reports_it_and_does_not_roll_out_again(cluster_registry):
    cluster = FakeAppsV1Api("1")
    server = FakeServer(cluster, labels={"2": lambda text: "ham"})
    with pytest.raises(DeploymentError, match="smoke test failed on version 2"):
        run_deploy(cluster_registry, "2", cluster, server, pipeline_run="training-run-7")
    assert len(cluster.patches) == 2 and len(server.requests) >= 1
    patches, requests = len(cluster.patches), len(server.requests)
    with pytest.raises(DeploymentError, match="pipeline run training-run-7 already tried version 2 and it failed; "
                                              "not rolling it out again: .*smoke test failed") as retried:
        run_deploy(cluster_registry, "2", cluster, FakeServer(cluster), pipeline_run="training-run-7")
    assert (len(cluster.patches), len(server.requests)) == (patches, requests), "nothing rolled out or sent again"
    assert retried.value.result.status == "failed" and retried.value.result.smoke[0].label == "ham"
    assert champion(cluster_registry) == "1"
    # another pipeline run is a new attempt, judged on its own
    assert run_deploy(cluster_registry, "2", cluster, FakeServer(cluster), pipeline_run="training-run-8").status \
        == "deployed"


def test_a_retry_after_success_is_a_no_op_success(cluster_registry):
    cluster = FakeAppsV1Api("1")
    first = run_deploy(cluster_registry, "2", cluster, pipeline_run="training-run-9")
    assert first.status == "deployed" and len(cluster.patches) == 1
    cluster.deployment.metadata.annotations[ANNOTATION] = "1"  # even if the cluster drifted meanwhile
    again = run_deploy(cluster_registry, "2", cluster, pipeline_run="training-run-9")
    assert again.status == "deployed" and "already deployed version 2: nothing to do" in again.message
    assert len(cluster.patches) == 1
    assert deployment.deploy_outcome(cluster_registry, "training-run-9", "2").status == "deployed"
    assert deployment.deploy_outcome(cluster_registry, "training-run-9", "3") is None


def test_an_outage_is_not_recorded_as_an_outcome(cluster_registry):
    cluster = FakeAppsV1Api("1")
    cluster.missing = True  # the Deployment cannot be read: nothing was rolled out, nothing recorded
    with pytest.raises(DeploymentError, match="does not exist"):
        run_deploy(cluster_registry, "2", cluster, pipeline_run="training-run-10")
    assert deployment.deploy_outcome(cluster_registry, "training-run-10", "2") is None


# --------------------------------------------------------------------------------------------
# Champion history: read errors propagate, concurrent writers lose no entry


def test_an_unreadable_history_is_an_error_never_an_empty_history(cluster_registry, monkeypatch):
    import socket

    from tuneloop.errors import ServiceUnavailableError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("TUNELOOP_TEST_STATE_DB", f"postgresql://u:pw@127.0.0.1:{port}/state")
    config = cluster_registry.model_copy(update={"state": cluster_registry.state.model_copy(
        update={"database_url_env": "TUNELOOP_TEST_STATE_DB"})})
    cluster = FakeAppsV1Api("1")
    with pytest.raises(ServiceUnavailableError, match="postgres"):
        deployment.rollback(config, apps_api=cluster, http=FakeServer(cluster))
    with pytest.raises(ServiceUnavailableError):
        champions.history(config)
    assert cluster.patches == [] and champion(cluster_registry) == "1"


@pytest.fixture(params=["sqlite", "postgres"])
def history_config(request, tmp_path, monkeypatch):
    import uuid

    name = f"history-{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        return make_config(tmp_path, registry={"model_name": name})
    monkeypatch.setenv("TUNELOOP_TEST_STATE_DB", request.getfixturevalue("postgres_url"))
    return make_config(tmp_path, registry={"model_name": name}, state={"database_url_env": "TUNELOOP_TEST_STATE_DB"})


def _all_at_once(action, arguments) -> list[Exception]:
    """Call ``action(argument)`` for every argument, each in its own thread and all released together
    by a barrier; return what they raised (for the test to surface)."""
    import threading

    arguments = list(arguments)
    barrier = threading.Barrier(len(arguments))
    failures = []

    def run(argument) -> None:
        barrier.wait()
        try:
            action(argument)
        except Exception as error:  # surfaced by the caller
            failures.append(error)

    threads = [threading.Thread(target=run, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def test_concurrent_history_writers_lose_no_entry(history_config, monkeypatch):
    config = history_config
    monkeypatch.setattr(champions, "_mirror_tag", lambda cfg, history: None)  # no registered model here
    writers, each = 4, 5

    def write(n: int) -> None:
        for k in range(each):
            champions.update_history(config, lambda history, entry=f"{n}.{k}": history + [entry])

    failures = _all_at_once(write, range(writers))
    assert failures == []
    history = champions.history(config)
    assert sorted(history) == sorted(f"{n}.{k}" for n in range(writers) for k in range(each))
    for n in range(writers):  # each writer's entries in its own order
        assert [entry for entry in history if entry.startswith(f"{n}.")] == [f"{n}.{k}" for k in range(each)]


def test_a_stale_compare_and_set_is_refused(history_config):
    from tuneloop import state_store

    config = history_config
    with state_store.transaction(config) as connection:
        assert champions.compare_and_set(connection, config, champions.History([], 0), ["1"])
    seen = champions.read_history(config)
    with state_store.transaction(config) as connection:
        assert champions.compare_and_set(connection, config, seen, ["1", "2"])
        assert not champions.compare_and_set(connection, config, seen, ["1", "3"]), "revision moved on"
    assert champions.history(config) == ["1", "2"]


def test_rollout_state_reads_like_kubectl():
    cluster = FakeAppsV1Api("1")
    state = cluster.read_namespaced_deployment_status("tuneloop-serving", "tuneloop")
    assert deployment.rollout_state(state) == (True, "complete")
    state.status.available_replicas = 1
    assert deployment.rollout_state(state) == (False, "1 of 2 updated replicas available")
    state.status.available_replicas, state.status.replicas = 2, 3
    assert deployment.rollout_state(state) == (False, "1 old replicas pending termination")
    state.metadata.generation = 9
    assert deployment.rollout_state(state)[0] is False


# --------------------------------------------------------------------------------------------
# Local target


@pytest.fixture(scope="module")
def onnx_artifact(tiny_checkpoint, tmp_path_factory):
    from tuneloop.compression import export_onnx
    from tuneloop.runtime import TorchClassifier

    root = tmp_path_factory.mktemp("deployment-model")
    shutil.copytree(tiny_checkpoint, root / "model")
    write_metadata(root / "model", {"kind": "model", "labels": ["ham", "spam"], "max_length": 32})
    torch_model = TorchClassifier(root / "model")
    target = root / "compressed"
    target.mkdir()
    export_onnx(torch_model, target / "model.onnx", opset=17)
    torch_model.tokenizer.save_pretrained(target)
    write_metadata(target, {"kind": "compressed_model", "runtime": "onnxruntime", "labels": ["ham", "spam"],
                            "max_length": 32})
    return target


def test_local_deploy_smoke_tests_in_process_then_moves_champion(tmp_path, onnx_artifact, tiny_dataset):
    from tuneloop.runtime import load_classifier

    texts = ["WINNER!! call now", "see you at 3"]
    predicted = load_classifier(onnx_artifact).predict(texts)
    smoke = [{"text": text, "expected_label": label} for text, label in zip(texts, predicted)]
    config = make_config(tmp_path, deployment={"smoke_tests": smoke})
    registry.register(config, onnx_artifact, BLESSED, tiny_dataset)
    registry.register(config, onnx_artifact, BLESSED, tiny_dataset, aliases=(registry.CHALLENGER,))
    built = []
    result = deployment.deploy(config, "2", build=lambda cfg, version: built.append(version) or f"bento:{version}")
    assert result.status == "deployed" and result.bento == "bento:2" and built == ["2"]
    assert [check.passed for check in result.smoke] == [True, True]
    assert champion(config) == "2"
    assert deployment.deploy(config, "2").status == "unchanged"

    wrong = make_config(tmp_path, deployment={"smoke_tests": [{"text": texts[0], "expected_label": "eggs"}],
                                               "build_bento": False})
    with pytest.raises(DeploymentError, match="expected 'eggs'") as failure:
        deployment.deploy(wrong, "1")
    assert failure.value.result.status == "failed" and champion(config) == "2"


def test_local_deploy_of_a_corrupt_artifact_fails_and_keeps_champion(tmp_path, onnx_artifact, tiny_dataset):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_artifact, broken)
    (broken / "model.onnx").write_bytes(b"garbage")
    config = make_config(tmp_path, deployment={"build_bento": False})
    registry.register(config, onnx_artifact, BLESSED, tiny_dataset)
    registry.register(config, broken, BLESSED, tiny_dataset, aliases=(registry.CHALLENGER,))
    with pytest.raises(DeploymentError, match="not a loadable ONNX model"):
        deployment.deploy(config, "2")
    assert champion(config) == "1"


def test_local_promote_and_rollback_move_aliases(tmp_path, fake_artifact, tiny_dataset):
    config = make_config(tmp_path)
    for _ in range(3):
        registry.register(config, fake_artifact, BLESSED, tiny_dataset, aliases=(registry.CHALLENGER,))
    assert deployment.promote(config, "1").status == "deployed"
    assert deployment.promote(config, "1").status == "unchanged"
    deployment.promote(config, "3")
    assert champion(config) == "3"
    with pytest.raises(RegistryError, match="does not exist"):
        deployment.promote(config, "7")
    assert deployment.rollback(config).version == "1" and champion(config) == "1"
    with pytest.raises(DeploymentError, match="nothing to roll back to"):
        deployment.rollback(config)


def test_concurrent_promotions_lose_no_entry_and_the_champion_is_the_newest(tmp_path, fake_artifact, tiny_dataset):
    config = make_config(tmp_path)
    for _ in range(4):
        registry.register(config, fake_artifact, BLESSED, tiny_dataset, aliases=(registry.CHALLENGER,))
    deployment.promote(config, "1")
    failures = _all_at_once(lambda version: deployment.promote(config, version), ("2", "3", "4"))
    assert failures == []
    history = champions.history(config)
    assert history[0] == "1" and sorted(history[1:]) == ["2", "3", "4"], history
    assert champion(config) == history[-1], "the alias moved in the order the history records"
    assert registry.alias_version(config, deployment.PREVIOUS_CHAMPION) == history[-2]
    assert deployment.rollback(config).version == history[-2]


def test_rollback_after_register_moved_the_champion(tmp_path, fake_artifact, tiny_dataset):
    config = make_config(tmp_path)
    registry.register(config, fake_artifact, BLESSED, tiny_dataset)
    deployment.promote(config, "1")  # recorded in the history
    registry.register(config, fake_artifact, BLESSED, tiny_dataset)  # register moves champion to 2 itself
    assert champion(config) == "2"
    assert deployment.rollback(config).version == "1"


def test_serve_checks_the_model_then_runs_bentoml_serve(tmp_path, onnx_artifact, tiny_dataset, monkeypatch):
    import yaml

    config = make_config(tmp_path)
    config_path = tmp_path / "tuneloop.yaml"
    config_path.write_text(yaml.safe_dump(__import__("json").loads(config.model_dump_json())))
    monkeypatch.delenv(serving.VERSION_ENV, raising=False)
    monkeypatch.delenv(serving.MODEL_DIR_ENV, raising=False)
    calls = []
    monkeypatch.setattr(deployment.server, "run_server", lambda command, env: calls.append((command, env)) or 0)
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        deployment.serve(config_path)
    assert not calls
    registry.register(config, onnx_artifact, BLESSED, tiny_dataset)
    assert deployment.serve(config_path, port=3999) == 0
    command, env = calls[0]
    assert command[-6:] == ["serve", str(deployment.serving_dir()), "--host", "127.0.0.1", "--port", "3999"]
    assert env[serving.CONFIG_ENV] == str(config_path.resolve()) and env[serving.VERSION_ENV] == "1"
    assert (serving.model_cache_dir(config) / "1" / "model.onnx").is_file()  # downloaded once, reused by the server


def test_run_server_returns_the_server_exit_status():
    assert deployment.run_server([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ)) == 3


def test_bento_builds_offline_from_the_bentofile(tmp_path):
    config = make_config(tmp_path)
    tag = deployment.build_bento(config, "3", store_dir=tmp_path / "bentos")
    assert tag.startswith("tuneloop-serving:")
    bento_dir = tmp_path / "bentos" / "tuneloop-serving" / tag.split(":")[1]
    manifest = (bento_dir / "bento.yaml").read_text()
    assert "service: service:TuneloopService" in manifest and "model-version: '3'" in manifest
    assert (bento_dir / "src" / "service.py").is_file()
    assert "/predict" in (bento_dir / "apis" / "openapi.yaml").read_text()
