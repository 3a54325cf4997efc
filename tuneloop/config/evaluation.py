"""Config sections of the promotion gate (thresholds, champion comparison, slices) and the MLflow registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneloop.config.base import StrictModel


class SliceRuleConfig(StrictModel):
    """What one slice (or every slice, ``"*"``) must reach; gated only on slices of at least ``min_rows``."""

    min_macro_f1: float | None = Field(None, ge=0.0, le=1.0, description="The slice's macro-F1 must reach this.")
    max_drop_vs_champion_points: float | None = Field(
        None, ge=0.0, le=100.0, description="Non-inferiority margin of the slice's macro-F1 against the champion's.")


class SlicesConfig(StrictModel):
    """Sliced evaluation: per-slice metrics with counts, and optional per-slice gates.

    Built-in slices come from the shared text statistics (length buckets, has URL, has digits, has a
    phone number); ``columns`` adds one slice per value of any column of the dataset or the texts source.
    """

    builtin: bool = Field(True, description="Slice by the text statistics (length, has_url, has_digits, ...).")
    columns: list[str] = Field([], description="Dataset or texts-source columns: one slice per value.")
    max_values_per_column: int = Field(20, ge=1, description="Most frequent values of a column sliced; the rest "
                                       "are reported together as 'other'.")
    min_rows: int = Field(100, ge=1, description="Slices with fewer test rows are reported, never gated.")
    rules: dict[str, SliceRuleConfig] = Field(
        {}, description="Per-slice gates by slice name (``has_url=yes``), or ``*`` for every slice.")


class EvaluationConfig(StrictModel):
    """The promotion gate. Every comparison is decided on an interval at ``confidence``: a paired
    bootstrap for macro-F1 differences (McNemar for accuracy), so an equal model is not a coin flip.

    Without a champion the first model must beat a TF-IDF + logistic-regression baseline trained on
    the same split (``baseline``); absolute ``thresholds`` are optional. A gate with nothing to decide
    on (no thresholds, no champion comparison, no baseline) does not bless.
    """

    thresholds: dict[Literal["macro_f1", "accuracy"], float] = Field(
        {}, description="Optional absolute minimums of test metrics, decided on their intervals.")
    compare_to_champion: bool = True
    max_drop_vs_champion_points: float = Field(
        1.0, ge=0.0, le=100.0, description="Non-inferiority margin: how many macro-F1 points the challenger may "
        "trail the champion, shown with the configured confidence.")
    max_compression_loss_points: float = Field(1.0, ge=0.0, le=100.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence of every interval, in (0.5, 1).")
    when_undecided: Literal["reject", "keep_threshold_only"] = Field(
        "reject", description="A check the test set is too small to decide: reject, or decide it on its point "
        "value against its threshold (the rule without uncertainty).")
    bootstrap_resamples: int = Field(2000, ge=200, le=100_000, description="Paired bootstrap resamples.")
    seed: int = Field(0, description="Seed of the bootstrap, so a decision can be repeated exactly.")
    baseline: bool = Field(True, description="Without a champion, require beating TF-IDF + logistic regression.")
    baseline_margin_points: float = Field(
        0.0, ge=-100.0, le=100.0, description="Macro-F1 points by which the first model must beat the baseline.")
    calibration: bool = Field(True, description="Fit temperature scaling on the validation split; every runtime "
                              "applies it, so served confidence means what it says.")
    calibration_bins: int = Field(15, ge=2, le=100, description="Bins of the expected calibration error.")
    slices: SlicesConfig = SlicesConfig()

    @field_validator("thresholds")
    @classmethod
    def _thresholds_are_shares(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for name, value in thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold {name}={value} must lie in [0, 1]")
        return thresholds


class RegistryConfig(StrictModel):
    """MLflow model registry. ``tracking_uri`` defaults to SQLite inside the state directory.
    Credentials (``MLFLOW_TRACKING_TOKEN`` and friends) come from the environment only."""

    model_name: str = Field("tuneloop-model", min_length=1)
    experiment: str = "tuneloop"
    tracking_uri: str | None = None
    retry_attempts: int = Field(4, ge=1, le=20)
    """Tries of one registry call on an outage (connection error, timeout, 429, 5xx) before the step fails."""
    retry_wait_s: float = Field(1.0, ge=0.0, le=60.0)
    """First wait between tries; doubles each try (a server's Retry-After wins when longer)."""
    request_timeout_s: float = Field(30.0, gt=0.0, le=600.0)
    """Timeout of one HTTP request to the tracking server."""
