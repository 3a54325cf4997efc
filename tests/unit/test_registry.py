"""MLflow registry (real SQLite in tmp): versions, lineage tags, aliases, all-or-nothing."""

import json

import pytest

from tests.conftest import make_config
from tuneloop import mlflow_calls, registry
from tuneloop.artifacts import write_metadata
from tuneloop.errors import RegistryError, ServiceUnavailableError

BLESSED = {"blessed": True, "checks": [{"name": "test_macro_f1", "value": 0.95, "threshold": 0.9, "passed": True}],
           "test_metrics": {"accuracy": 0.97, "macro_f1": 0.95, "rows": 10}}


@pytest.fixture
def compressed_dir(tmp_path):
    directory = tmp_path / "compressed"
    write_metadata(directory, {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "int8",
                               "labels": ["ham", "spam"], "base_model": "tiny", "data_fingerprint": "f00d"})
    (directory / "model.onnx").write_bytes(b"onnx bytes")
    return directory


def test_register_tags_lineage_and_moves_aliases(tmp_path, compressed_dir, tiny_dataset):
    config = make_config(tmp_path)
    assert registry.list_versions(config) == []
    assert registry.alias_version(config, registry.CHAMPION) is None
    first = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-1")
    second = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-2")
    assert (first.version, second.version) == ("1", "2")
    versions = registry.list_versions(config)
    assert [v["version"] for v in versions] == ["2", "1"]
    assert versions[0]["aliases"] == ["challenger", "champion"] and versions[1]["aliases"] == []
    assert versions[0]["metrics"]["macro_f1"] == 0.95
    assert versions[0]["data_fingerprint"] == "f00d" and versions[0]["pipeline_run"] == "run-2"
    champion = registry.download_champion(config, tmp_path / "download")
    assert champion.version == "2"
    assert json.loads((champion.directory / "tuneloop.json").read_text())["precision"] == "int8"


def test_unblessed_model_is_never_registered(tmp_path, compressed_dir, tiny_dataset):
    config = make_config(tmp_path)
    with pytest.raises(RegistryError, match="did not bless"):
        registry.register(config, compressed_dir, {"blessed": False, "checks": []}, tiny_dataset)
    assert registry.list_versions(config) == []


def test_failed_alias_leaves_no_version_behind(tmp_path, compressed_dir, tiny_dataset, monkeypatch):
    config = make_config(tmp_path)
    registry.register(config, compressed_dir, BLESSED, tiny_dataset)
    from mlflow.tracking import MlflowClient

    def refuse(self, name, alias, version):
        raise RuntimeError("alias store offline")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(RegistryError, match="could not set aliases"):
        registry.register(config, compressed_dir, BLESSED, tiny_dataset)
    monkeypatch.undo()
    versions = registry.list_versions(config)
    assert [v["version"] for v in versions] == ["1"] and versions[0]["aliases"] == ["challenger", "champion"]


# --- a retried register completes its own earlier attempt --------------------------------------------


class Killed(BaseException):
    """The pod dies: no ``except Exception`` clean-up runs."""


def _versions_and_runs(config):
    client = registry.client(config)
    versions = client.search_model_versions(f"name = '{config.registry.model_name}'")
    experiment = client.get_experiment_by_name(config.registry.experiment)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return versions, runs


def test_repeat_of_a_pipeline_run_returns_its_version(tmp_path, compressed_dir, tiny_dataset, capsys):
    config = make_config(tmp_path)
    first = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-1",
                              aliases=(registry.CHALLENGER,))
    again = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-1",
                              aliases=(registry.CHALLENGER,))
    assert (again.version, again.run_id) == (first.version, first.run_id)
    assert "created by an earlier attempt of run-1" in capsys.readouterr().out
    versions, runs = _versions_and_runs(config)
    assert [str(v.version) for v in versions] == ["1"] and len(runs) == 1
    other = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-2")
    assert other.version == "2" and other.run_id != first.run_id


def _register_killed_after_create_model_version(config, compressed_dir, tiny_dataset, monkeypatch):
    """Register as ``run-k`` (challenger alias) and die right after MLflow created the version; then
    ``monkeypatch.undo()``."""
    from mlflow.tracking import MlflowClient

    create = MlflowClient.create_model_version

    def create_then_die(self, *args, **kwargs):
        create(self, *args, **kwargs)
        raise Killed()

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_die)
    with pytest.raises(Killed):
        registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-k",
                          aliases=(registry.CHALLENGER,))
    monkeypatch.undo()


def test_killed_after_create_model_version_is_completed_by_the_retry(tmp_path, compressed_dir, tiny_dataset,
                                                                     monkeypatch):
    config = make_config(tmp_path)
    _register_killed_after_create_model_version(config, compressed_dir, tiny_dataset, monkeypatch)
    assert registry.list_versions(config)[0]["aliases"] == []  # the half-finished state the kill left
    result = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-k",
                               aliases=(registry.CHALLENGER,))
    versions = registry.list_versions(config)
    assert [(v["version"], v["aliases"], v["pipeline_run"]) for v in versions] == [("1", ["challenger"], "run-k")]
    assert result.version == "1" and len(_versions_and_runs(config)[1]) == 1


def test_killed_before_the_version_reuses_the_finished_run(tmp_path, compressed_dir, tiny_dataset, monkeypatch):
    from mlflow.tracking import MlflowClient

    config = make_config(tmp_path)

    def die(self, *args, **kwargs):
        raise Killed()

    monkeypatch.setattr(MlflowClient, "create_model_version", die)
    with pytest.raises(Killed):
        registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-k")
    monkeypatch.undo()
    (run,) = _versions_and_runs(config)[1]
    assert run.info.status == "FINISHED"
    result = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-k")
    versions, runs = _versions_and_runs(config)
    assert [str(v.version) for v in versions] == ["1"] and [r.info.run_id for r in runs] == [run.info.run_id]
    assert result.run_id == run.info.run_id and registry.alias_version(config, registry.CHAMPION) == "1"


def test_killed_while_logging_the_run_is_finished_by_the_retry(tmp_path, compressed_dir, tiny_dataset, monkeypatch):
    from mlflow.tracking import MlflowClient

    config = make_config(tmp_path)

    def die(self, *args, **kwargs):
        raise Killed()

    monkeypatch.setattr(MlflowClient, "log_text", die)  # after model and frame, before the gate JSON
    with pytest.raises(Killed):
        registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-k")
    monkeypatch.undo()
    (run,) = _versions_and_runs(config)[1]
    assert run.info.status == "RUNNING" and _versions_and_runs(config)[0] == []
    registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-k")
    versions, runs = _versions_and_runs(config)
    assert [str(v.version) for v in versions] == ["1"] and len(runs) == 1
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["test_macro_f1"] == 0.95
    artifacts = {info.path for info in registry.client(config).list_artifacts(run.info.run_id)}
    assert {"model", "data", "gate.json"} <= artifacts


def test_lost_answer_of_create_model_version_creates_no_second_version(tmp_path, compressed_dir, tiny_dataset,
                                                                      monkeypatch):
    """The server created the version but its answer never arrived: the in-process retry finds it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from mlflow.tracking import MlflowClient

    config = make_config(tmp_path, registry={"retry_wait_s": 0})
    create = MlflowClient.create_model_version
    calls = []

    def create_answer_lost(self, *args, **kwargs):
        calls.append(create(self, *args, **kwargs))
        raise MlflowException("gateway timeout", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "create_model_version", create_answer_lost)
    result = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-lost")
    assert len(calls) == 1 and result.version == "1"
    assert [v["version"] for v in registry.list_versions(config)] == ["1"]


# --- lineage: the training frame lives in the run's artifact store -----------------------------------


def test_dataset_uri_points_into_the_run_artifacts(tmp_path, compressed_dir, tiny_dataset):
    import pandas as pd

    config = make_config(tmp_path)
    result = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-1")
    tags = registry.client(config).get_model_version(config.registry.model_name, result.version).tags
    uri = tags["tuneloop.dataset_uri"]
    assert uri == f"runs:/{result.run_id}/data/dataset.parquet"
    experiment = registry.client(config).get_experiment_by_name(config.registry.experiment)
    assert experiment.artifact_location == (tmp_path / "state" / "mlartifacts").resolve().as_uri()
    tiny_dataset.unlink()  # the pod's copy is gone; the registry's copy is what lineage names
    local = registry.download_artifact(config, uri, tmp_path / "reference", what="the training frame")
    assert len(pd.read_parquet(local)) == 120


def test_missing_artifact_is_a_clear_error(tmp_path, compressed_dir, tiny_dataset):
    config = make_config(tmp_path)
    result = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-1")
    with pytest.raises(RegistryError, match=r"the training frame: nothing is stored at runs:/.*/data/absent"):
        registry.download_artifact(config, f"runs:/{result.run_id}/data/absent.parquet", tmp_path / "x",
                                   what="the training frame")


def test_cluster_refuses_an_experiment_with_a_local_artifact_root(tmp_path, compressed_dir, tiny_dataset):
    local = make_config(tmp_path)
    registry.register(local, compressed_dir, BLESSED, tiny_dataset)  # creates the experiment at file://
    cluster = make_config(tmp_path, world="cluster")
    with pytest.raises(RegistryError, match=r"stores artifacts at file://.*a path on one machine") as refused:
        registry.register(cluster, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-2")
    assert refused.value.field == "registry.experiment"
    assert [v["version"] for v in registry.list_versions(local)] == ["1"]


# --- outages are retried, then raised as ServiceUnavailableError; answers are not retried -------------


def test_outages_and_answers_are_told_apart():
    import requests
    from botocore.exceptions import ClientError, EndpointConnectionError
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST,
                                              TEMPORARILY_UNAVAILABLE)

    def http_error(status):
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    def s3_error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    outage = registry.outage_service
    assert outage(MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE), remote=False) == "mlflow"
    assert outage(MlflowException("refused", error_code=INTERNAL_ERROR), remote=True) == "mlflow"
    assert outage(MlflowException("bug", error_code=INTERNAL_ERROR), remote=False) is None
    assert outage(MlflowException("no", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    assert outage(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)) is None
    assert outage(ConnectionRefusedError()) == "mlflow" and outage(http_error(503)) == "mlflow"
    assert outage(http_error(404)) is None and outage(http_error(429)) == "mlflow"
    assert outage(EndpointConnectionError(endpoint_url="http://s3")) == "object store"
    assert outage(s3_error(503, "SlowDown")) == "object store" and outage(s3_error(404, "NoSuchKey")) is None
    assert outage(ValueError("corrupt")) is None and outage(RegistryError("refused")) is None


def test_call_retries_outages_only(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    config = make_config(tmp_path, registry={"retry_attempts": 3, "retry_wait_s": 0})
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE)
        return "answer"

    assert registry.call(config, "reading", flaky) == "answer" and len(attempts) == 3
    attempts.clear()

    def missing():
        attempts.append(1)
        raise MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException, match="no such model"):
        registry.call(config, "reading", missing)
    assert len(attempts) == 1


def test_retry_after_of_a_throttling_answer_is_honoured():
    from botocore.exceptions import ClientError

    throttled = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {
        "HTTPStatusCode": 503, "HTTPHeaders": {"retry-after": "7"}}}, "PutObject")
    assert mlflow_calls._retry_after_s(throttled) == 7.0
    assert mlflow_calls._retry_after_s(ConnectionRefusedError()) == 0.0


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_registry_is_an_outage_without_credentials(tmp_path, compressed_dir, tiny_dataset,
                                                               monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://tuneloop:s3cret@127.0.0.1:{_closed_port()}")
    config = make_config(tmp_path, registry={"retry_attempts": 2, "retry_wait_s": 0})
    for attempt in (lambda: registry.alias_version(config, registry.CHAMPION),
                    lambda: registry.list_versions(config),
                    lambda: registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="r")):
        with pytest.raises(ServiceUnavailableError) as outage:
            attempt()
        assert outage.value.service == "mlflow" and outage.value.exit_code == 75
        assert "s3cret" not in str(outage.value) and "s3cret" not in str(outage.value.uri)
        assert "127.0.0.1" in str(outage.value)


# --- the same against a real MLflow server (Postgres backend, artifacts proxied to S3) ---------------


@pytest.fixture
def server_config(tmp_path, mlflow_server, s3_endpoint):
    """A config on the shared MLflow server with a model and experiment of its own."""
    import uuid

    suffix = uuid.uuid4().hex[:8]
    return make_config(tmp_path, registry={"tracking_uri": mlflow_server.url, "model_name": f"model-{suffix}",
                                           "experiment": f"experiment-{suffix}", "retry_attempts": 2,
                                           "retry_wait_s": 0})


def test_server_register_killed_after_create_model_version_then_retried(server_config, compressed_dir,
                                                                        tiny_dataset, s3_service, monkeypatch):
    import pandas as pd

    config = server_config
    _register_killed_after_create_model_version(config, compressed_dir, tiny_dataset, monkeypatch)
    result = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-k",
                               aliases=(registry.CHALLENGER,))
    versions = registry.list_versions(config)
    assert [(v["version"], v["aliases"]) for v in versions] == [(result.version, ["challenger"])]
    assert len(_versions_and_runs(config)[1]) == 1
    experiment = registry.client(config).get_experiment_by_name(config.registry.experiment)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's root, not a pod path
    stored = s3_service.keys("tuneloop", "mlflow/")
    assert any(key.endswith(f"{result.run_id}/artifacts/data/dataset.parquet") for key in stored), stored
    tiny_dataset.unlink()
    uri = registry.client(config).get_model_version(config.registry.model_name, result.version).tags[
        "tuneloop.dataset_uri"]
    frame = pd.read_parquet(registry.download_artifact(config, uri, tiny_dataset.parent / "ref", what="frame"))
    assert len(frame) == 120
