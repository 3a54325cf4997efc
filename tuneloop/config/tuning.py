"""Config sections of the Optuna hyperparameter search and its search-space ranges."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.base import StrictModel


class FloatRange(StrictModel):
    """A continuous search range ``[low, high]``, sampled on a log scale when ``log``."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class IntRange(StrictModel):
    """An integer search range ``[low, high]`` (both included)."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low} must be below high {self.high}")
        return self


class SearchSpaceConfig(StrictModel):
    """What the search varies; a field left unset keeps the ``training`` value."""

    learning_rate: FloatRange | None = FloatRange(low=1e-5, high=2e-4, log=True)
    epochs: IntRange | None = None
    batch_size: list[int] | None = None
    warmup_ratio: FloatRange | None = None
    lora_r: list[int] | None = None

    @field_validator("batch_size", "lora_r")
    @classmethod
    def _choices(cls, choices: list[int] | None) -> list[int] | None:
        if choices is not None and (not choices or any(c < 1 for c in choices)):
            raise ValueError(f"choices must be a non-empty list of positive integers, got {choices}")
        return choices


class TuningConfig(StrictModel):
    """Hyperparameter search with Optuna (``tuneloop tune``): TPE sampling, pruning on per-epoch
    validation macro-F1, the study in shared storage so parallel workers cooperate."""

    trials: int = Field(8, ge=1)
    parallelism: int = Field(1, ge=1, description="Trial workers (pipeline ParallelFor) sharing the study.")
    in_pipeline: bool = Field(
        False, description="Compile a search step into the training pipeline (ParallelFor of trial workers, then "
                           "best_parameters) whose best parameters the final finetune trains with.",
    )
    objective: Literal["validation_macro_f1"] = "validation_macro_f1"
    storage: str | None = Field(
        None, description="Optuna storage locally: a SQL URL or a journal file path (*.log); unset: "
                          "sqlite in <state_dir>/tuning.db.",
    )
    storage_url_env: str | None = Field(
        None, description="Env var holding the study's SQL URL (cluster: Postgres); wins over storage."
    )
    study_name: str | None = Field(None, description="Unset: '<project name>-tuning'.")
    pruning: bool = True
    seed: int = 42
    max_train_rows: int | None = Field(None, ge=1, description="Cap on training rows per trial (faster search).")
    search_space: SearchSpaceConfig = SearchSpaceConfig()
