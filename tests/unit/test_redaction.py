"""The one home of URL credential redaction (tuneloop.redaction) and the callers that use it."""

from __future__ import annotations

import pytest

from tuneloop.redaction import is_secret_parameter, redact_url, redact_urls


@pytest.mark.parametrize("url, expected", [
    ("postgresql://u:p@db:5432/x", "postgresql://***@db:5432/x"),
    ("postgresql+psycopg2://feast:s3cret@127.0.0.1:5432/feast", "postgresql+psycopg2://***@127.0.0.1:5432/feast"),
    ("s3://key:secret@bucket/p", "s3://***@bucket/p"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("rediss://default@redis.tuneloop:6380/2", "rediss://***@redis.tuneloop:6380/2"),
    ("http://admin:p%40ss@[::1]:5000/api", "http://***@[::1]:5000/api"),
    ("http://user:pa@ss@host/x", "http://***@host/x"),
])
def test_a_password_in_the_netloc_is_hidden(url, expected):
    assert redact_url(url) == expected
    assert "secret" not in redact_url(url) and "hunter2" not in redact_url(url) and "s3cret" not in redact_url(url)


@pytest.mark.parametrize("url, expected", [
    ("https://mlflow.example/api?token=abc123", "https://mlflow.example/api?token=***"),
    ("postgresql://h/db?sslmode=require&password=pw", "postgresql://h/db?sslmode=require&password=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=f00&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    ("https://hooks.example/cb?api_key=k&access_token=t#id_token=j",
     "https://hooks.example/cb?api_key=***&access_token=***#id_token=***"),
    ("postgresql://u:p@db/x?sslmode=require&secret=s", "postgresql://***@db/x?sslmode=require&secret=***"),
])
def test_a_token_query_parameter_is_hidden_and_harmless_ones_are_kept(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize("url", [
    "sqlite:////tmp/state.db",
    "sqlite:///relative.db",
    "s3://bucket/p",
    "http://127.0.0.1:5000",
    "postgresql://db:5432/x?sslmode=require",
    "s3://bucket/key@version/file.parquet",
    "file:///abs/path?x=1#frag",
    "https://h/p?token=",
])
def test_a_url_without_credentials_is_unchanged(url):
    assert redact_url(url) == url


@pytest.mark.parametrize("text", [
    "", "tuning.log", "/tmp/tuneloop/state.db", "relative/path.parquet", "127.0.0.1:6379",
    "redis.tuneloop:6379,password=pw", "user:pw@host", "the S3 endpoint",
])
def test_a_string_that_is_not_a_url_is_unchanged(text):
    assert redact_url(text) == text


def test_every_url_inside_a_text_is_redacted():
    text = ("HTTPError: 500 for url http://ops:hunter2@127.0.0.1:5000/api?token=t0k "
            "(retrying s3://k:s@bucket/x, then 'https://h/p')")
    assert redact_urls(text) == ("HTTPError: 500 for url http://***@127.0.0.1:5000/api?token=*** "
                                 "(retrying s3://***@bucket/x, then 'https://h/p')")
    assert redact_urls("no url here: 5 > 3") == "no url here: 5 > 3"


def test_secret_looking_parameter_names():
    for name in ("token", "access_token", "password", "PASSWD", "pwd", "api_key", "apikey", "secret", "sig",
                 "X-Amz-Signature", "X-Amz-Security-Token", "auth", "sessionid", "client%5Fsecret", "user"):
        assert is_secret_parameter(name), name
    for name in ("sslmode", "db", "region", "timeout", "X-Amz-Expires", "version"):
        assert not is_secret_parameter(name), name


def test_every_caller_uses_the_one_redaction(tmp_path):
    from types import SimpleNamespace

    from tuneloop import mlflow_calls
    from tuneloop.features import redact
    from tuneloop.prediction_log import safe_uri

    url = "postgresql://u:p@db:5432/x?token=t"
    assert redact(url) == safe_uri(url) == redact_url(url) == "postgresql://***@db:5432/x?token=***"
    assert mlflow_calls.safe_uri(SimpleNamespace(tracking_uri=url)) == redact_url(url)
    assert mlflow_calls.scrub(f"failed at {url}") == f"failed at {redact_url(url)}"
    assert redact("redis.tuneloop:6379,password=pw") == "redis.tuneloop:6379"  # Feast's Redis form
