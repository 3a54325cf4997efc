"""The loopback services the rehearsal and the integration tests run against really work."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest


def test_postgres_keeps_rows_across_a_restart(postgres_service):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_service.url, pool_pre_ping=True)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS probe (id int primary key, note text)"))
        connection.execute(sqlalchemy.text("DELETE FROM probe"))
        connection.execute(sqlalchemy.text("INSERT INTO probe VALUES (1, 'before restart')"))
    postgres_service.restart()
    with engine.connect() as connection:
        rows = connection.execute(sqlalchemy.text("SELECT id, note FROM probe")).all()
    engine.dispose()
    assert rows == [(1, "before restart")]


def test_postgres_handle_hides_the_password(postgres_service):
    assert postgres_service.password not in repr(postgres_service)
    assert postgres_service.url.startswith("postgresql+psycopg2://tuneloop:")


def test_redis_answers_set_and_get(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.set("tuneloop:probe", "42")
    assert client.get("tuneloop:probe") == b"42"


def test_s3_round_trips_a_parquet_dataset_through_the_env_endpoint(s3_endpoint):
    import pandas as pd
    import pyarrow.dataset as ds
    import s3fs

    frame = pd.DataFrame({"request_id": ["a", "b", "c"], "hour": [1, 1, 2]})
    frame.to_parquet("s3://tuneloop/probe/data.parquet", index=False)  # endpoint and keys come from env
    table = ds.dataset("tuneloop/probe", filesystem=s3fs.S3FileSystem(), format="parquet").to_table()
    assert sorted(table.column("request_id").to_pylist()) == ["a", "b", "c"]


def test_mlflow_server_stores_runs_in_postgres_and_artifacts_in_s3(mlflow_server, s3_service, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    with mlflow.start_run() as run:
        mlflow.log_metric("f1", 0.9)
        mlflow.log_text("hello", "probe.txt")
    assert any(key.endswith(f"{run.info.run_id}/artifacts/probe.txt") for key in s3_service.keys("tuneloop", "mlflow/"))

    mlflow_server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{mlflow_server.url}/health", timeout=2)
    mlflow_server.start()
    assert MlflowClient(mlflow_server.url).get_run(run.info.run_id).data.metrics == {"f1": 0.9}


def test_webhook_receiver_records_posts_and_refuses_while_down():
    from rehearsal.services import webhook_receiver

    with webhook_receiver() as receiver:
        post = urllib.request.Request(receiver.url, data=b'{"n": 1}', method="POST")
        urllib.request.urlopen(post, timeout=5)
        receiver.stop()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(urllib.request.Request(receiver.url, data=b'{"n": 2}', method="POST"), timeout=2)
        receiver.start()
        urllib.request.urlopen(urllib.request.Request(receiver.url, data=b'{"n": 3}', method="POST"), timeout=5)
        assert [p.json() for p in receiver.posts()] == [{"n": 1}, {"n": 3}]
