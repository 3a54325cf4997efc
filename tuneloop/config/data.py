"""Config sections of the labelled data: its files and columns, validation thresholds, features and split."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from tuneloop.config.base import StrictModel


class DataConfig(StrictModel):
    """Where the labelled data lives and what its columns are called.

    ``texts`` holds the entity rows (id, event timestamp, text); ``labels`` holds the labels with the
    time each became known. Both are CSV or Parquet files; ``tuneloop init`` writes them.
    """

    texts: str = Field(min_length=1, description="Texts file: a local path (relative to this file) or an "
                       "object-store URI such as s3://bucket/texts.parquet (cluster).")
    labels: str = Field(min_length=1, description="Labels file: a local path or an object-store URI.")
    id_column: str = "id"
    timestamp_column: str = "event_timestamp"
    text_column: str = "text"
    label_column: str = "label"
    classes: list[str] = Field(min_length=2, description="Known label values, in model output order.")

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, classes: list[str]) -> list[str]:
        duplicates = sorted({c for c in classes if classes.count(c) > 1})
        if duplicates:
            raise ValueError(f"label classes must be unique, repeated: {duplicates}")
        return classes


class ValidationConfig(StrictModel):
    """Great Expectations thresholds. Every expectation here is critical: one failure stops the run."""

    min_rows: int = Field(100, ge=1)
    min_rows_per_class: int = Field(10, ge=1)
    min_text_length: int = Field(1, ge=0)
    max_text_length: int | None = Field(None, ge=1, description="Longest text allowed (characters); None: "
                                        "over-long texts are a reported statistic, not a failure.")
    max_empty_text_share: float = Field(0.01, ge=0.0, le=1.0)
    max_near_duplicate_share: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Validation of the trained frame fails when a larger share of its validation and test rows "
                    "have a near-duplicate (normalised text, MinHash) in the train split.")
    near_duplicate_similarity: float = Field(
        0.8, gt=0.0, le=1.0,
        description="Jaccard similarity of character 5-gram sets from which two normalised texts are near-duplicates.")

    @model_validator(mode="after")
    def _length_bounds_ordered(self) -> "ValidationConfig":
        if self.max_text_length is not None and self.min_text_length > self.max_text_length:
            raise ValueError("min_text_length must not exceed max_text_length")
        return self


class SplitConfig(StrictModel):
    """Shares of rows held out, assigned by a stable hash of the entity key."""

    validation: float = Field(0.15, gt=0.0, lt=1.0)
    test: float = Field(0.15, gt=0.0, lt=1.0)
    salt: str = "tuneloop"

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> "SplitConfig":
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test shares must be below 1.0")
        return self


class FeaturesConfig(StrictModel):
    """The Feast feature repository and how the training frame is split."""

    project: str = Field("tuneloop", pattern=r"^[a-z][a-z0-9_]*$")
    ttl_days: int = Field(3650, ge=1, description="How old a text may be and still join a label.")
    registry_url_env: str | None = Field(
        None, description="Env var holding a SQL registry URL (cluster); unset: a file registry in state_dir."
    )
    redis_connection_env: str | None = Field(
        None, description="Env var holding a Redis connection string (cluster); unset: SQLite in state_dir."
    )
    offline_uri: str | None = Field(
        None, description="Where the prepared Feast sources live: a directory or object-store URI every step can "
                          "read (cluster: s3://...); unset: <state_dir>/feature_data.",
    )
    split: SplitConfig = SplitConfig()
