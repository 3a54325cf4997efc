"""Erasure with lineage: ``tuneloop forget`` (:func:`forget`).

Given entity ids (``--ids``: ids of the texts/labels files, or request ids of the prediction log) or
texts (``--texts``), one erasure:

1. records itself in the audit log of the shared state database (``tuneloop_erasures`` and
   ``tuneloop_erased_subjects``): ids and texts only as salted SHA-256 hashes, never in clear;
2. writes a new version of the training sources without the matching rows (``data.texts`` and
   ``data.labels``, local or ``s3://``, each replaced whole) and retires the old version as
   ``privacy.erasure.retired_sources`` says (``delete``: the replacement is the only copy left;
   ``archive``: the old file is first copied under ``archive_uri``); the prepared Feast copy of the texts
   is refreshed when there is one;
3. deletes the matching records from the prediction log (every Parquet file of ``predictions/`` and
   ``feedback/`` holding one is rewritten whole without it; a file left empty is removed). A record
   matches by request id, or by its text: the erased text as it was served (a log written before masking
   existed, or in ``raw`` mode), and as the log's mode stores it (masked or pseudonymised);
4. tags every registry version whose training frame (the ``tuneloop.dataset_uri`` artifact) held one of
   the rows with ``tuneloop.trained_on_erased_data`` (the audit ids), which ``tuneloop models list``
   shows;
5. marks the audit entry done.

The next training run excludes erased ids and texts even if a restored backup brings them back
(:func:`exclude_erased`, called by the training-set step). Every step only removes what is still there,
so a KFP retry or a second run after a crash completes the work; a second run of a finished erasure
finds every subject in the audit log and does nothing. Ids that match nothing anywhere (and were never
erased) are reported one by one, and the exit code says so (:data:`EXIT_UNMATCHED`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa

from tuneloop import state_store
from tuneloop.config import is_uri
from tuneloop.errors import DataError, TuneloopError

if TYPE_CHECKING:
    from tuneloop.config import TuneloopConfig

STAGE = "erasure"
EXIT_UNMATCHED = 13
"""Exit code of ``tuneloop forget`` when at least one given id or text matched nothing (and was never erased)."""
ERASED_TAG = "tuneloop.trained_on_erased_data"
"""Registry version tag: JSON list of the audit ids of erasures whose rows were in the version's training frame."""

logger = logging.getLogger("tuneloop.erasure")

_metadata = sa.MetaData()
erasures = sa.Table(
    "tuneloop_erasures", _metadata,
    sa.Column("audit_id", sa.String(64), primary_key=True),
    sa.Column("project", sa.String(200), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # started | done
    sa.Column("subjects", sa.Integer, nullable=False),
    sa.Column("started_at", sa.String(40), nullable=False),
    sa.Column("finished_at", sa.String(40), nullable=False, default=""),
    sa.Column("summary", sa.Text, nullable=False, default="{}"),
)
"""The erasure audit log: one row per erasure, with what it removed (counts, versions tagged; no ids)."""

erased_subjects = sa.Table(
    "tuneloop_erased_subjects", _metadata,
    sa.Column("project", sa.String(200), primary_key=True),
    sa.Column("subject_hash", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(10), nullable=False),  # id | text
    sa.Column("audit_id", sa.String(64), nullable=False),
)
"""Every erased id or text of a project, hashed: what later training runs exclude."""


class ForgetError(TuneloopError):
    """The ids/texts file is missing, empty or unreadable."""

    exit_code = 3


@dataclass
class ForgetReport:
    """What one ``forget`` did; ``outcomes`` maps each given id (or text number) to what happened to it."""

    audit_id: str
    outcomes: dict[str, str] = field(default_factory=dict)
    source_rows_removed: dict[str, int] = field(default_factory=dict)
    log_records_removed: dict[str, int] = field(default_factory=dict)
    tagged_versions: list[str] = field(default_factory=list)
    already_done: bool = False

    @property
    def unmatched(self) -> list[str]:
        return [subject for subject, outcome in self.outcomes.items() if outcome == "matched nothing"]

    @property
    def exit_code(self) -> int:
        return EXIT_UNMATCHED if self.unmatched else 0

    def lines(self) -> list[str]:
        """The report as the CLI prints it (ids as given by the user; texts by their line number)."""
        out = [f"erasure {self.audit_id}: " + ("already done, nothing to do" if self.already_done else "done")]
        if not self.already_done:
            out.append("sources: " + ", ".join(f"{name} -{count} rows" for name, count in
                                              self.source_rows_removed.items()))
            out.append("prediction log: " + ", ".join(f"{kind} -{count} records" for kind, count in
                                                      self.log_records_removed.items()))
            out.append("registry versions trained on erased data: " + (", ".join(self.tagged_versions) or "none"))
        out.extend(f"{subject}: {outcome}" for subject, outcome in self.outcomes.items())
        return out


# --------------------------------------------------------------------------------------------
# Hashing and the audit log


def subject_hash(config: TuneloopConfig, kind: str, value: str) -> str:
    """The audit log's hash of an id or text (salted with the project, so equal ids of two projects differ)."""
    return hashlib.sha256(f"tuneloop-erasure\0{config.name}\0{kind}\0{value}".encode()).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _tables(connection: sa.Connection) -> None:
    _metadata.create_all(connection, checkfirst=True)


def erased_hashes(config: TuneloopConfig) -> set[str]:
    """Every erased subject hash of the project (ids and texts)."""
    with state_store.transaction(config) as connection:
        _tables(connection)
        rows = connection.execute(sa.select(erased_subjects.c.subject_hash)
                                  .where(erased_subjects.c.project == config.name))
        return {row.subject_hash for row in rows}


def audit_entries(config: TuneloopConfig) -> list[dict[str, Any]]:
    """The project's erasure audit log, oldest first."""
    with state_store.transaction(config) as connection:
        _tables(connection)
        rows = connection.execute(sa.select(erasures).where(erasures.c.project == config.name)
                                  .order_by(erasures.c.started_at))
        return [dict(row._mapping) for row in rows]


def _begin(config: TuneloopConfig, audit_id: str, hashes: dict[str, str]) -> bool:
    """Record the erasure as started; True when this erasure's own earlier attempt was already there
    (a retry after a crash: what it removed is gone, the rest is done now)."""
    with state_store.transaction(config, lock="tuneloop-erasure") as connection:
        _tables(connection)
        exists = connection.execute(sa.select(erasures.c.status).where(erasures.c.audit_id == audit_id)).first()
        if exists is None:
            connection.execute(erasures.insert().values(audit_id=audit_id, project=config.name, status="started",
                                                        subjects=len(hashes), started_at=_now(), summary="{}"))
        return exists is not None and exists.status == "started"


def _finish(config: TuneloopConfig, audit_id: str, hashes: dict[str, str], summary: dict) -> None:
    with state_store.transaction(config, lock="tuneloop-erasure") as connection:
        known = {row.subject_hash for row in connection.execute(
            sa.select(erased_subjects.c.subject_hash).where(erased_subjects.c.project == config.name,
                                                            erased_subjects.c.subject_hash.in_(list(hashes))))}
        fresh = [{"project": config.name, "subject_hash": digest, "kind": kind, "audit_id": audit_id}
                 for digest, kind in hashes.items() if digest not in known]
        if fresh:
            connection.execute(erased_subjects.insert(), fresh)
        connection.execute(erasures.update().where(erasures.c.audit_id == audit_id, erasures.c.status != "done")
                           .values(status="done", finished_at=_now(), summary=state_store.dumps(summary)))


def _done_hashes(config: TuneloopConfig, hashes: Iterable[str]) -> set[str]:
    with state_store.transaction(config) as connection:
        _tables(connection)
        rows = connection.execute(sa.select(erased_subjects.c.subject_hash).where(
            erased_subjects.c.project == config.name, erased_subjects.c.subject_hash.in_(list(hashes))))
        return {row.subject_hash for row in rows}


# --------------------------------------------------------------------------------------------
# Reading the request


def read_subjects(path: str | Path, *, what: str) -> list[str]:
    """One id or text per line (surrounding whitespace and blank lines ignored, repeats kept once).

    Raises:
        ForgetError: the file is missing, not UTF-8 text, or holds nothing.
    """
    source = Path(path)
    if not source.is_file():
        raise ForgetError(f"{what} file not found: {source}", stage=STAGE, path=str(source))
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ForgetError(f"{what} file {source} is not UTF-8 text: {error}", stage=STAGE, path=str(source)) from None
    subjects = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not subjects:
        raise ForgetError(f"{what} file {source} holds no {what} (one per line)", stage=STAGE, path=str(source))
    return subjects


# --------------------------------------------------------------------------------------------
# The sources


def _write_source(frame: pd.DataFrame, location: str) -> None:
    """Replace the file at ``location`` whole (local: temporary file + rename; object store: one PUT)."""
    import io
    import os

    import fsspec

    buffer = io.BytesIO()
    if location.lower().endswith((".parquet", ".pq")):
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False)
    data = buffer.getvalue()
    fs, path = fsspec.core.url_to_fs(location)
    if is_uri(location) and not location.startswith("file://"):
        fs.pipe_file(path, data)
        return
    temporary = f"{path}.erasure.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _archive(config: TuneloopConfig, location: str, audit_id: str) -> str | None:
    """Copy the version about to be replaced under ``privacy.erasure.archive_uri`` (``archive`` mode)."""
    settings = config.privacy.erasure
    if settings.retired_sources != "archive":
        return None
    import fsspec

    name = location.rstrip("/").rsplit("/", 1)[-1]
    target = f"{str(settings.archive_uri).rstrip('/')}/{audit_id}/{name}"
    with fsspec.open(location, "rb") as source, fsspec.open(target, "wb", auto_mkdir=True) as sink:
        sink.write(source.read())
    return target


def _source_matches(config: TuneloopConfig, ids: set[str], texts: set[str]) -> tuple[set[str], dict[str, str]]:
    """The entity ids the request names (given ids present in the sources, ids of the given texts) and
    the texts of those ids (to find them in the prediction log)."""
    from tuneloop.datasets import read_table

    data = config.data
    frame = read_table(data.texts, what="texts file")
    keys = frame[data.id_column].astype(str)
    values = frame[data.text_column].astype(str)
    chosen = keys.isin(ids) | values.str.strip().isin(texts)
    labels = read_table(data.labels, what="labels file")
    label_keys = set(labels[data.id_column].astype(str))
    matched = set(keys[chosen]) | (ids & label_keys)
    return matched, {key: text for key, text in zip(keys[chosen], values[chosen])}


def _rewrite_sources(config: TuneloopConfig, entity_ids: set[str], audit_id: str) -> dict[str, int]:
    """Write the sources without the rows of ``entity_ids``; returns rows removed per file."""
    from tuneloop.datasets import read_table

    data = config.data
    removed: dict[str, int] = {}
    for location, what in ((data.texts, "texts file"), (data.labels, "labels file")):
        frame = read_table(location, what=what)
        drop = frame[data.id_column].astype(str).isin(entity_ids)
        removed[Path(str(location)).name] = int(drop.sum())
        if drop.any():
            _archive(config, str(location), audit_id)
            _write_source(frame[~drop].reset_index(drop=True), str(location))
            logger.info("erasure %s: %s rewritten without %d rows", audit_id, location, int(drop.sum()))
    if removed.get(Path(str(data.texts)).name):
        _refresh_prepared_texts(config)
    return removed


def _refresh_prepared_texts(config: TuneloopConfig) -> None:
    """Rewrite Feast's prepared copy of the texts, when one exists, from the new texts version."""
    from tuneloop.features.definitions import (
        prepare_texts,
        prepared_fingerprint,
        prepared_texts_uri,
    )

    if prepared_fingerprint(prepared_texts_uri(config)) is not None:
        prepare_texts(config)


# --------------------------------------------------------------------------------------------
# The prediction log


def _log_text_forms(config: TuneloopConfig, texts: Iterable[str]) -> set[str]:
    """The erased texts as the prediction log may hold them: as served (before masking existed, or
    ``raw``), and as ``privacy.prediction_log`` stores them now."""
    from tuneloop import privacy

    forms = set(texts)
    mode = config.privacy.prediction_log
    if mode in ("mask", "pseudonymise"):
        try:
            policy = privacy.text_policy(config.privacy, mode)
        except TuneloopError:
            policy = privacy.text_policy(config.privacy, "mask")  # no key here: match the masked form
        forms |= {policy(text) for text in texts}
    return {form for form in forms if form}


def _purge_log(config: TuneloopConfig, request_ids: set[str], texts: set[str]) -> tuple[dict[str, int], set[str]]:
    """Delete matching prediction records and their feedback; returns counts and the request ids found."""
    from tuneloop import prediction_log as plog

    uri = plog.prediction_log_uri(config)
    fs, root = plog.filesystem(uri)
    removed = {plog.PREDICTIONS: 0, plog.FEEDBACK: 0}
    found: set[str] = set()
    for kind in (plog.PREDICTIONS, plog.FEEDBACK):
        for path in _log_files(fs, f"{root.rstrip('/')}/{kind}", uri):
            table = _read_log_file(fs, path, uri)
            frame = table.to_pandas()
            hit = frame[plog.REQUEST_ID].astype(str).isin(request_ids | found)
            if kind == plog.PREDICTIONS and plog.TEXT in frame.columns and texts:
                hit |= frame[plog.TEXT].isin(texts)
            if not hit.any():
                continue
            found |= set(frame.loc[hit, plog.REQUEST_ID].astype(str))
            removed[kind] += int(hit.sum())
            try:
                if hit.all():
                    fs.rm(path)
                else:
                    import pyarrow as pa

                    kept = pa.Table.from_pandas(frame[~hit].reset_index(drop=True), schema=table.schema,
                                                preserve_index=False)
                    plog.write_table_atomically(fs, path, kept)
            except Exception as error:  # fsspec back-ends raise their own types
                raise plog.unreachable(uri, error, f"rewriting {path}") from error
    return removed, found


def _log_files(fs, directory: str, uri: str) -> list[str]:
    from tuneloop import prediction_log as plog

    try:
        if not fs.exists(directory):
            return []
        return sorted(path for path in fs.find(directory) if path.endswith(".parquet")
                      and not path.rsplit("/", 1)[-1].startswith("."))
    except Exception as error:
        raise plog.unreachable(uri, error, f"listing {directory}") from error


def _read_log_file(fs, path: str, uri: str):
    import pyarrow.parquet as pq

    from tuneloop import prediction_log as plog

    try:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle)
    except Exception as error:
        raise plog.unreachable(uri, error, f"reading {path}") from error


# --------------------------------------------------------------------------------------------
# The registry


def _tag_versions(config: TuneloopConfig, entity_ids: set[str], texts: set[str], audit_id: str) -> list[str]:
    """Tag every registry version whose training frame held one of the erased rows."""
    import tempfile

    from tuneloop import registry
    from tuneloop.datasets import read_dataset

    if not entity_ids and not texts:
        return []
    mlflow_client = registry.client(config)
    name = config.registry.model_name
    versions = registry.call(config, f"listing versions of {name!r}", mlflow_client.search_model_versions,
                             f"name = '{name}'")
    tagged, frames = [], {}
    data = config.data
    for version in versions:
        tags = version.tags or {}
        uri = tags.get(f"{registry.TAG_PREFIX}dataset_uri")
        if not uri:
            continue
        if uri not in frames:
            with tempfile.TemporaryDirectory() as scratch:
                local = registry.download_artifact(config, uri, scratch, what=f"training frame of version "
                                                   f"{version.version}")
                frame = read_dataset(_single_file(local))
            frames[uri] = (set(frame[data.id_column].astype(str)) if data.id_column in frame else set(),
                           set(frame[data.text_column].astype(str)) if data.text_column in frame else set())
        frame_ids, frame_texts = frames[uri]
        if not (frame_ids & entity_ids or frame_texts & texts):
            continue
        audits = json.loads(tags.get(ERASED_TAG, "[]"))
        if audit_id not in audits:
            registry.call(config, f"tagging version {version.version}", mlflow_client.set_model_version_tag,
                          name, str(version.version), ERASED_TAG, json.dumps([*audits, audit_id]))
        tagged.append(str(version.version))
    return sorted(tagged, key=int)


def _single_file(local: Path) -> Path:
    local = Path(local)
    if local.is_dir():
        files = sorted(path for path in local.rglob("*") if path.is_file())
        if len(files) != 1:
            raise DataError(f"training frame artifact {local} holds {len(files)} files, expected one", stage=STAGE,
                            path=str(local))
        return files[0]
    return local


# --------------------------------------------------------------------------------------------
# The command


def forget(config: TuneloopConfig, *, ids: list[str] | None = None, texts: list[str] | None = None) -> ForgetReport:
    """Erase the given ids or texts from sources, prediction log and (by tag) registry lineage.

    Raises:
        ForgetError: neither or both of ``ids`` and ``texts``.
        DataError: a source file is missing or lacks its columns.
        ServiceUnavailableError: the state database, object store or registry does not answer (retry:
            the erasure resumes where it stopped).
    """
    if bool(ids) == bool(texts):
        raise ForgetError("give either ids or texts to forget (one of --ids FILE, --texts FILE)", stage=STAGE)
    kind = "id" if ids else "text"
    subjects = list(ids or texts or [])
    hashes = {subject_hash(config, kind, subject): kind for subject in subjects}
    audit_id = hashlib.sha256("\0".join(sorted(hashes)).encode()).hexdigest()[:16]
    done = _done_hashes(config, hashes)
    report = ForgetReport(audit_id=audit_id)
    pending = [subject for subject in subjects if subject_hash(config, kind, subject) not in done]
    if not pending:
        report.already_done = True
        report.outcomes = {_label(kind, subjects, s): "already erased" for s in subjects}
        return report

    resumed = _begin(config, audit_id, hashes)
    given_ids = set(pending) if kind == "id" else set()
    given_texts = set(pending) if kind == "text" else set()
    entity_ids, entity_texts = _source_matches(config, given_ids, given_texts)
    erased_texts = set(entity_texts.values()) | given_texts
    # Sources last: they are how a retry after a crash still finds the log records and frames to handle.
    report.tagged_versions = _tag_versions(config, entity_ids, erased_texts, audit_id)
    report.log_records_removed, found_requests = _purge_log(config, given_ids, _log_text_forms(config, erased_texts))
    report.source_rows_removed = _rewrite_sources(config, entity_ids, audit_id)

    matched_texts = {text.strip() for text in entity_texts.values()}
    erased: dict[str, str] = {}
    for subject in subjects:
        label = _label(kind, subjects, subject)
        if subject not in pending:
            report.outcomes[label] = "already erased"
        elif subject in entity_ids or subject in found_requests or (kind == "text" and subject in matched_texts):
            report.outcomes[label] = "erased"
            erased[subject_hash(config, kind, subject)] = kind
        elif resumed:
            report.outcomes[label] = "nothing left (this erasure was resumed after an interruption)"
            erased[subject_hash(config, kind, subject)] = kind
        else:
            report.outcomes[label] = "matched nothing"
    summary = {"source_rows_removed": report.source_rows_removed, "log_records_removed": report.log_records_removed,
               "tagged_versions": report.tagged_versions, "erased": len(erased), "unmatched": len(report.unmatched),
               "retired_sources": config.privacy.erasure.retired_sources}
    _finish(config, audit_id, erased, summary)
    return report


def _label(kind: str, subjects: list[str], subject: str) -> str:
    """How the report names a subject: an id as given; a text by its line, never its content."""
    return subject if kind == "id" else f"text #{subjects.index(subject) + 1}"


def exclude_erased(frame: pd.DataFrame, config: TuneloopConfig) -> tuple[pd.DataFrame, int]:
    """The training frame without erased ids and texts (by their audit-log hashes); returns the rows removed."""
    hashes = erased_hashes(config)
    if not hashes or frame.empty:
        return frame, 0
    data = config.data
    erased = frame[data.id_column].astype(str).map(lambda key: subject_hash(config, "id", key) in hashes)
    erased |= frame[data.text_column].astype(str).str.strip().map(
        lambda text: subject_hash(config, "text", text) in hashes)
    return frame[~erased].reset_index(drop=True), int(erased.sum())
