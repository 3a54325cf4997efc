"""Drift monitoring of served traffic, and the loop around it (``tuneloop monitor``).

Modules by responsibility: :mod:`.window` (window specs), :mod:`.scan` (the window streamed through
DuckDB), :mod:`.histograms` (whole-window drift per column), :mod:`.reference`, :mod:`.drift`
(Evidently on the sample), :mod:`.embeddings` (the served model's sentence embeddings),
:mod:`.decision`, :mod:`.report`, :mod:`.check` (one check) and :mod:`.loop` (trigger and alert).

**Current data** is the prediction log the serving replicas write (:mod:`tuneloop.prediction_log`: a
Hive-partitioned Parquet dataset under ``deployment.prediction_log_uri``, shared by all replicas) over
a window: a duration back from now (``24h``, ``90m``, ``7d``) or the most recent N records (``5000``).
Only the ``date=/hour=`` partitions of the window are listed (newest first for a record count);
DuckDB scans the files streamed (:mod:`.scan`): the whole window is counted and aggregated, never
loaded, and a bounded sample is drawn for Evidently and the embeddings. A file that cannot be read
(corrupt, truncated, missing a column) is skipped and named in the report; the rest is used. An
unreachable store is an error to retry (exit 75), never "insufficient data".

**Model versions.** Only records of the *monitored version* are analysed: ``deployment.model_version``
when the server is pinned to one, else the ``champion``. Records of every other version (the previous
champion's traffic just after a promotion, a canary) are filtered out, counted per version and named in
the report: their predictions come from another model, so comparing them with this version's
reference would blame this model for another's behaviour. A count window counts monitored records only.

**Reference** is the monitored version's own training frame: the ``tuneloop.dataset_uri`` lineage tag
of the registry version, downloaded with ``mlflow.artifacts.download_artifacts`` once and cached under
``<state_dir>/monitoring/reference/``. All its rows (every split) are used, sampled down to
``monitoring.reference_max_rows`` (fixed seed); Evidently sees a reservoir sample of at most
``monitoring.current_max_rows`` records of the window, the histogram tier the whole window.
The reference *predictions* are, by ``monitoring.reference_predictions``:

- ``labels`` (default): the frame's labels. Free and always there; the served predictions then differ
  from them by the model's error rate only, far below the prediction-drift threshold.
- ``champion``: the monitored model's own predictions on the reference texts, computed once per
  version with the serving runtime and cached. Exact, at the price of one pass over the reference.

**The Evidently report** (``Report`` with ``DataDriftPreset``, tests included) covers: the text-statistics
features (:data:`tuneloop.features.STATISTIC_COLUMNS`, recomputed from the text wherever missing),
two descriptors of the raw text (``NonLetterCharacterPercentage``, ``SentenceCount``), the raw text
itself (Evidently's domain-classifier text drift, ``monitoring.text_content_drift``) and the predicted
label. With at least ``monitoring.min_feedback_rows`` feedback labels for the window's records, a
``ClassificationPreset`` on them is added (accuracy, macro-F1, against the version's test metrics).

**Whole window and embeddings.** Statistic and prediction columns are also scored over the whole
window (JS, PSI, Wasserstein on Evidently's bins, :mod:`.histograms`) and decided there when their
Evidently method is one of those; the served model's sentence embeddings give a domain-classifier
signal calibrated to ``monitoring.embedding_false_alarm_rate`` (:mod:`.embeddings`).

**Verdict**: ``insufficient_data`` with fewer than ``monitoring.min_rows`` records (or no log, an empty
window, no champion): never ``drift``. Else by the rule of :mod:`.decision`: ``drift`` when the share
of drifted feature columns reaches ``monitoring.drift_share``, a critical column drifts, the
prediction distribution drifts, feedback macro-F1 drops beyond its limit, or the embedding signal
fires. Else ``no_drift``.

**Outputs**: a self-contained HTML report (our summary on top of Evidently's) and a JSON summary
(verdict, reasons, per-column scores, windows, files read/skipped, versions filtered, Evidently's own
results under ``evidently``). :func:`monitor` adds the retraining run and the alert it caused.

**Exit codes** of :func:`monitor` (``tuneloop monitor``): ``0`` no drift, ``10`` drift detected,
``11`` insufficient data, ``12`` an alert could not be delivered and waits in the spool (whatever the
verdict; the verdict line says which), and a :class:`~tuneloop.errors.TuneloopError`'s own code for
an error (a failed retraining trigger: 7). The last line printed is always the verdict when one was
reached: ``verdict: no drift``, ``verdict: drift detected`` or ``verdict: insufficient data``.
"""

from tuneloop.monitoring.check import (  # noqa: F401
    check_drift,
)
from tuneloop.monitoring.common import (  # noqa: F401
    ALERT_COLUMNS,
    ALERT_KIND,
    CATEGORICAL_STATISTICS,
    DESCRIPTOR_COLUMNS,
    DRIFT,
    EXIT_ALERT_SPOOLED,
    EXIT_CODES,
    EXIT_DRIFT,
    EXIT_INSUFFICIENT_DATA,
    EXIT_NO_DRIFT,
    INSUFFICIENT_DATA,
    LOG_COLUMNS,
    NO_DRIFT,
    NUMERICAL_STATISTICS,
    REFERENCE_SEED,
    STAGE,
    TEXT_METHOD,
    VERDICT_LINES,
    MonitoringError,
)
from tuneloop.monitoring.decision import (  # noqa: F401
    decide,
    known_columns,
)
from tuneloop.monitoring.drift import (  # noqa: F401
    feedback_quality,
    read_feedback_for,
    run_drift_report,
)
from tuneloop.monitoring.loop import (  # noqa: F401
    MonitorOutcome,
    drift_alert,
    monitor,
    send_drift_alert,
)
from tuneloop.monitoring.reference import (  # noqa: F401
    Reference,
    champion_predictions,
    load_reference,
    monitored_version,
    prepare_reference,
    reference_cache_dir,
)
from tuneloop.monitoring.report import (  # noqa: F401
    DriftReport,
    read_report,
    render_html,
    reports_dir,
    write_json,
)
from tuneloop.monitoring.scan import (  # noqa: F401
    CurrentData,
    scan_window,
)
from tuneloop.monitoring.window import (  # noqa: F401
    Window,
    parse_window,
    with_statistics,
)

__all__ = [
    "ALERT_COLUMNS",
    "ALERT_KIND",
    "CATEGORICAL_STATISTICS",
    "CurrentData",
    "DESCRIPTOR_COLUMNS",
    "DRIFT",
    "DriftReport",
    "EXIT_ALERT_SPOOLED",
    "EXIT_CODES",
    "EXIT_DRIFT",
    "EXIT_INSUFFICIENT_DATA",
    "EXIT_NO_DRIFT",
    "INSUFFICIENT_DATA",
    "LOG_COLUMNS",
    "MonitorOutcome",
    "MonitoringError",
    "NO_DRIFT",
    "NUMERICAL_STATISTICS",
    "REFERENCE_SEED",
    "Reference",
    "STAGE",
    "TEXT_METHOD",
    "VERDICT_LINES",
    "Window",
    "champion_predictions",
    "check_drift",
    "decide",
    "drift_alert",
    "feedback_quality",
    "known_columns",
    "scan_window",
    "load_reference",
    "monitor",
    "monitored_version",
    "parse_window",
    "prepare_reference",
    "read_feedback_for",
    "read_report",
    "reference_cache_dir",
    "render_html",
    "reports_dir",
    "run_drift_report",
    "send_drift_alert",
    "with_statistics",
    "write_json",
]
