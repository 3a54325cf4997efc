"""Config sections of operations: alert sinks, drift monitoring with its retraining trigger, and the shared state."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneloop.config.base import StrictModel


class AlertsConfig(StrictModel):
    """Where alerts go: a JSONL file (default ``<state_dir>/alerts.jsonl``) and, when the named
    environment variable is set, a Slack-compatible webhook."""

    jsonl: Path | None = None
    webhook_url_env: str = "TUNELOOP_WEBHOOK_URL"


class MonitoringConfig(StrictModel):
    """Drift monitoring of served traffic (``tuneloop monitor``, the monitoring pipeline) and the
    cooldown-guarded retraining it starts.

    The current data is the prediction log of the monitored model version (``deployment.model_version``
    or the champion) over ``window``: a duration (``24h``, ``90m``, ``7d``, ``2w``) or a number of the
    most recent records (``5000``). The reference is that version's own training frame, found through
    its ``tuneloop.dataset_uri`` lineage tag. With fewer than ``min_rows`` current rows the verdict is
    ``insufficient_data``, never drift. Otherwise it is drift when the share of drifted feature columns
    reaches ``drift_share``, when a column of ``critical_columns`` drifts, when the prediction
    distribution drifts (``prediction_drift``), when the macro-F1 on feedback labels falls more
    than ``max_quality_drop_points`` below the version's test macro-F1, or when the embedding signal
    fires (``embedding_drift``: a k-NN domain classifier on the served model's sentence embeddings,
    its threshold calibrated by permutation on the reference to ``embedding_false_alarm_rate``).
    Statistic and prediction columns are aggregated over the whole window by DuckDB
    (``histogram_memory_limit``, ``histogram_threads``); Evidently sees a sample of ``current_max_rows``.

    ``stattest``/``stattest_threshold`` choose Evidently's method for every feature column (None:
    Evidently picks by column type and reference size); the prediction column uses
    ``prediction_method``/``prediction_threshold``. Windows larger than ``current_max_rows`` and
    references larger than ``reference_max_rows`` are sampled down (fixed seed) to bound time and
    memory. ``reference_predictions``: ``labels`` compares the served predictions with the training
    labels (free); ``champion`` with the model's own predictions on the reference texts (computed once
    per version and cached in the state directory).

    ``trigger``: ``local`` runs ``training_pipeline_file`` (the shipped ``training`` pipeline, or a
    pipeline file) through ``kfp.local``; ``kubeflow`` starts
    the latest uploaded version of ``training_pipeline_name`` on ``kubeflow_host`` (empty:
    ``$KF_PIPELINES_ENDPOINT``); ``none`` only alerts. At most one retraining run starts per
    ``cooldown_hours``; the trigger ledger (``ledger: database``) is a table of the shared state
    database (``state``), claimed under a database lock so racing monitors start one run.
    """

    window: str = Field("24h", pattern=r"^\s*[0-9]+\s*[smhdw]?\s*$",
                        description="Duration like 24h/90m/7d, or a count of the latest records like 5000.")
    min_rows: int = Field(200, ge=1)
    drift_share: float = Field(0.5, gt=0.0, le=1.0)
    critical_columns: list[str] = []
    prediction_drift: bool = True
    stattest: Literal[
        "TVD", "anderson", "chisquare", "cramer_von_mises", "ed", "empirical_mmd", "es", "fisher_exact", "g_test",
        "hellinger", "jensenshannon", "kl_div", "ks", "mannw", "psi", "t_test", "wasserstein", "z",
    ] | None = None
    stattest_threshold: float | None = Field(None, gt=0.0)
    prediction_method: Literal["TVD", "chisquare", "g_test", "hellinger", "jensenshannon", "kl_div", "psi", "z"] = (
        "jensenshannon"
    )
    prediction_threshold: float = Field(0.1, gt=0.0)
    text_content_drift: bool = True
    reference_predictions: Literal["labels", "champion"] = "labels"
    reference_max_rows: int = Field(20_000, ge=100)
    current_max_rows: int = Field(20_000, ge=100, description="Bounded sample of the window that Evidently and the "
                                  "embedding signal see; the histogram tier always covers the whole window.")
    histogram_memory_limit: str = Field("1GB", pattern=r"^[0-9]+(\.[0-9]+)?\s*(KB|MB|GB|KiB|MiB|GiB)$",
                                        description="DuckDB memory limit of the whole-window histogram tier.")
    histogram_threads: int | None = Field(None, ge=1, description="DuckDB threads (None: the CPUs this pod may use).")
    embedding_drift: bool = Field(True, description="Domain-classifier drift signal on the served model's sentence "
                                                    "embeddings (a model that cannot embed is an error).")
    embedding_false_alarm_rate: float = Field(
        0.01, gt=0.0, lt=0.5, description="False-alarm rate the embedding threshold is calibrated to (permutations "
                                          "of reference data).")
    embedding_permutations: int = Field(500, ge=20, description="Reference permutations calibrating the threshold.")
    embedding_max_rows: int = Field(1000, ge=50, description="Current and reference texts embedded per check (sampled).")
    embedding_drivers: int = Field(10, ge=1, description="Top n-grams and example texts named as drift drivers.")
    min_feedback_rows: int = Field(30, ge=1)
    max_quality_drop_points: float | None = Field(None, ge=0.0, le=100.0)
    trigger: Literal["none", "local", "kubeflow"] = "local"
    cooldown_hours: float = Field(24.0, ge=0.0)
    ledger: Literal["database"] = Field("database", description="Where the retraining ledger lives: the shared state database.")
    training_pipeline_file: str = Field(
        "training", description="A shipped pipeline's name (training), or the path of a pipeline file."
    )
    training_pipeline_name: str = "tuneloop-training"
    kubeflow_host: str | None = None
    kubeflow_namespace: str | None = None
    kubeflow_experiment: str = "tuneloop"


class StateConfig(StrictModel):
    """Shared operational state: the retraining ledger and its cooldown lock, the alert spool and alert
    log, per-run deploy outcomes and the champion history.

    It lives in one SQL database. ``database_url_env`` names the environment variable holding its
    SQLAlchemy URL (cluster: Postgres, the value from a Kubernetes Secret because it carries
    credentials); unset, it is SQLite at ``<state_dir>/state.db`` (one machine, zero set-up).
    """

    database_url_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Env var holding the shared database URL (cluster); unset: SQLite in state_dir.",
    )
    lock_timeout_s: float = Field(30.0, gt=0.0, description="How long to wait for a shared lock before failing.")
