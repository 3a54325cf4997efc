"""The feature stage: text statistics, point-in-time joins through Feast, splits, online features."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import make_labelled_frame
from tuneloop import features
from tuneloop.config import parse_config, resolve_config_paths
from tuneloop.datasets import SPLITS, assign_split
from tuneloop.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
STATS = list(features.STATISTIC_COLUMNS)
T0 = pd.Timestamp("2024-01-01", tz="UTC")


def make_config(tmp_path: Path, *, texts: str = "texts.parquet", labels: str = "labels.parquet", **sections):
    data = {"texts": texts, "labels": labels, "classes": ["ham", "spam"]}
    data.update(sections.pop("data", {}))
    raw = {"name": "sms-spam", "state_dir": str(tmp_path / "state"), "data": data, **sections}
    return resolve_config_paths(parse_config(raw, source="test"), base_dir=tmp_path)


def write_inputs(tmp_path: Path, frame: pd.DataFrame, *, label_delay=pd.Timedelta(hours=1), extra_texts=None):
    """Texts at the frame's timestamps; each label known ``label_delay`` later."""
    texts = frame[["id", "event_timestamp", "text"]]
    if extra_texts is not None:
        texts = pd.concat([texts, extra_texts], ignore_index=True)
    labels = frame[["id", "event_timestamp", "label"]].copy()
    labels["event_timestamp"] = labels["event_timestamp"] + label_delay
    texts.to_parquet(tmp_path / "texts.parquet", index=False)
    labels.to_parquet(tmp_path / "labels.parquet", index=False)
    return texts, labels


# ------------------------------------------------------------------------------ text statistics


def test_text_statistics_values_on_known_strings():
    texts = pd.Series(
        ["Hello World", "CALL 0906170 now!", "see www.example.com", "", None, "1234 5678", "  "],
        index=[10, 11, 12, 13, 14, 15, 16],
    )
    stats = features.text_statistics(texts)

    assert list(stats.columns) == STATS
    assert list(stats.index) == [10, 11, 12, 13, 14, 15, 16]
    assert stats.dtypes.astype(str).to_dict() == features.STATISTIC_COLUMNS

    hello = stats.loc[10]
    assert (hello.char_count, hello.word_count) == (11, 2)
    assert hello.upper_share == pytest.approx(2 / 11)
    assert (hello.digit_share, hello.punct_share, hello.has_url, hello.has_phone_number) == (0, 0, 0, 0)
    assert hello.mean_word_length == pytest.approx(5.0)

    call = stats.loc[11]
    assert (call.char_count, call.word_count) == (17, 3)
    assert call.digit_share == pytest.approx(7 / 17)
    assert call.upper_share == pytest.approx(4 / 17)
    assert call.punct_share == pytest.approx(1 / 17)
    assert (call.has_phone_number, call.has_url) == (1, 0)
    assert call.mean_word_length == pytest.approx(5.0)

    url = stats.loc[12]
    assert url.has_url == 1
    assert url.punct_share == pytest.approx(2 / 19)

    for empty in (13, 14):  # the empty string and None: zeros, no errors
        assert stats.loc[empty].tolist() == [0] * len(STATS)

    assert stats.loc[15].has_phone_number == 0  # two runs of 4 digits are not a phone number
    assert stats.loc[15].digit_share == pytest.approx(8 / 9)
    assert stats.loc[16].tolist() == [2, 0, 0, 0, 0, 0, 0, 0]


def test_text_statistics_is_deterministic_and_handles_missing_values():
    texts = pd.Series(["Visit https://x.io", float("nan"), pd.NA, 12345])
    first, second = features.text_statistics(texts), features.text_statistics(texts.copy())
    pd.testing.assert_frame_equal(first, second)
    assert first.loc[0, "has_url"] == 1
    assert first.loc[1].sum() == 0 and first.loc[2].sum() == 0
    assert first.loc[3, "has_phone_number"] == 1  # non-strings are read as their str()


# ------------------------------------------------------------------------------ the training set


def test_run_writes_the_dataset_contract(tmp_path, labelled_frame):
    write_inputs(tmp_path, labelled_frame)
    config = make_config(tmp_path)
    target = tmp_path / "outputs" / "dataset"  # a KFP Output[Dataset].path: no suffix, a file

    summary = features.run(config, target)

    assert target.is_file()
    dataset = pd.read_parquet(target)
    assert list(dataset.columns) == ["id", "event_timestamp", "text", "label", *STATS, "split"]
    assert str(dataset["event_timestamp"].dt.tz) == "UTC"
    assert dataset.dtypes[STATS].astype(str).to_dict() == features.STATISTIC_COLUMNS
    assert len(dataset) == len(labelled_frame)
    assert set(dataset["split"]) == set(SPLITS)
    assert summary.rows == {name: int((dataset["split"] == name).sum()) for name in SPLITS}
    assert summary.feature_service == "sms_spam"
    assert summary.dropped_rows == 0
    # the features are exactly the shared implementation's
    expected = features.text_statistics(dataset["text"])
    pd.testing.assert_frame_equal(dataset[STATS], expected)
    # the label time is the row's event_timestamp
    by_id = labelled_frame.set_index("id")["event_timestamp"] + pd.Timedelta(hours=1)
    assert (dataset.set_index("id")["event_timestamp"] == by_id.loc[dataset["id"]]).all()


def test_point_in_time_join_ignores_texts_newer_than_the_label(tmp_path, labelled_frame):
    frame = labelled_frame
    updated = pd.DataFrame(
        {
            "id": ["m00001", "m00002"],
            # after the labels' timestamps (text time + 1h): must not join
            "event_timestamp": [frame.loc[1, "event_timestamp"] + pd.Timedelta(days=2),
                                frame.loc[2, "event_timestamp"] + pd.Timedelta(hours=2)],
            "text": ["UPDATED LATER 1", "UPDATED LATER 2"],
        }
    )
    # a second label for m00003, known after a new text version: joins the new version
    newer = pd.DataFrame(
        {"id": ["m00003"], "event_timestamp": [frame.loc[3, "event_timestamp"] + pd.Timedelta(days=1)],
         "text": ["REVISED BEFORE SECOND LABEL"]}
    )
    write_inputs(tmp_path, frame, extra_texts=pd.concat([updated, newer], ignore_index=True))
    labels = pd.read_parquet(tmp_path / "labels.parquet")
    second_label = pd.DataFrame(
        {"id": ["m00003"], "event_timestamp": [frame.loc[3, "event_timestamp"] + pd.Timedelta(days=3)],
         "label": ["spam"]}
    )
    pd.concat([labels, second_label], ignore_index=True).to_parquet(tmp_path / "labels.parquet", index=False)

    features.run(make_config(tmp_path), tmp_path / "dataset.parquet")
    dataset = pd.read_parquet(tmp_path / "dataset.parquet")

    text_of = dataset.groupby("id")["text"].apply(list)
    assert text_of["m00001"] == [frame.loc[1, "text"]]
    assert text_of["m00002"] == [frame.loc[2, "text"]]
    assert text_of["m00003"] == [frame.loc[3, "text"], "REVISED BEFORE SECOND LABEL"]
    assert not dataset["text"].str.startswith("UPDATED").any()
    assert len(dataset) == len(frame) + 1


def test_labels_without_a_text_in_time_are_dropped(tmp_path, labelled_frame, capsys):
    texts, labels = write_inputs(tmp_path, labelled_frame)
    early = pd.DataFrame({"id": ["m00005"], "event_timestamp": [T0 - pd.Timedelta(days=1)], "label": ["ham"]})
    unknown = pd.DataFrame({"id": ["nobody"], "event_timestamp": [T0 + pd.Timedelta(days=1)], "label": ["ham"]})
    pd.concat([labels, early, unknown], ignore_index=True).to_parquet(tmp_path / "labels.parquet", index=False)

    summary = features.run(make_config(tmp_path), tmp_path / "dataset.parquet")

    assert summary.dropped_rows == 2
    assert summary.total_rows == len(labelled_frame)
    assert "dropped 2" in capsys.readouterr().out


def test_ttl_limits_how_old_a_joined_text_may_be(tmp_path, labelled_frame):
    write_inputs(tmp_path, labelled_frame, label_delay=pd.Timedelta(days=2))
    config = make_config(tmp_path, features={"ttl_days": 1})
    with pytest.raises(DataError, match="no label"):
        features.run(config, tmp_path / "dataset.parquet")


def test_splits_are_stable_when_rows_are_added(tmp_path):
    small, large = make_labelled_frame(120), make_labelled_frame(200)
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    for directory, frame in ((first_dir, small), (second_dir, large)):
        directory.mkdir()
        write_inputs(directory, frame)
        features.run(make_config(directory), directory / "dataset.parquet")
    first = pd.read_parquet(first_dir / "dataset.parquet").set_index("id")["split"]
    second = pd.read_parquet(second_dir / "dataset.parquet").set_index("id")["split"]

    assert len(second) == 200
    pd.testing.assert_series_equal(first, second.loc[first.index])
    split = make_config(tmp_path).features.split
    assert all(
        first[key] == assign_split(key, validation=split.validation, test=split.test, salt=split.salt)
        for key in first.index
    )


def test_multi_class_labels_are_strings(tmp_path, labelled_frame):
    frame = labelled_frame.copy()
    frame["label"] = [index % 3 for index in range(len(frame))]  # integer classes 0, 1, 2
    write_inputs(tmp_path, frame)
    config = make_config(tmp_path, data={"classes": ["0", "1", "2"]})

    features.run(config, tmp_path / "dataset.parquet")
    dataset = pd.read_parquet(tmp_path / "dataset.parquet")

    assert sorted(dataset["label"].unique()) == ["0", "1", "2"]
    assert dataset["label"].map(type).eq(str).all()


def test_csv_texts_are_converted_to_parquet_with_string_ids_and_utc(tmp_path, labelled_frame):
    frame = labelled_frame.copy()
    frame["id"] = range(len(frame))  # integer ids in both files
    texts = frame[["id", "event_timestamp", "text"]].copy()
    texts["event_timestamp"] = texts["event_timestamp"].dt.tz_localize(None)  # naive: read as UTC
    texts.to_csv(tmp_path / "texts.csv", index=False)
    labels = frame[["id", "event_timestamp", "label"]].copy()
    labels["event_timestamp"] += pd.Timedelta(hours=1)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    config = make_config(tmp_path, texts="texts.csv", labels="labels.csv")

    features.run(config, tmp_path / "dataset.parquet")

    converted = pd.read_parquet(config.state_dir / "feature_data" / "sms_spam_texts.parquet")
    assert converted["id"].map(type).eq(str).all()
    assert str(converted["event_timestamp"].dt.tz) == "UTC"
    dataset = pd.read_parquet(tmp_path / "dataset.parquet")
    assert len(dataset) == len(frame)
    assert dataset["id"].map(type).eq(str).all()


def test_labels_without_label_column_fail_naming_it(tmp_path, labelled_frame):
    write_inputs(tmp_path, labelled_frame)
    labelled_frame[["id", "event_timestamp"]].to_parquet(tmp_path / "labels.parquet", index=False)

    with pytest.raises(DataError, match="'label'") as caught:
        features.run(make_config(tmp_path), tmp_path / "dataset.parquet")
    assert caught.value.field == "label"
    assert not (tmp_path / "dataset.parquet").exists()


def test_an_empty_split_fails_naming_it(tmp_path):
    write_inputs(tmp_path, make_labelled_frame(3))
    with pytest.raises(DataError, match="split '(train|validation|test)' is empty") as caught:
        features.run(make_config(tmp_path), tmp_path / "dataset.parquet")
    assert caught.value.field in SPLITS


def test_missing_texts_file_is_a_data_error(tmp_path, labelled_frame):
    write_inputs(tmp_path, labelled_frame)
    (tmp_path / "texts.parquet").unlink()
    with pytest.raises(DataError, match="texts file not found"):
        features.run(make_config(tmp_path), tmp_path / "dataset.parquet")


# ------------------------------------------------------------------------------ the store


def test_open_store_is_idempotent(tmp_path, labelled_frame):
    write_inputs(tmp_path, labelled_frame)
    config = make_config(tmp_path)

    features.open_store(config)
    store = features.open_store(config)

    assert [view.name for view in store.list_feature_views()] == ["sms_spam_texts"]
    assert [view.name for view in store.list_on_demand_feature_views()] == ["text_statistics"]
    assert [service.name for service in store.list_feature_services()] == ["sms_spam"]
    assert store.get_entity("sms_spam_entity").join_key == "id"
    assert (config.state_dir / "feast" / "registry.db").is_file()


def test_online_features_return_the_latest_text_statistics(tmp_path, labelled_frame):
    revised = "URGENT call 0800123456 or visit www.prize.com NOW"
    extra = pd.DataFrame(
        {"id": ["m00004"], "event_timestamp": [T0 + pd.Timedelta(days=30)], "text": [revised]}
    )
    write_inputs(tmp_path, labelled_frame, extra_texts=extra)
    config = make_config(tmp_path)

    features.materialize(config, (T0 + pd.Timedelta(days=10)).to_pydatetime())
    before = features.online_features(config, ["m00004"])
    assert before.loc[0, "text"] == labelled_frame.loc[4, "text"]

    features.materialize(config, (T0 + pd.Timedelta(days=40)).to_pydatetime())
    online = features.online_features(config, ["m00004", "m00007", "unknown"])

    assert list(online["id"]) == ["m00004", "m00007", "unknown"]
    assert online.loc[0, "text"] == revised
    assert online.loc[1, "text"] == labelled_frame.loc[7, "text"]
    assert pd.isna(online.loc[2, "text"])
    expected = features.text_statistics(pd.Series([revised, labelled_frame.loc[7, "text"]]))
    for column in STATS:
        assert online.loc[:1, column].astype(float).tolist() == pytest.approx(
            expected[column].astype(float).tolist()
        ), column
    assert online.loc[0, "has_url"] == 1 and online.loc[0, "has_phone_number"] == 1


def test_online_features_materialise_an_empty_store_first(tmp_path, labelled_frame):
    write_inputs(tmp_path, labelled_frame)
    online = features.online_features(make_config(tmp_path), ["m00002"])
    assert online.loc[0, "text"] == labelled_frame.loc[2, "text"]
    assert online.loc[0, "char_count"] == len(labelled_frame.loc[2, "text"])


# ------------------------------------------------------------------------------ the other faces


def _copy_feature_repo(tmp_path: Path, labelled_frame: pd.DataFrame) -> tuple[Path, Path]:
    """feature_repo/ copied into a throwaway project root, with a config and its data."""
    root = tmp_path / "project"
    repo = root / "feature_repo"
    repo.mkdir(parents=True)
    for name in ("feature_store.yaml", "definitions.py"):
        shutil.copy(REPO_ROOT / "feature_repo" / name, repo / name)
    write_inputs(root, labelled_frame)
    config_file = root / "tuneloop.yaml"
    config_file.write_text(
        yaml.safe_dump({"name": "sms-spam", "data": {"texts": "texts.parquet", "labels": "labels.parquet",
                                                     "classes": ["ham", "spam"]}})
    )
    (root / ".tuneloop" / "feast").mkdir(parents=True)
    return repo, config_file


def test_feature_repo_definitions_come_from_build_definitions(tmp_path, labelled_frame, monkeypatch):
    from feast import Entity, FeatureService, FeatureView, FileSource, OnDemandFeatureView

    repo, config_file = _copy_feature_repo(tmp_path, labelled_frame)
    monkeypatch.setenv("TUNELOOP_CONFIG", str(config_file))
    spec = importlib.util.spec_from_file_location("tuneloop_feature_repo_definitions", repo / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert isinstance(module.entity, Entity) and module.entity.join_key == "id"
    assert isinstance(module.texts_source, FileSource)
    assert isinstance(module.texts_view, FeatureView) and module.texts_view.name == "sms_spam_texts"
    assert isinstance(module.text_statistics_view, OnDemandFeatureView)
    assert isinstance(module.feature_service, FeatureService) and module.feature_service.name == "sms_spam"
    assert module._definitions.texts_path == str(config_file.parent / "texts.parquet")


def test_feast_cli_plans_the_feature_repo(tmp_path, labelled_frame):
    repo, config_file = _copy_feature_repo(tmp_path, labelled_frame)
    feast = Path(sys.executable).parent / "feast"
    if not feast.exists():
        pytest.skip("the feast CLI is not installed next to this Python")
    result = subprocess.run(
        [str(feast), "plan"], cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TUNELOOP_CONFIG": str(config_file)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("entity sms_spam_entity", "feature view sms_spam_texts",
                 "on demand feature view text_statistics", "feature service sms_spam"):
        assert line in result.stdout


def test_component_declares_the_dataset_and_row_counts():
    from components.features import retrieve_features

    spec = retrieve_features.component_spec
    assert spec.outputs["dataset"].type.startswith("system.Dataset")
    assert {name: spec.outputs[name].type for name in ("train_rows", "validation_rows", "test_rows")} == {
        "train_rows": "Integer", "validation_rows": "Integer", "test_rows": "Integer"}
    assert "config_json" in spec.inputs


def test_repeated_labels_keep_the_last_and_an_empty_directory_path_becomes_the_file(tmp_path, labelled_frame):
    _, labels = write_inputs(tmp_path, labelled_frame)
    repeated = labels.iloc[[0]].assign(label="ham")  # m00000 is spam; relabelled at the same time
    pd.concat([labels, repeated], ignore_index=True).to_parquet(tmp_path / "labels.parquet", index=False)
    target = tmp_path / "artifact"
    target.mkdir()

    summary = features.run(make_config(tmp_path), target)

    dataset = pd.read_parquet(target)
    assert target.is_file()
    assert summary.total_rows == len(labelled_frame) and summary.dropped_rows == 0
    assert dataset.set_index("id").loc["m00000", "label"] == "ham"


def test_cluster_flavour_reads_connections_from_env_only(tmp_path, monkeypatch):
    """SQL registry and Redis online store come from env vars named in the config, never the config."""
    from feast.repo_config import load_repo_config

    from tests.conftest import make_config
    from tuneloop.errors import ConfigError
    from tuneloop.features import repo_config

    config = make_config(tmp_path, features={"registry_url_env": "FEAST_REGISTRY_URL",
                                             "redis_connection_env": "FEAST_REDIS_CONNECTION"})
    monkeypatch.delenv("FEAST_REGISTRY_URL", raising=False)
    with pytest.raises(ConfigError, match="FEAST_REGISTRY_URL is not set"):
        repo_config(config)
    monkeypatch.setenv("FEAST_REGISTRY_URL", "postgresql+psycopg://u:p@db:5432/feast")
    monkeypatch.setenv("FEAST_REDIS_CONNECTION", "redis:6379,password=p")
    settings = repo_config(config)
    assert settings.registry.registry_type == "sql"
    assert settings.online_store.type == "redis"
    assert "p@db" not in config.to_json()
    overlay = Path(__file__).resolve().parents[2] / "feature_repo" / "cluster"
    loaded = load_repo_config(overlay, overlay / "feature_store.yaml")
    assert loaded.registry.path == "postgresql+psycopg://u:p@db:5432/feast"
    assert loaded.online_store.connection_string == "redis:6379,password=p"


# ------------------------------------------------------------------------------ set-up and outages


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_features_apply_command_is_idempotent_in_the_local_world(tmp_path, labelled_frame, capsys):
    from click.testing import CliRunner

    from tuneloop.cli import cli

    write_inputs(tmp_path, labelled_frame)
    config_file = tmp_path / "tuneloop.yaml"
    config_file.write_text(yaml.safe_dump({"name": "sms-spam", "state_dir": str(tmp_path / "state"), "data": {
        "texts": "texts.parquet", "labels": "labels.parquet", "classes": ["ham", "spam"]}}))

    first = CliRunner().invoke(cli, ["features", "apply", "--config", str(config_file), "--materialize"])
    second = CliRunner().invoke(cli, ["features", "apply", "--config", str(config_file)])

    assert first.exception is None and second.exception is None, first.output + second.output
    assert f"texts source: {tmp_path / 'texts.parquet'}" in first.output  # ready Parquet: no copy
    assert "feature service sms_spam: create" in first.output and "online store: materialised" in first.output
    assert f"registry {tmp_path / 'state' / 'feast' / 'registry.db'}: unchanged" in second.output


def test_a_local_run_applies_itself_and_says_so(tmp_path, labelled_frame, capsys):
    write_inputs(tmp_path, labelled_frame)
    features.run(make_config(tmp_path), tmp_path / "dataset")
    assert "local world: applied the definitions to the file registry" in capsys.readouterr().out
    features.run(make_config(tmp_path), tmp_path / "dataset")
    assert "applied the definitions" not in capsys.readouterr().out  # nothing left to apply


def test_unreachable_registry_database_names_postgres_without_credentials(tmp_path, labelled_frame, monkeypatch):
    from tuneloop.errors import ServiceUnavailableError

    write_inputs(tmp_path, labelled_frame)
    port = _closed_port()
    monkeypatch.setenv("REGISTRY", f"postgresql+psycopg2://feast:s3cret@127.0.0.1:{port}/feast")
    config = make_config(tmp_path, features={"registry_url_env": "REGISTRY"})
    with pytest.raises(ServiceUnavailableError) as caught:
        features.run(config, tmp_path / "dataset")
    message = str(caught.value)
    assert f"postgres (Feast registry) unreachable at postgresql+psycopg2://***@127.0.0.1:{port}/feast" in message
    assert "s3cret" not in message and "//feast" not in message and "\n" not in message
    assert caught.value.service == "postgres" and caught.value.exit_code == 75
    assert not (tmp_path / "dataset").exists()


def test_unreachable_redis_names_it_without_the_password(tmp_path, labelled_frame, monkeypatch):
    from tuneloop.errors import ServiceUnavailableError

    write_inputs(tmp_path, labelled_frame)
    port = _closed_port()
    monkeypatch.setenv("REDIS", f"redis://:hunter2@127.0.0.1:{port}/0")
    config = make_config(tmp_path, features={"redis_connection_env": "REDIS"})
    with pytest.raises(ServiceUnavailableError) as caught:
        features.apply(config, materialize_until=T0.to_pydatetime())
    assert f"redis (Feast online store) unreachable at 127.0.0.1:{port}" in str(caught.value)
    assert "hunter2" not in str(caught.value) and caught.value.service == "redis"


def test_unreachable_object_store_names_the_uri(tmp_path, monkeypatch):
    from tuneloop.datasets import read_table
    from tuneloop.errors import ServiceUnavailableError

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    with pytest.raises(ServiceUnavailableError, match="object store unreachable while reading texts file "
                                                      "s3://tuneloop/data/texts.parquet") as caught:
        read_table("s3://tuneloop/data/texts.parquet", what="texts file")
    assert caught.value.service == "object store" and "test-secret" not in str(caught.value)


def test_redis_urls_become_feasts_connection_form(tmp_path, monkeypatch):
    config = make_config(tmp_path, features={"redis_connection_env": "REDIS"})
    monkeypatch.setenv("REDIS", "rediss://default:pw@redis.tuneloop:6380/2")
    assert features.store.redis_connection(config) == "redis.tuneloop:6380,db=2,password=pw,ssl=true"
    monkeypatch.setenv("REDIS", "redis.tuneloop:6379,password=pw")
    assert features.store.redis_connection(config) == "redis.tuneloop:6379,password=pw"
    assert features.redact("redis.tuneloop:6379,password=pw") == "redis.tuneloop:6379"


def test_apply_refuses_to_register_a_pod_path_in_a_shared_registry(tmp_path, labelled_frame, monkeypatch):
    from tuneloop.errors import ConfigError

    write_inputs(tmp_path, labelled_frame)
    monkeypatch.setenv("REGISTRY", "postgresql+psycopg2://127.0.0.1:1/feast")
    cluster = make_config(tmp_path, world="cluster", features={"registry_url_env": "REGISTRY"})
    with pytest.raises(ConfigError, match=r"^\[features\] cannot apply features to a shared registry: data\.texts: "
                                          r"'.*texts.parquet' is pod-local") as caught:
        features.apply(cluster)
    assert caught.value.field == "data.texts" and "\n" not in str(caught.value)

    shared = make_config(tmp_path, features={"registry_url_env": "REGISTRY", "offline_uri": "s3://tuneloop/feast"})
    with pytest.raises(ConfigError, match="data.texts: .* is a path on this machine") as caught:
        features.apply(shared)
    assert not (tmp_path / "state" / "feast").exists()  # refused before touching anything
