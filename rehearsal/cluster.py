"""The rehearsal's cluster: services, Secrets, the shipped cluster config pointed at them, and set-up.

:func:`bring_up` starts Postgres (databases ``tuneloop`` for shared state, ``feast`` for the Feast
registry, ``mlflow`` for the MLflow backend store), Redis, the S3 store with the buckets the shipped
config names, an MLflow server, the loopback KFP API and a webhook receiver. It writes the rehearsal
config (the shipped ``k8s/base/config/tuneloop.yaml``, with service addresses and a small,
fast training set-up), uploads a slice of the SMS example to object storage, and runs the set-up a
cluster operator runs once, each as its own pod: ``tuneloop features apply`` and compiling and
uploading the training pipeline.
"""

from __future__ import annotations

import contextlib
import secrets as secrets_module
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import yaml

from rehearsal import services
from rehearsal.fake_kfp import FakeKFP
from rehearsal.pods import Cluster, PodResult

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "k8s" / "base" / "config" / "tuneloop.yaml"
EXAMPLE_DATA = REPO / "examples" / "sms_spam" / "data"
BUCKETS = ("tuneloop-data", "tuneloop-predictions", "tuneloop-mlflow")
DATA_PREFIX = "s3://tuneloop-data/rehearsal"
PREDICTION_LOG_URI = "s3://tuneloop-predictions/rehearsal"
MLFLOW_ARTIFACTS = "s3://tuneloop-mlflow/artifacts"
MLFLOW_TOKEN = "rehearsal-mlflow-token"  # the loopback MLflow server has no auth; the Secret must still exist

SERVING_SECRETS = [("tuneloop-mlflow", "token", "MLFLOW_TRACKING_TOKEN"),
                   ("tuneloop-storage", "access-key-id", "AWS_ACCESS_KEY_ID"),
                   ("tuneloop-storage", "secret-access-key", "AWS_SECRET_ACCESS_KEY"),
                   ("tuneloop-state", "database-url", "TUNELOOP_DATABASE_URL"),
                   ("tuneloop-feast", "registry-url", "FEAST_REGISTRY_URL"),
                   ("tuneloop-feast", "redis-connection", "FEAST_REDIS_CONNECTION"),
                   ("tuneloop-serving", "api-key", "TUNELOOP_API_KEY")]
"""The Secrets of the serving Deployment (k8s/base/serving/deployment.yaml)."""

MONITOR_SECRETS = [("tuneloop-mlflow", "token", "MLFLOW_TRACKING_TOKEN"),
                   ("tuneloop-storage", "access-key-id", "AWS_ACCESS_KEY_ID"),
                   ("tuneloop-storage", "secret-access-key", "AWS_SECRET_ACCESS_KEY"),
                   ("tuneloop-alerts", "webhook-url", "TUNELOOP_WEBHOOK_URL"),
                   ("tuneloop-state", "database-url", "TUNELOOP_DATABASE_URL")]
"""The Secrets of the drift-monitor CronJob (k8s/base/monitor/cronjob.yaml)."""


@dataclass
class World:
    """Everything the guarantees need: services, the pod cluster and the config."""

    root: Path
    postgres: services.Postgres
    redis: services.Redis
    s3: services.S3
    mlflow: services.MlflowServer
    kfp: FakeKFP
    webhook: services.WebhookReceiver
    cluster: Cluster
    config_path: Path
    api_key: str

    def secrets_env(self, entries) -> dict[str, str]:
        """``{env var: value}`` for ``(secret, key, env)`` entries."""
        return {env: self.cluster.secrets[(secret, key)] for secret, key, env in entries}

    def config(self):
        from tuneloop.config import load_config

        return load_config(self.config_path)


def rehearsal_config(mlflow_url: str, kfp_url: str, rows: int) -> dict:
    """The shipped cluster config with the rehearsal's addresses and a training set-up that fits in a
    few minutes on two cores (300 rows, 2 short epochs, one int8 candidate). The smoke tests
    are a spam and a ham message of the slice itself: a model trained on 300 rows need not know the
    shipped config's wording."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    texts, labels = sample_data(rows)
    known = texts.merge(labels, on="id")
    config["deployment"]["smoke_tests"] = [
        {"text": known[known.label == label].text.iloc[0], "expected_label": label} for label in ("spam", "ham")
    ]
    config["name"] = "sms-rehearsal"
    config["data"].update(texts=f"{DATA_PREFIX}/sms-spam/texts.parquet", labels=f"{DATA_PREFIX}/sms-spam/labels.parquet")
    config["features"]["offline_uri"] = f"{DATA_PREFIX}/feast"
    config["training"].update(epochs=2, batch_size=16, max_length=64, learning_rate=1e-4,
                              checkpoint_uri=f"{DATA_PREFIX}/checkpoints")
    config["compression"] = {"variants": ["onnx_int8_dynamic"], "max_f1_loss_points": 2.0,
                             "latency_repeats": 1, "latency_rows": 16, "latency_batch_sizes": [8]}
    config["evaluation"]["thresholds"] = {"macro_f1": 0.7}
    config["evaluation"]["max_compression_loss_points"] = 2.0
    # About 45 test rows cannot show non-inferiority at 95% confidence; the rehearsal checks shared
    # state, not the gate's statistics, so it takes the documented small-test-set rule.
    config["evaluation"]["when_undecided"] = "keep_threshold_only"
    config["registry"].update(model_name="sms-rehearsal", experiment="sms-rehearsal", tracking_uri=mlflow_url)
    config["deployment"].update(target="local", build_bento=False, prediction_log_uri=PREDICTION_LOG_URI,
                                log_flush_seconds=1.0, log_flush_records=50)
    config["monitoring"].update(trigger="kubeflow", kubeflow_host=kfp_url, window="24h", min_rows=100,
                                cooldown_hours=24)
    return config


def sample_data(rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A deterministic slice of the SMS example: two thirds ham, one third spam."""
    labels = pd.read_parquet(EXAMPLE_DATA / "labels.parquet")
    spam = rows // 3
    sample = pd.concat([labels[labels.label == "ham"].head(rows - spam), labels[labels.label == "spam"].head(spam)])
    texts = pd.read_parquet(EXAMPLE_DATA / "texts.parquet")
    return texts[texts.id.isin(sample.id)].reset_index(drop=True), sample.reset_index(drop=True)


def upload_data(store: services.S3, rows: int, scratch: Path) -> None:
    """Put the labelled slice where the config says (the data team's bucket)."""
    texts, labels = sample_data(rows)
    client = store.client()
    for name, frame in (("texts", texts), ("labels", labels)):
        local = scratch / f"{name}.parquet"
        frame.to_parquet(local, index=False)
        client.upload_file(str(local), "tuneloop-data", f"rehearsal/sms-spam/{name}.parquet")


@contextlib.contextmanager
def bring_up(root: Path, *, rows: int = 300) -> Iterator[World]:
    """Start every service, write the config and the Secrets, upload the data; stop it all on exit."""
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(services.postgres("tuneloop"))
        rd = stack.enter_context(services.redis(workdir=root))
        store = stack.enter_context(services.s3(BUCKETS, workdir=root))
        feast_url = pg.create_database("feast").replace("+psycopg2://", "+psycopg://")
        tracking = stack.enter_context(services.mlflow_server(pg.create_database("mlflow"), MLFLOW_ARTIFACTS,
                                                              s3_env=store.env, workdir=root))
        kfp = stack.enter_context(FakeKFP())
        webhook = stack.enter_context(services.WebhookReceiver())
        api_key = secrets_module.token_urlsafe(24)
        secret_values = {
            ("tuneloop-mlflow", "token"): MLFLOW_TOKEN,
            ("tuneloop-storage", "access-key-id"): store.env["AWS_ACCESS_KEY_ID"],
            ("tuneloop-storage", "secret-access-key"): store.env["AWS_SECRET_ACCESS_KEY"],
            ("tuneloop-state", "database-url"): pg.url,
            ("tuneloop-feast", "registry-url"): feast_url,
            ("tuneloop-feast", "redis-connection"): rd.connection_string,
            ("tuneloop-alerts", "webhook-url"): webhook.url,
            ("tuneloop-serving", "api-key"): api_key,
        }
        settings = {  # the tuneloop-settings ConfigMap: endpoints, nothing secret
            "AWS_ENDPOINT_URL": store.endpoint,
            "AWS_ENDPOINT_URL_S3": store.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": store.endpoint,
            "AWS_DEFAULT_REGION": services.S3_REGION,
            "AWS_REGION": services.S3_REGION,
            "MLFLOW_TRACKING_URI": tracking.url,
            "KF_PIPELINES_ENDPOINT": kfp.url,
        }
        config_dir = root / "etc" / "tuneloop"
        config_dir.mkdir(parents=True, exist_ok=True)
        config_path = config_dir / "tuneloop.yaml"
        config_path.write_text(yaml.safe_dump(rehearsal_config(tracking.url, kfp.url, rows), sort_keys=False))
        config_path.chmod(0o444)
        upload_data(store, rows, root)
        cluster = Cluster(root=root, settings=settings, secrets=secret_values, config_path=config_path)
        yield World(root, pg, rd, store, tracking, kfp, webhook, cluster, config_path, api_key)


def set_up(world: World) -> list[tuple[str, PodResult]]:
    """The one-time cluster set-up, each step its own pod: Feast apply, compile and upload the pipeline."""
    cluster = world.cluster
    steps = [("tuneloop features apply", cluster.tuneloop("setup-features-apply", "features", "apply", "--config",
                                                          str(world.config_path), step="retrieve_features"))]
    compiled = world.root / "build" / "training.yaml"  # the CI/CD workspace, not a pod's disk
    compiled.parent.mkdir(exist_ok=True)
    compiling = cluster.tuneloop("setup-compile", "compile", "training", "--config", str(world.config_path),
                                 "--output", str(compiled))
    steps.append(("tuneloop compile training", compiling))
    if compiling.returncode == 0:
        steps.append(("tuneloop upload", cluster.tuneloop("setup-upload", "upload", str(compiled), "--host",
                                                           world.kfp.url)))
    return steps
