"""Config sections of serving and rollout: the BentoML server, its limits and prediction log, the smoke tests."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneloop.config.base import StrictModel


class SmokeTestConfig(StrictModel):
    """One known input of the deployment smoke test and the label the served model must give it."""

    text: str = Field(min_length=1)
    expected_label: str = Field(min_length=1)


class DeploymentConfig(StrictModel):
    """Serving (BentoML) and rollout.

    ``target: local`` serves on this machine (``tuneloop serve``); ``kubernetes`` patches the serving
    Deployment to a model version, waits for the rollout, smoke-tests it and rolls back on failure.
    The server loads the champion unless ``model_version`` (or ``$TUNELOOP_MODEL_VERSION``) pins one.
    The API key's value comes from the environment variable named by ``api_key_env``; while that
    variable is unset or empty the API is open. ``prediction_log_uri`` is an fsspec URI (default
    ``<state_dir>/predictions``); a crash loses at most ``log_flush_records`` records or
    ``log_flush_seconds`` of traffic, a clean stop loses nothing.
    """

    target: Literal["local", "kubernetes"] = "local"
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where the model serves: only compressed variants that run there (cpu: ONNX Runtime; "
        "cuda: TensorRT) may be kept, and evaluate and serving get a GPU when it is cuda.",
    )
    model_version: str | None = Field(None, pattern=r"^[0-9]+$")
    port: int = Field(3000, ge=1, le=65535)
    max_text_chars: int = Field(5000, ge=1)
    max_batch_items: int = Field(64, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=256)
    api_key_env: str = Field("TUNELOOP_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    prediction_log_uri: str | None = None
    log_flush_records: int = Field(1000, ge=1)
    log_flush_seconds: float = Field(5.0, gt=0.0)
    log_max_buffered: int = Field(100_000, ge=1)
    smoke_tests: list[SmokeTestConfig] = []
    namespace: str = Field("tuneloop", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    deployment_name: str = Field("tuneloop-serving", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    container: str | None = None
    service_url: str | None = None
    rollout_timeout_s: float = Field(600.0, gt=0.0)
    poll_interval_s: float = Field(2.0, gt=0.0)
    smoke_timeout_s: float = Field(30.0, gt=0.0)
    build_bento: bool = True
