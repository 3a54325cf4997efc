"""The API's request and response models, the input limits they are checked against, and the feedback error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationInfo, field_validator

from tuneloop.config import TuneloopConfig
from tuneloop.errors import TuneloopError
from tuneloop.serving.environment import STAGE


@dataclass(frozen=True)
class RequestLimits:
    """Input limits of one request, from ``deployment``."""

    max_text_chars: int = 5000
    max_batch_items: int = 64
    max_body_bytes: int = 1_048_576

    @classmethod
    def from_config(cls, config: TuneloopConfig) -> "RequestLimits":
        deployment = config.deployment
        return cls(deployment.max_text_chars, deployment.max_batch_items, deployment.max_body_bytes)


class PredictRequest(BaseModel):
    """``POST /predict``: ``{"texts": ["...", ...]}``, one to ``deployment.max_batch_items`` non-empty
    texts of at most ``deployment.max_text_chars`` characters each."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(min_length=1, description="The texts to classify, one result each.")

    @field_validator("texts")
    @classmethod
    def _within_limits(cls, texts: list[str], info: ValidationInfo) -> list[str]:
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"text {index} is empty (or only whitespace)")
        limits = (info.context or {}).get("limits")
        if limits is not None:
            if len(texts) > limits.max_batch_items:
                raise ValueError(
                    f"{len(texts)} texts in one request, more than the limit of {limits.max_batch_items} "
                    f"(deployment.max_batch_items)"
                )
            for index, text in enumerate(texts):
                if len(text) > limits.max_text_chars:
                    raise ValueError(
                        f"text {index} has {len(text)} characters, more than the limit of "
                        f"{limits.max_text_chars} (deployment.max_text_chars)"
                    )
        return texts


class Prediction(BaseModel):
    """The result for one text."""

    request_id: str = Field(description="Id of this prediction; send it with the true label to /feedback.")
    label: str = Field(description="The most probable label.")
    confidence: float = Field(description="Probability of that label.")
    probabilities: dict[str, float] = Field(description="Probability of every label; they sum to 1.")
    model_version: str = Field(description="Registry version of the model that answered.")


class FeedbackRequest(BaseModel):
    """``POST /feedback``: the true label of an earlier prediction."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=128)
    label: StrictStr = Field(min_length=1, max_length=256)


class FeedbackResponse(BaseModel):
    """What ``/feedback`` recorded."""

    request_id: str
    label: str
    predicted_label: str | None = None
    model_version: str | None = None
    recorded: bool = True


class FeedbackError(TuneloopError):
    """Feedback that cannot be recorded; ``status`` is the HTTP status to answer with, ``retry_after``
    (seconds) the ``Retry-After`` header when trying again later may succeed."""

    def __init__(self, message: str, *, status: int, retry_after: int | None = None, **context: Any) -> None:
        super().__init__(message, stage=STAGE, **context)
        self.status = status
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}
