"""The choice: among the variants that run on ``deployment.device`` and lose at most
``compression.max_f1_loss_points`` validation macro-F1 against the teacher (torch fp32), the fastest
by the geometric mean of its latency relative to ONNX fp32 over the latency batch sizes; within 5%
counts as a tie, won by the smallest file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tuneloop.compression.common import STAGE
from tuneloop.compression.variants import ONNX_FP32, TORCH_FP32, VARIANTS
from tuneloop.errors import CompressionError, ConfigError

SELECTION_TIE_MARGIN = 0.05
SELECTION_RULE = (
    "fastest within the macro-F1 budget among the variants that run on deployment.device: lowest geometric mean "
    "over the latency batch sizes of latency relative to onnx_fp32; within "
    f"{SELECTION_TIE_MARGIN:.0%} of the fastest counts as a tie, won by the smallest file"
)


@dataclass
class Selection:
    """The choice among measured variants, with the numbers it rests on."""

    chosen: str
    reason: str
    f1_loss_points: dict[str, float]
    relative_latency: dict[str, float]
    within_budget: list[str]
    eligible: list[str] = field(default_factory=list)


def eligible_variants(names: Sequence[str], device: str) -> list[str]:
    """The listed variants that can serve on ``device`` (``cpu``: ONNX Runtime; ``cuda``: TensorRT),
    plus ONNX fp32 on CPU (always built: the fallback).

    Raises:
        ConfigError: none of them runs on ``device`` (names the fields and the listed variants).
    """
    listed = list(dict.fromkeys([*names, ONNX_FP32])) if device == "cpu" else list(dict.fromkeys(names))
    eligible = [name for name in listed if VARIANTS[name].device == device]
    if not eligible:
        raise ConfigError(
            f"compression.variants {list(names)} leaves nothing that runs on deployment.device {device!r}: "
            f"{'add a tensorrt_* variant' if device == 'cuda' else 'add an onnx_* variant'} or change "
            f"deployment.device",
            field="compression.variants",
        )
    return eligible


def choose_variant(
    variants: Mapping[str, Mapping[str, Any]],
    *,
    max_loss_points: float,
    batch_sizes: Sequence[int],
    reference: str = TORCH_FP32,
    fallback: str = ONNX_FP32,
    eligible: Sequence[str] | None = None,
    device: str = "cpu",
) -> Selection:
    """Keep the fastest eligible variant whose macro-F1 loss against ``reference`` is within the budget.

    Args:
        variants: measured variants by name, each with ``macro_f1`` (a share in [0, 1]),
            ``latency_ms`` ({batch size: ms}) and ``size_bytes``; must hold ``reference`` and
            ``fallback``.
        max_loss_points: the budget, in points (100 x the F1 difference); a gain is never a loss.
        batch_sizes: the batch sizes whose latencies rank the variants.
        eligible: the variants that may be kept (they run on ``device``); default all but ``reference``.
        device: where the kept variant will serve, for the reason's wording.

    Returns:
        the :class:`Selection`: the variant kept, why, and the numbers behind it. When none fits
        the budget, the fallback is kept if eligible, else the eligible variant that loses least;
        either way the reason says so and the evaluation gate judges the loss.

    Raises:
        CompressionError: no eligible variant was measured (names the device).
    """
    reference_f1 = variants[reference]["macro_f1"]
    names = [name for name in variants if name != reference]
    allowed = [name for name in names if eligible is None or name in eligible]
    if not allowed:
        raise CompressionError(
            f"no variant that runs on deployment.device {device!r} was built; measured only {names}",
            stage=STAGE, field="deployment.device",
        )
    losses = {name: _loss_points(reference_f1, variants[name]["macro_f1"]) for name in names}
    baseline = variants[fallback] if fallback in variants else variants[reference]
    scores = {name: _relative_latency(variants[name], baseline, batch_sizes) for name in names}
    fits = sorted((name for name in allowed if losses[name] <= max_loss_points), key=lambda n: (scores[n], n))
    over = [name for name in allowed if name not in fits]
    elsewhere = [name for name in names if name not in allowed]
    budget = f"the budget of {max_loss_points:g} points (compression.max_f1_loss_points)"
    over_text = "; ".join(f"{name} would lose {losses[name]:.2f} validation macro-F1 points against torch fp32"
                          for name in over)
    elsewhere_text = (f"; not eligible (they do not run on deployment.device {device!r}): {', '.join(elsewhere)}"
                      if elsewhere else "")

    if not fits:
        kept = fallback if fallback in allowed else min(allowed, key=lambda n: (losses[n], scores[n], n))
        if kept == fallback:
            reason = (f"no variant fits {budget}, not even ONNX fp32: {over_text}; kept ONNX fp32 and left the loss "
                      f"to the evaluation gate{elsewhere_text}")
        else:
            reason = (f"no eligible variant fits {budget}: {over_text}; kept {kept}, the eligible variant that loses "
                      f"least, and left the loss to the evaluation gate{elsewhere_text}")
        return Selection(kept, reason, losses, scores, [], list(allowed))

    fastest = fits[0]
    ties = [name for name in fits if scores[name] <= scores[fastest] * (1.0 + SELECTION_TIE_MARGIN)]
    chosen = min(ties, key=lambda n: (variants[n]["size_bytes"], scores[n], n))
    numbers = (", ".join(f"{_ms(variants[chosen], b):.2f} ms at batch {b}" for b in batch_sizes) + " ("
               + ", ".join(f"{_speedup(variants[reference], variants[chosen], b)} torch fp32 at batch {b}"
                           for b in batch_sizes) + ")")
    if chosen == fallback and over:
        reason = (f"{over_text}, over the budget of {max_loss_points:g} points (compression.max_f1_loss_points); "
                  f"kept ONNX fp32: {numbers}")
        others = [name for name in fits if name != chosen]
        if others:
            reason += f"; within the budget but not faster: {', '.join(others)}"
        return Selection(chosen, reason + elsewhere_text, losses, scores, fits, list(allowed))
    reason = (f"{chosen} is the fastest variant within {budget}: it changes validation macro-F1 by "
              f"{0.0 - losses[chosen]:+.2f} points against torch fp32; latency {numbers}")
    if chosen != fastest:
        reason += (f"; {fastest} was as fast within {SELECTION_TIE_MARGIN:.0%} (timing noise) and the smaller file "
                   f"won ({variants[chosen]['size_bytes'] / 1e6:.1f} against "
                   f"{variants[fastest]['size_bytes'] / 1e6:.1f} MB)")
    runner_up = next((name for name in fits if name != chosen), None)
    if runner_up is not None:
        reason += f"; next within the budget: {runner_up}, {scores[runner_up] / scores[chosen]:.2f}x its latency"
    if over:
        reason += f"; over the budget: {over_text}"
    return Selection(chosen, reason + elsewhere_text, losses, scores, fits, list(allowed))


def _loss_points(reference_f1: float, other_f1: float) -> float:
    """Macro-F1 lost, in points, rounded so float noise cannot break a budget of 0."""
    return round(100.0 * (reference_f1 - other_f1), 6)


def _relative_latency(variant: Mapping[str, Any], baseline: Mapping[str, Any], batch_sizes: Sequence[int]) -> float:
    """Geometric mean over the batch sizes of the variant's latency divided by the baseline's."""
    logs = [math.log(max(_ms(variant, b), 1e-9) / max(_ms(baseline, b), 1e-9)) for b in batch_sizes]
    return round(math.exp(sum(logs) / len(logs)), 4)


def _ms(variant: Mapping[str, Any], batch: int) -> float:
    latency = variant["latency_ms"]
    return float(latency[batch] if batch in latency else latency[str(batch)])


def _speedup(reference: Mapping[str, Any], variant: Mapping[str, Any], batch: int) -> str:
    """``N.Nx``: how many times faster than the reference at one batch size."""
    return f"{_ms(reference, batch) / max(_ms(variant, batch), 1e-9):.1f}x"
