"""The BentoML service, called directly and through its ASGI app (no server): predictions, input
limits (4xx, never 5xx), feedback, API key, start-up errors, the prediction log and its flushes."""

import importlib.util
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import export_tiny_model, make_config
from tuneloop import prediction_log, serving
from tuneloop.artifacts import write_metadata
from tuneloop.errors import ModelError, RegistryError, ServiceUnavailableError
from tuneloop.features import STATISTIC_COLUMNS
from tuneloop.prediction_log import prediction_log_uri, read_feedback, read_predictions
from tuneloop.privacy import log_text_policy
from tuneloop.serving import FeedbackError, PredictRequest, RequestLimits, ServingRuntime

SERVICE_FILE = Path(__file__).resolve().parents[2] / "serving" / "service.py"
LIMITS = {"max_text_chars": 200, "max_batch_items": 8, "max_body_bytes": 4096}
TEXTS = ["WINNER!! Claim your free prize now, call 09061701461", "see you at the library at 3", "ok lar"]


@pytest.fixture(scope="module")
def compressed_dir(tiny_checkpoint, tmp_path_factory):
    """A Compressed Model directory: an ONNX export of the tiny model, its tokenizer, tuneloop.json."""
    return export_tiny_model(tiny_checkpoint, tmp_path_factory.mktemp("serving-model"))


@pytest.fixture(scope="module")
def service_module():
    """serving/service.py, imported by path the way `bentoml serve serving/` loads it."""
    spec = importlib.util.spec_from_file_location("tuneloop_bento_service", SERVICE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def write_config(tmp_path, **deployment):
    config = make_config(tmp_path, deployment={**LIMITS, **deployment})
    path = tmp_path / "tuneloop.yaml"
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    return config, path


@pytest.fixture
def served(tmp_path, monkeypatch, compressed_dir):
    """Environment of a server on the tiny compressed model, labelled version 7; returns the config."""

    def configure(model_dir=compressed_dir, **deployment):
        config, path = write_config(tmp_path, **deployment)
        monkeypatch.setenv(serving.CONFIG_ENV, str(path))
        monkeypatch.setenv(serving.MODEL_DIR_ENV, str(model_dir))
        monkeypatch.setenv(serving.VERSION_ENV, "7")
        monkeypatch.delenv("TUNELOOP_API_KEY", raising=False)
        monkeypatch.delenv(prediction_log.LOG_URI_ENV, raising=False)
        return config

    return configure


def client_for(service_module):
    """A test client on a fresh ASGI app of the service (lifespan runs on ``with``)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from starlette.testclient import TestClient

    BentoMLContainer.metrics_client.set(InProcessMetrics())
    return TestClient(service_module.TuneloopService.to_asgi(), raise_server_exceptions=False)


def _in_process_metrics_class():
    from bentoml._internal.server.metrics.prometheus import PrometheusClient

    class InProcessMetrics(PrometheusClient):
        """BentoML's metrics in a registry of their own per app: in-process there is no arbiter to
        set up Prometheus' multiprocess directory, and a second app would re-register them."""

        def __init__(self) -> None:
            import prometheus_client

            super().__init__(multiproc=False)
            self._registry = prometheus_client.CollectorRegistry()

        def generate_latest(self):
            import prometheus_client

            return prometheus_client.generate_latest(self._registry) + prometheus_client.generate_latest()

    return InProcessMetrics


InProcessMetrics = _in_process_metrics_class()


def assert_predictions(results, count, version="7"):
    assert len(results) == count
    assert len({result["request_id"] for result in results}) == count
    for result in results:
        assert result["model_version"] == version
        assert set(result["probabilities"]) == {"ham", "spam"}
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] in {"ham", "spam"}
        assert result["confidence"] == pytest.approx(max(result["probabilities"].values()))


# --------------------------------------------------------------------------------------------


def test_service_class_predicts_when_called_directly(served, service_module):
    config = served()
    service = service_module.TuneloopService()
    try:
        assert service.__is_ready__()
        predictions = service.predict(TEXTS)
        assert_predictions([p.model_dump() for p in predictions], len(TEXTS))
        assert service.runtime.policy.limits == RequestLimits(**LIMITS)
    finally:
        service.close()
    assert not service.__is_ready__()
    logged = read_predictions(prediction_log_uri(config))
    assert sorted(logged["request_id"]) == sorted(p.request_id for p in predictions)


def test_predict_through_the_asgi_app(served, service_module):
    served()
    with client_for(service_module) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200
        response = client.post("/predict", json={"texts": TEXTS})
        assert response.status_code == 200, response.text
        assert_predictions(response.json(), len(TEXTS))
        single = client.post("/predict", json={"texts": ["hello"]}).json()
        assert_predictions(single, 1)


def test_concurrent_requests_are_batched_and_answered_in_order(served, service_module):
    config = served()
    sent: dict[str, str] = {}
    errors = []

    def call(client, index):
        texts = [f"request {index} text {k} " + "x" * (index % 5) for k in range(1 + index % 3)]
        response = client.post("/predict", json={"texts": texts})
        if response.status_code != 200:
            errors.append(response.text)
            return
        results = response.json()
        assert len(results) == len(texts)
        for text, result in zip(texts, results):
            sent[result["request_id"]] = text

    with client_for(service_module) as client:
        threads = [threading.Thread(target=call, args=(client, i)) for i in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    logged = read_predictions(prediction_log_uri(config)).set_index("request_id")
    assert len(logged) == len(sent)
    for request_id, text in sent.items():  # each answer belongs to the text it was sent for
        assert logged.loc[request_id, "text"] == text


BAD_REQUESTS = [
    ("empty body", b"", 400, "empty request body"),
    ("invalid JSON", b'{"texts": [', 400, "not valid JSON"),
    ("not UTF-8", b"\xff\xfe\x00", 400, "not valid JSON"),
    ("JSON array", b'["a"]', 422, "expected a JSON object"),
    ("JSON null", b"null", 422, "expected a JSON object"),
    ("texts not a list", b'{"texts": "hello"}', 422, "texts"),
    ("text not a string", b'{"texts": ["ok", 3]}', 422, "texts.1"),
    ("null text", b'{"texts": [null]}', 422, "texts.0"),
    ("missing texts", b'{"text": ["a"]}', 422, "texts: Field required"),
    ("unknown field", b'{"texts": ["a"], "extra": 1}', 422, "extra: unknown field"),
    ("empty list", b'{"texts": []}', 422, "list is empty"),
    ("empty string", b'{"texts": ["fine", ""]}', 422, "text 1 is empty"),
    ("whitespace only", b'{"texts": ["   "]}', 422, "text 0 is empty"),
    ("text over limit", json.dumps({"texts": ["a" * 201]}).encode(), 422, "more than the limit of 200"),
    ("too many items", json.dumps({"texts": ["a"] * 9}).encode(), 422, "9 texts in one request"),
    ("body too large", json.dumps({"texts": ["a" * 150] * 30}).encode(), 413, "larger than the limit of 4096"),
]


def test_bad_inputs_get_a_4xx_with_a_reason_never_a_5xx(served, service_module):
    served()
    with client_for(service_module) as client:
        for name, body, status, message in BAD_REQUESTS:
            response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (name, response.status_code, response.text)
            assert message in response.json()["error"], (name, response.json())
        form = client.post("/predict", files={"texts": ("a.txt", b"hello")})
        assert form.status_code == 415
        no_type = client.post("/predict", content=b'{"texts": ["fine"]}', headers={"Content-Type": "text/plain"})
        assert no_type.status_code == 200
        assert client.post("/feedback", json={"request_id": "", "label": "ham"}).status_code == 422
        assert client.post("/feedback", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
        assert client.post("/predict", json={"texts": ["still serving"]}).status_code == 200


def test_body_too_large_without_content_length_is_413(served, service_module):
    served()
    with client_for(service_module) as client:

        def chunks():
            yield b'{"texts": ["'
            for _ in range(10):
                yield b"a" * 1000
            yield b'"]}'

        response = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413


def test_request_model_checks_limits_only_with_a_context():
    PredictRequest.model_validate({"texts": ["a" * 500]})
    with pytest.raises(Exception, match="max_text_chars"):
        PredictRequest.model_validate({"texts": ["a" * 500]}, context={"limits": RequestLimits(max_text_chars=10)})
    with pytest.raises(Exception, match="empty"):
        PredictRequest.model_validate({"texts": [""]})


def test_feedback_for_known_and_unknown_request_ids(served, service_module):
    config = served()
    with client_for(service_module) as client:
        first = client.post("/predict", json={"texts": TEXTS[:2]}).json()
        known = client.post("/feedback", json={"request_id": first[1]["request_id"], "label": "spam"})
        assert known.status_code == 200, known.text
        assert known.json() == {"request_id": first[1]["request_id"], "label": "spam",
                                "predicted_label": first[1]["label"], "model_version": "7", "recorded": True}
        unknown = client.post("/feedback", json={"request_id": "no-such-id", "label": "spam"})
        assert unknown.status_code == 404 and "no-such-id" in unknown.json()["error"]
        wrong_label = client.post("/feedback", json={"request_id": first[0]["request_id"], "label": "eggs"})
        assert wrong_label.status_code == 422 and "eggs" in wrong_label.json()["error"]
    feedback = read_feedback(prediction_log_uri(config))
    assert list(feedback["request_id"]) == [first[1]["request_id"]]
    assert list(feedback["label"]) == ["spam"] and list(feedback["model_version"]) == ["7"]


def test_feedback_finds_ids_in_the_flushed_log_after_a_restart(served, compressed_dir):
    config = served()
    runtime = ServingRuntime(config, version="7", model_dir=compressed_dir)
    request_id = runtime.predict(["remember me"])[0].request_id
    runtime.close()
    restarted = ServingRuntime(config, version="7", model_dir=compressed_dir)
    try:
        assert restarted.record_feedback(request_id, "ham").predicted_label in {"ham", "spam"}
        with pytest.raises(FeedbackError) as missing:
            restarted.record_feedback("never-served", "ham")
        assert missing.value.status == 404
    finally:
        restarted.close()


def test_api_key_when_configured(served, service_module, monkeypatch):
    served()
    monkeypatch.setenv("TUNELOOP_API_KEY", "s3cret")
    with client_for(service_module) as client:
        assert client.post("/predict", json={"texts": ["hi"]}).status_code == 401
        wrong = client.post("/predict", json={"texts": ["hi"]}, headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["error"]
        assert client.post("/feedback", json={"request_id": "x", "label": "ham"}).status_code == 401
        right = client.post("/predict", json={"texts": ["hi"]}, headers={"X-API-Key": "s3cret"})
        assert right.status_code == 200
        assert client.get("/readyz").status_code == 200 and client.get("/metrics").status_code == 200


def test_api_is_open_without_a_key(served, service_module):
    served()
    with client_for(service_module) as client:
        assert client.post("/predict", json={"texts": ["hi"]}, headers={"X-API-Key": "anything"}).status_code == 200


def test_api_key_variable_name_comes_from_config(served, service_module, monkeypatch):
    served(api_key_env="MY_SERVING_KEY")
    monkeypatch.setenv("MY_SERVING_KEY", "k")
    with client_for(service_module) as client:
        assert client.post("/predict", json={"texts": ["hi"]}).status_code == 401
        assert client.post("/predict", json={"texts": ["hi"]}, headers={"X-API-Key": "k"}).status_code == 200


def test_metrics_count_predictions_by_label_and_version(served, service_module):
    served()
    with client_for(service_module) as client:
        results = client.post("/predict", json={"texts": TEXTS}).json()
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    lines = [line for line in metrics.text.splitlines() if line.startswith("tuneloop_predictions_total{")]
    for label in {result["label"] for result in results}:
        assert any(f'label="{label}"' in line and 'model_version="7"' in line for line in lines), lines
    assert "bentoml_service_request_total" in metrics.text


def test_corrupt_model_fails_start_up_with_a_clear_error(served, service_module, compressed_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(compressed_dir, broken)
    (broken / "model.onnx").write_bytes((compressed_dir / "model.onnx").read_bytes()[:2000])
    served(model_dir=broken)
    with pytest.raises(ModelError, match="cannot start: model version 7 is unusable.*model.onnx"):
        service_module.TuneloopService()
    with pytest.raises(ModelError, match="cannot start"):
        with client_for(service_module):
            pass


def test_wrong_labels_in_the_artifact_fail_start_up(served, compressed_dir, tmp_path):
    broken = tmp_path / "three-labels"
    shutil.copytree(compressed_dir, broken)
    write_metadata(broken, {"kind": "compressed_model", "runtime": "onnxruntime", "labels": ["a", "b", "c"]})
    config = served(model_dir=broken)
    with pytest.raises(ModelError, match="outputs 2 logits but tuneloop.json names 3 labels"):
        ServingRuntime(config, version="7", model_dir=broken)


def test_champion_and_pinned_versions_come_from_the_registry(tmp_path, compressed_dir, tiny_dataset, monkeypatch):
    from tuneloop import registry

    monkeypatch.delenv(serving.MODEL_CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    config, _ = write_config(tmp_path)
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        ServingRuntime(config)
    decision = {"blessed": True, "checks": [], "test_metrics": {"macro_f1": 0.9}}
    registry.register(config, compressed_dir, decision, tiny_dataset)
    registry.register(config, compressed_dir, decision, tiny_dataset)
    runtime = ServingRuntime(config)
    try:
        assert runtime.model.version == "2"
        assert runtime.model.directory == serving.model_cache_dir(config) / "2"
        assert runtime.predict(["hi"])[0].model_version == "2"
    finally:
        runtime.close()
    pinned = ServingRuntime(config, version="1")
    pinned.close()
    assert pinned.model.version == "1"
    with pytest.raises(RegistryError, match=r"version 9 of 'tuneloop-model' does not exist.*registered versions: 1, 2"):
        ServingRuntime(config, version="9")
    with pytest.raises(RegistryError, match="not a registry version number"):
        ServingRuntime(config, version="latest")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert serving.fetch_model(config, "1") == ("1", tmp_path / "xdg" / "tuneloop" / "models" / "tuneloop-model" / "1")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # no folder can be made below it, whoever runs the test
    monkeypatch.setenv(serving.MODEL_CACHE_ENV, str(blocked / "cache"))
    with pytest.raises(RegistryError, match="not writable.*TUNELOOP_MODEL_CACHE_DIR"):
        serving.fetch_model(config, "2")


def test_unknown_version_from_the_environment_fails_start_up(tmp_path, monkeypatch, service_module):
    _, path = write_config(tmp_path)
    monkeypatch.setenv(serving.CONFIG_ENV, str(path))
    monkeypatch.delenv(serving.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv(serving.VERSION_ENV, "42")
    with pytest.raises(RegistryError, match="version 42 .* does not exist"):
        service_module.TuneloopService()


def test_relative_paths_resolve_against_the_directory_the_server_was_started_from(tmp_path, monkeypatch):
    # `bentoml serve serving/` runs its workers inside serving/; relative paths must not follow them.
    project = tmp_path / "project"
    project.mkdir()
    raw = {"name": "t", "state_dir": ".state", "data": {"texts": "data/t.parquet", "labels": "data/l.parquet",
                                                      "classes": ["ham", "spam"]},
           "deployment": {"prediction_log_uri": "logs/predictions"}}
    (project / "tuneloop.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # the worker's own directory is elsewhere
    environ = {serving.CONFIG_ENV: "tuneloop.yaml", serving.WORKDIR_ENV: str(project)}
    config = serving.load_serving_config(environ)
    assert config.state_dir == project / ".state"
    assert config.data.texts == str(project / "data" / "t.parquet")
    assert prediction_log_uri(config, environ) == str(project / "logs" / "predictions")
    assert serving.load_serving_config({serving.CONFIG_ENV: "tuneloop.yaml", "PWD": str(project)}).state_dir == \
        project / ".state"


def test_prediction_log_holds_one_record_per_served_text_after_flush(served, service_module):
    config = served(log_flush_seconds=3600, log_flush_records=100_000)
    with client_for(service_module) as client:
        answers = client.post("/predict", json={"texts": TEXTS}).json()
        answers += client.post("/predict", json={"texts": ["one more"]}).json()
        uri = prediction_log_uri(config)
        assert read_predictions(uri).empty  # buffered, not yet flushed
        assert service_module.current_policy() is not None
        import bentoml

        assert bentoml.get_current_service().runtime.flush()
        logged = read_predictions(uri).sort_values("timestamp", kind="stable").reset_index(drop=True)
    assert len(logged) == 4
    assert list(logged["request_id"]) == [answer["request_id"] for answer in answers]
    masked = log_text_policy(config.privacy)  # privacy.prediction_log: mask (the default)
    assert list(logged["text"]) == [masked(text) for text in [*TEXTS, "one more"]]
    assert logged.loc[0, "text"] == "WINNER!! Claim your free prize now, call <PHONE>"
    expected = ["request_id", "timestamp", "model_version", "text", *STATISTIC_COLUMNS,
                "predicted_label", "confidence", "probability_ham", "probability_spam"]
    assert list(logged.columns) == expected
    assert str(logged["timestamp"].dt.tz) == "UTC"
    assert set(logged["model_version"]) == {"7"}
    assert list(logged["predicted_label"]) == [answer["label"] for answer in answers]
    assert logged.loc[0, "has_phone_number"] == 1 and logged.loc[0, "char_count"] == len(TEXTS[0])
    assert (logged["probability_ham"] + logged["probability_spam"]).round(5).eq(1.0).all()


def test_prediction_log_is_flushed_on_shutdown(served, service_module):
    config = served(log_flush_seconds=3600, log_flush_records=100_000)
    uri = prediction_log_uri(config)
    with client_for(service_module) as client:
        for _ in range(3):
            assert client.post("/predict", json={"texts": TEXTS}).status_code == 200
        assert read_predictions(uri).empty
    assert len(read_predictions(uri)) == 3 * len(TEXTS)


def test_prediction_log_flushes_every_n_records(served, compressed_dir):
    config = served(log_flush_seconds=3600, log_flush_records=4)
    runtime = ServingRuntime(config, version="7", model_dir=compressed_dir)
    try:
        runtime.predict(["a", "b", "c"])
        runtime.predict(["d", "e"])
        deadline = time.monotonic() + 10
        while not runtime.log.predictions.files and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(read_predictions(runtime.log_uri)) == 5
    finally:
        runtime.close()


def test_log_uri_can_be_any_fsspec_uri(served, compressed_dir, monkeypatch):
    config = served()
    monkeypatch.setenv(prediction_log.LOG_URI_ENV, "memory://tuneloop-test/predictions")
    runtime = ServingRuntime(config, version="7", model_dir=compressed_dir)
    runtime.predict(["in memory"])
    runtime.close()
    assert runtime.log_uri == "memory://tuneloop-test/predictions"
    assert list(read_predictions(runtime.log_uri)["text"]) == ["in memory"]




# --------------------------------------------------------------------------------------------
# Feedback across replicas


def test_feedback_for_a_request_another_replica_served(served, compressed_dir, tmp_path):
    config = served(log_flush_seconds=3600, log_flush_records=100_000)
    replica_a = ServingRuntime(config, version="7", model_dir=compressed_dir)
    replica_b = ServingRuntime(config, version="7", model_dir=compressed_dir)
    try:
        assert replica_a.log.writer_id != replica_b.log.writer_id
        served_by_a = replica_a.predict(TEXTS)
        with pytest.raises(FeedbackError) as not_yet:  # still in A's buffer: not found *yet*, retry later
            replica_b.record_feedback(served_by_a[0].request_id, "spam")
        assert not_yet.value.status == 404 and "(yet)" in not_yet.value.message
        assert not_yet.value.headers == {"Retry-After": "3600"}
        assert replica_a.flush()
        answer = replica_b.record_feedback(served_by_a[0].request_id, "spam")
        assert answer.predicted_label == served_by_a[0].label and answer.model_version == "7"
        assert replica_b.flush()
    finally:
        replica_a.close()
        replica_b.close()
    feedback = read_feedback(prediction_log_uri(config))
    assert list(feedback["request_id"]) == [served_by_a[0].request_id]
    assert feedback.loc[0, "served_at"] == prediction_log.request_id_time(served_by_a[0].request_id)


def test_feedback_answers_503_while_the_log_store_is_down(served, compressed_dir, monkeypatch):
    config = served()
    runtime = ServingRuntime(config, version="7", model_dir=compressed_dir)

    def store_down(uri, request_id):
        raise ServiceUnavailableError("object store unreachable at s3://logs/p", service="object store")

    monkeypatch.setattr(prediction_log.reader, "find_prediction", store_down)
    try:
        request_id = prediction_log.new_request_id(prediction_log.request_id_time(runtime.predict(["a"])[0].request_id))
        with pytest.raises(FeedbackError) as down:
            runtime.record_feedback(request_id, "ham")
        assert down.value.status == 503 and "object store unreachable" in down.value.message
        assert runtime.predict(["still answering"])[0].label in {"ham", "spam"}
    finally:
        runtime.close()


def test_unknown_feedback_ids_get_404_through_the_api(served, service_module):
    served()
    with client_for(service_module) as client:
        for unknown in ("no-such-id", "20200101T000000000Z-00000000000000000000"):
            response = client.post("/feedback", json={"request_id": unknown, "label": "ham"})
            assert response.status_code == 404 and unknown in response.json()["error"]
            assert "Retry-After" not in response.headers


def test_unreachable_object_store_fails_start_up_naming_it(served, compressed_dir, monkeypatch):
    import s3fs

    from rehearsal.services import free_port

    config = served()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv(prediction_log.LOG_URI_ENV, "s3://tuneloop-logs/sms")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ServiceUnavailableError) as down:
            ServingRuntime(config, version="7", model_dir=compressed_dir)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    message = str(down.value)
    assert "object store unreachable at s3://tuneloop-logs/sms" in message and "\n" not in message
    assert "test-secret" not in message and down.value.service == "object store"
