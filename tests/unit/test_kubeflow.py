"""Kubeflow Pipelines API side: idempotent uploads, latest-version runs and schedules, clean errors.

Everything runs against ``tests/fake_kfp.py``, a loopback fake of the v2beta1 REST API, through the
real ``kfp.Client``; the pipelines are tiny ones compiled here with the real KFP compiler.
"""

import re
import socket
from pathlib import Path

import pytest
from kfp import compiler, dsl
from kfp_server_api.exceptions import ApiException

from tests.fake_kfp import FakeKFP
from tuneloop import kubeflow
from tuneloop.errors import ConfigError, PipelineError

TOKEN = "s3cr3t-t0ken-value"


@dsl.component(base_image="python:3.11-slim")
def echo(message: str) -> str:
    return message


def compile_tiny(directory: Path, greeting: str = "hello", name: str = "tuneloop-tiny") -> Path:
    """Compile a one-step pipeline; a different ``greeting`` default gives different YAML bytes."""

    @dsl.pipeline(name=name)
    def tiny(message: str = greeting, epochs: int = 1):
        echo(message=message)

    path = directory / f"{name}-{greeting}.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return path


@pytest.fixture
def fake():
    with FakeKFP(require_token=TOKEN) as server:
        yield server


@pytest.fixture
def client(fake):
    return kubeflow.connect(fake.url, token=TOKEN)


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch, tmp_path):
    """Tests see no token from the environment and no kfp context file of the machine."""
    for name in (*kubeflow.TOKEN_ENVS, *kubeflow.TOKEN_FILE_ENVS, "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kubeflow.kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-context.json"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# uploads


def test_identical_content_twice_is_one_pipeline_with_one_version(client, fake, tmp_path):
    path = compile_tiny(tmp_path)
    first = kubeflow.upload(client, path)
    second = kubeflow.upload(client, path)
    assert first.created and not second.created
    assert (second.pipeline_id, second.version_id) == (first.pipeline_id, first.version_id)
    assert len(fake.pipelines) == 1 and len(fake.versions) == 1
    assert fake.pipelines[first.pipeline_id]["display_name"] == "tuneloop-tiny"  # from pipelineInfo.name
    assert first.version_name.startswith("tuneloop-tiny-") and len(first.version_name) == len("tuneloop-tiny-") + 12
    assert [c for c in fake.calls if c[1].endswith("upload_version")] == [("POST", "/apis/v2beta1/pipelines/upload_version")]


def test_changed_content_adds_a_second_version(client, fake, tmp_path):
    first = kubeflow.upload(client, compile_tiny(tmp_path, "hello"))
    second = kubeflow.upload(client, compile_tiny(tmp_path, "bonjour"))
    assert second.created and second.pipeline_id == first.pipeline_id
    assert second.version_name != first.version_name
    assert len(fake.pipelines) == 1
    assert [v["name"] for v in fake.versions_of(first.pipeline_id)] == [first.version_name, second.version_name]


def test_upload_under_an_explicit_name(client, fake, tmp_path):
    result = kubeflow.upload(client, compile_tiny(tmp_path), name="sms-spam-training")
    assert fake.pipelines[result.pipeline_id]["name"] == "sms-spam-training"
    assert result.version_name.startswith("sms-spam-training-")


def test_upload_refuses_what_is_not_a_compiled_pipeline(client, fake, tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PipelineError, match="cannot read compiled pipeline"):
        kubeflow.upload(client, missing)
    stray = tmp_path / "stray.yaml"
    stray.write_text("pipelineInfo: {name: x}\nnotAField: 1\n")
    with pytest.raises(PipelineError, match="is not a compiled KFP pipeline.*notAField"):
        kubeflow.upload(client, stray)
    with pytest.raises(PipelineError, match=r"\.yaml or \.yml"):
        kubeflow.upload(client, tmp_path / "pipeline.py")
    assert fake.pipelines == {}


def test_a_namespace_keeps_pipelines_and_experiments_private(fake, tmp_path):
    team = kubeflow.connect(fake.url, token=TOKEN, namespace="team-a")
    uploaded = kubeflow.upload(team, compile_tiny(tmp_path))
    kubeflow.run_latest(team, "tuneloop-tiny", params={})
    assert fake.pipelines[uploaded.pipeline_id]["namespace"] == "team-a"
    assert [e["namespace"] for e in fake.experiments.values()] == ["team-a"]
    shared = kubeflow.connect(fake.url, token=TOKEN)
    with pytest.raises(kubeflow.KubeflowError, match="no pipeline named 'tuneloop-tiny'"):
        kubeflow.run_latest(shared, "tuneloop-tiny", params={})


# runs


def test_run_latest_uses_the_newest_version_and_one_experiment(client, fake, tmp_path):
    kubeflow.upload(client, compile_tiny(tmp_path, "hello"))
    newest = kubeflow.upload(client, compile_tiny(tmp_path, "bonjour"))
    first = kubeflow.run_latest(client, "tuneloop-tiny", params={"message": "hi", "epochs": 3}, run_name="nightly")
    second = kubeflow.run_latest(client, "tuneloop-tiny", params={})
    run = fake.runs[first]
    assert run["pipeline_version_reference"]["pipeline_version_id"] == newest.version_id
    assert run["runtime_config"]["parameters"] == {"message": "hi", "epochs": 3}
    assert run["display_name"] == "nightly"
    assert [e["display_name"] for e in fake.experiments.values()] == ["tuneloop"]
    assert fake.runs[second]["experiment_id"] == run["experiment_id"]


def test_run_of_an_unknown_pipeline_is_a_clean_404(client, fake):
    with pytest.raises(kubeflow.KubeflowError) as caught:
        kubeflow.run_latest(client, "nope", params={})
    assert str(caught.value) == f"no pipeline named 'nope' on {fake.url}"
    assert caught.value.status == 404
    assert fake.runs == {}


# schedules


def test_schedule_twice_with_one_name_keeps_one_recurring_run_and_updates_cron(client, fake, tmp_path):
    kubeflow.upload(client, compile_tiny(tmp_path))
    first = kubeflow.schedule(client, "tuneloop-tiny", cron="0 3 * * 1", name="weekly-retrain", params={"epochs": 2})
    again = kubeflow.schedule(client, "tuneloop-tiny", cron="0 3 * * 1", name="weekly-retrain", params={"epochs": 2})
    assert first.created and (again.recurring_run_id, again.created, again.updated) == (first.recurring_run_id, False, False)
    moved = kubeflow.schedule(client, "tuneloop-tiny", cron="0 0 4 * * *", name="weekly-retrain", params={"epochs": 2})
    assert not moved.created and moved.updated
    assert list(fake.recurring_runs) == [moved.recurring_run_id]
    job = fake.recurring_runs[moved.recurring_run_id]
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"
    assert job["runtime_config"]["parameters"] == {"epochs": 2}
    assert job["mode"] == "ENABLE" and job["no_catchup"] is True


def test_schedule_references_no_version_so_each_trigger_runs_the_latest(client, fake, tmp_path):
    kubeflow.upload(client, compile_tiny(tmp_path, "hello"))
    scheduled = kubeflow.schedule(client, "tuneloop-tiny", cron="@daily", name="daily", params={})
    reference = fake.recurring_runs[scheduled.recurring_run_id]["pipeline_version_reference"]
    assert "pipeline_version_id" not in reference
    newer = kubeflow.upload(client, compile_tiny(tmp_path, "bonjour"))
    run = fake.trigger(scheduled.recurring_run_id)
    assert run["pipeline_version_reference"]["pipeline_version_id"] == newer.version_id


def test_schedule_of_an_unknown_pipeline_is_a_clean_404(client, fake):
    with pytest.raises(kubeflow.KubeflowError, match=r"^no pipeline named 'ghost' on http://127\.0\.0\.1:\d+$"):
        kubeflow.schedule(client, "ghost", cron="0 3 * * *", name="g", params={})
    assert fake.recurring_runs == {}


@pytest.mark.parametrize(
    ("cron", "expected"),
    [("0 3 * * 1", "0 0 3 * * 1"), ("0 0 9 ? * MON-FRI", "0 0 9 ? * MON-FRI"), ("*/15  *  * * *", "0 */15 * * * *"),
     ("@every 6h", "@every 6h")],
)
def test_cron_takes_five_or_six_fields(cron, expected):
    assert kubeflow.normalize_cron(cron) == expected


@pytest.mark.parametrize("cron", ["", "0 3 * *", "61 * * * *", "0 0 24 * * *", "* * * 13 *", "*/0 * * * *", "@sometimes"])
def test_bad_cron_is_a_config_error_naming_the_value(cron, client, fake):
    with pytest.raises(ConfigError, match=re.escape(f"invalid cron expression '{cron}'")):
        kubeflow.schedule(client, "tuneloop-tiny", cron=cron, name="x", params={})
    assert not any(path.endswith("recurringruns") for _, path in fake.calls)


# parameters


def test_parse_params_reads_json_values_else_strings():
    assert kubeflow.parse_params(["epochs=3", "learning_rate=5e-5", "base_model=bert-tiny", "flag=true",
                                  "config_json={\"a\": [1]}", "empty=", "expr=a=b"]) == {
        "epochs": 3, "learning_rate": 5e-5, "base_model": "bert-tiny", "flag": True,
        "config_json": {"a": [1]}, "empty": "", "expr": "a=b"}


@pytest.mark.parametrize(("items", "message"), [(["epochs"], "'epochs' is not of the form name=value"),
                                                (["=3"], "'=3' is not of the form"),
                                                (["a=1", "a=2"], "'a' is given twice")])
def test_parse_params_names_the_malformed_item(items, message):
    with pytest.raises(ConfigError, match=message):
        kubeflow.parse_params(items)


# credentials and errors


def test_wrong_or_missing_token_is_a_clean_401_without_the_token():
    with FakeKFP(require_token=TOKEN, echo_auth=True) as fake:
        for token in ("not-the-token-123", None):
            with pytest.raises(kubeflow.KubeflowError) as caught:
                kubeflow.connect(fake.url, token=token)
            message = str(caught.value)
            assert caught.value.status == 401 and "HTTP 401" in message and "refused the credentials" in message
            assert "\n" not in message and "not-the-token-123" not in message and TOKEN not in message


def test_token_is_masked_even_where_the_server_echoes_it(client, fake, tmp_path):
    fake.require_token, fake.echo_auth, fake.status = TOKEN, True, 500
    with pytest.raises(kubeflow.KubeflowError) as caught:
        kubeflow.upload(client, compile_tiny(tmp_path))
    assert "HTTP 500" in str(caught.value) and "Bearer ***" in str(caught.value) and TOKEN not in str(caught.value)
    fake.status = None
    fake.require_token = "rotated"
    with pytest.raises(kubeflow.KubeflowError) as caught:
        kubeflow.run_latest(client, "tuneloop-tiny", params={})
    assert caught.value.status == 401 and TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value.args)


def test_forbidden_is_a_clean_403():
    with FakeKFP(status=403) as fake:
        with pytest.raises(kubeflow.KubeflowError, match=r"denied access \(HTTP 403\)") as caught:
            kubeflow.connect(fake.url)
    assert caught.value.status == 403


def test_closed_port_is_unreachable_quickly():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(kubeflow.KubeflowError) as caught:
        kubeflow.connect(url, token=TOKEN)
    assert str(caught.value) == f"Kubeflow Pipelines at {url} is unreachable: connection refused"
    assert caught.value.status is None and TOKEN not in str(caught.value)
    assert isinstance(caught.value, PipelineError)


def test_server_gone_after_connecting_is_unreachable(tmp_path):
    with FakeKFP() as fake:
        client = kubeflow.connect(fake.url)
    with pytest.raises(kubeflow.KubeflowError, match="is unreachable: connection refused"):
        kubeflow.upload(client, compile_tiny(tmp_path))


def test_token_from_environment(monkeypatch, fake, tmp_path):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    client = kubeflow.connect(fake.url)
    assert kubeflow.upload(client, compile_tiny(tmp_path)).created


def test_token_file_is_reread_so_a_rotated_token_keeps_working(monkeypatch, fake, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("TUNELOOP_KFP_TOKEN_FILE", str(token_file))
    client = kubeflow.connect(fake.url)
    kubeflow.upload(client, compile_tiny(tmp_path, "hello"))
    fake.require_token = "rotated-token"
    token_file.write_text("rotated-token")
    assert kubeflow.upload(client, compile_tiny(tmp_path, "bonjour")).created


def test_credential_mistakes_are_config_errors(fake, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        kubeflow.connect(fake.url, token=TOKEN, token_file=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match=r"cannot read the Kubeflow Pipelines token file .*/absent"):
        kubeflow.connect(fake.url, token_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="no Kubeflow Pipelines host"):
        kubeflow.connect("")


# the fake keeps the API's contract


def test_fake_upload_endpoint_validates_strictly_and_names_the_first_version_after_the_pipeline(fake, tmp_path):
    sdk = kubeflow.connect(fake.url, token=TOKEN)
    pipeline = sdk.upload_pipeline(str(compile_tiny(tmp_path)), pipeline_name="by-sdk")
    assert [v["name"] for v in fake.versions_of(pipeline.pipeline_id)] == ["by-sdk"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(compile_tiny(tmp_path).read_text() + "\nunknownTopLevelField: 1\n")
    with pytest.raises(ApiException) as caught:
        sdk.upload_pipeline(str(bad), pipeline_name="bad")
    assert caught.value.status == 400 and "unknownTopLevelField" in caught.value.body
    assert sdk.get_pipeline_id("by-sdk") == pipeline.pipeline_id and sdk.get_pipeline_id("bad") is None
