"""The end-of-run summary of a local training run, read back from the run's own artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tuneloop.artifacts import METADATA_FILE
from tuneloop.datasets import SPLIT_COLUMN, SPLITS
from tuneloop.orchestration import LocalRun


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def summarize(run: LocalRun, versions: list[dict]) -> str:
    """What the run did, stage by stage, as lines of text for the terminal."""
    lines = [f"== tuneloop run {run.name} finished in {run.seconds:.0f}s =="]
    lines += _data_lines(run)
    lines += _training_lines(run)
    lines += _compression_lines(run)
    lines += _gate_lines(run)
    lines += _registry_lines(run, versions)
    lines += _deployment_lines(run)
    lines.append(f"artifacts: {run.root}")
    return "\n".join(lines)


def _data_lines(run: LocalRun) -> list[str]:
    result = _read_json(run.task_output("validate-data", "result")) or {}
    lines = [f"data: {result.get('rows', '?')} rows validated, all expectations passed "
             f"(report: {run.task_output('validate-data', 'report')})"]
    lengths = result.get("text_lengths") or {}
    if lengths.get("rows"):
        lines.append(f"text lengths: median {lengths['median']}, p99 {lengths['p99']}, max {lengths['max']} characters")
    dataset = run.task_output("retrieve-features", "dataset")
    if dataset.is_file():
        counts = pd.read_parquet(dataset, columns=[SPLIT_COLUMN])[SPLIT_COLUMN].value_counts()
        lines.append("splits: " + ", ".join(f"{s} {int(counts.get(s, 0))}" for s in SPLITS))
    return lines


def _training_lines(run: LocalRun) -> list[str]:
    metadata = _read_json(run.task_output("finetune", "model") / METADATA_FILE) or {}
    metrics = metadata.get("metrics", {})
    validation = metrics.get("validation", {})
    if not validation:
        return ["training: no model metadata found"]
    dp = metadata.get("privacy") or {}
    return [
        f"training: {metadata.get('training', {}).get('method', '?')} fine-tuning of {metadata.get('base_model')} "
        f"on {metadata.get('device')} took {metrics.get('training_seconds', 0):.0f}s; validation accuracy "
        f"{validation.get('accuracy', 0):.4f}, macro-F1 {validation.get('macro_f1', 0):.4f}"
    ] + ([f"privacy: DP-SGD spent epsilon {dp['epsilon']:.3f} at delta {dp['delta']:.2g} (target "
          f"{dp['target_epsilon']:g}, noise multiplier {dp['noise_multiplier']:.3f}, clipping {dp['max_grad_norm']:g})"]
         if dp.get("dp") else [])


def _compression_lines(run: LocalRun) -> list[str]:
    metadata = _read_json(run.task_output("compress", "compressed") / METADATA_FILE) or {}
    variants = metadata.get("variants", {})
    if not variants:
        return ["compression: no compressed model metadata found"]
    lines = [f"compression: kept {metadata.get('chosen')} ({metadata.get('precision')}): {metadata.get('reason', '')}"]
    for name, variant in variants.items():
        latency = ", ".join(f"batch {b} {ms:.1f} ms" for b, ms in variant.get("latency_ms", {}).items())
        size_mb = variant.get("size_bytes", 0) / 1e6
        f1 = variant.get("macro_f1")
        f1_text = f", validation macro-F1 {f1:.4f}" if isinstance(f1, (int, float)) else ""
        agreement = variant.get("agreement_with_fp32")
        f1_text += f", agrees with the teacher on {agreement:.1%}" if isinstance(agreement, (int, float)) else ""
        built = variant.get("build_seconds")
        f1_text += f", built in {built:.0f}s" if isinstance(built, (int, float)) and built else ""
        lines.append(f"  {name:<22} {size_mb:7.1f} MB, {latency}{f1_text}")
    return lines


def _gate_lines(run: LocalRun) -> list[str]:
    decision = _read_json(run.task_output("evaluate", "decision")) or {"blessed": False, "checks": []}
    return gate_lines(decision)


def gate_lines(decision: dict) -> list[str]:
    """The gate's lines: each check with its interval, the slice table and calibration."""
    metrics = decision.get("test_metrics", {})
    lines = [f"gate: blessed={decision.get('blessed')} (test accuracy {metrics.get('accuracy', float('nan')):.4f}, "
             f"macro-F1 {metrics.get('macro_f1', float('nan')):.4f} on {metrics.get('rows', '?')} rows)"]
    for check in decision.get("checks", []):
        lines.append(f"  [{_mark(check)}] {check['name']}: {check['value']}{_interval(check)} "
                     f"(threshold {check['threshold']})")
        if check.get("status") in ("undecided", "failed", "reported") and check.get("note"):
            lines.append(f"         {check['note']}")
    lines += _slice_lines(decision.get("slices") or [])
    lines += _calibration_lines(decision.get("calibration"))
    return lines


def _mark(check: dict) -> str:
    status = check.get("status")
    if status == "reported":
        return "info"
    if status == "undecided":
        return "pass*" if check.get("passed") else "UNDECIDED"
    return "pass" if check.get("passed") else "FAIL"


def _interval(check: dict) -> str:
    if check.get("low") is None or check.get("high") is None:
        return ""
    return f" [{check['low']}, {check['high']}] at {check.get('confidence', 0):.0%}"


def _slice_lines(slices: list[dict]) -> list[str]:
    if not slices:
        return []
    with_champion = any(piece.get("drop_points") is not None for piece in slices)
    header = f"  {'slice':<28} {'rows':>6} {'accuracy':>8} {'macro-F1 [interval]':>26}"
    header += f" {'drop vs champion (points)':>30}" if with_champion else ""
    lines = ["slices:", header]
    for piece in slices:
        if piece.get("macro_f1") is None:
            lines.append(f"  {piece['name']:<28} {piece['rows']:>6} {'-':>8} {'-':>26}  {piece.get('note', '')}")
            continue
        f1 = f"{piece['macro_f1']:.4f} [{piece['low']:.4f}, {piece['high']:.4f}]"
        line = f"  {piece['name']:<28} {piece['rows']:>6} {piece['accuracy']:>8.4f} {f1:>26}"
        if with_champion and piece.get("drop_points") is not None:
            drop = f"{piece['drop_points']:+.2f} [{piece['drop_low']:+.2f}, {piece['drop_high']:+.2f}]"
            line += f" {drop:>30}"
        gated = "gated" if piece.get("gated") else ""
        lines.append(line + (f"  {gated}" if gated else "") + (f"  {piece['note']}" if piece.get("note") else ""))
    return lines


def _calibration_lines(calibration: dict | None) -> list[str]:
    if not calibration:
        return []
    line = f"calibration: test ECE {calibration.get('ece', float('nan')):.4f}"
    if calibration.get("temperature") is not None:
        line += (f"; temperature {calibration['temperature']:.3f} fitted on {calibration.get('fitted_on_rows')} "
                 f"validation rows -> ECE {calibration.get('ece_calibrated', float('nan')):.4f} (served confidences "
                 f"use it)")
    elif calibration.get("note"):
        line += f"; {calibration['note']}"
    return [line]


def _registry_lines(run: LocalRun, versions: list[dict]) -> list[str]:
    registration = _read_json(run.task_output("register", "registration"))
    if registration is None:
        return ["registry: nothing registered (the gate did not bless this model)"]
    version = registration["version"]
    row = next((v for v in versions if v["version"] == version), {"aliases": registration["aliases"]})
    return [f"registry: {registration['model_name']} version {version}, aliases: {', '.join(row['aliases']) or 'none'}"]


def _deployment_lines(run: LocalRun) -> list[str]:
    result = _read_json(run.task_output("deploy", "deployment"))
    if result is None:
        return []
    return [f"deploy: {result.get('status')} on {result.get('target')}: {result.get('message', '')}"]
