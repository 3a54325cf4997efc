"""How often the promotion gate promotes: a simulation over seeds with the gate's own statistics.

Each seed draws a test set of ``--rows`` rows from a known joint distribution of (truth, champion's
prediction, challenger's prediction), then asks the gate's check against the champion
(:func:`tuneloop.gate_stats.paired_difference` + :func:`tuneloop.gate_stats.decide`, exactly as
``evaluate`` does) whether to promote. Two challengers:

- *equal*: the same error rates as the champion (errors partly shared), so the same macro-F1;
- *worse*: macro-F1 truly lower than the champion's by ``--worse-factor`` x the margin (1.0: on the
  margin, the hardest case for the gate; every larger drop is promoted less often).

It reports, at the demo's test size (``--rows``, 673) and at the row count the gate says it needs
(the median ``rows_needed`` the gate printed for the equal challenger at ``--rows``), the share of
seeds promoted. Targets: worse promoted at most 5% of the time; equal promoted at least 80% of the
time at the rows the gate asked for. The default scenario is the SMS spam demo: 13.4% spam, a
champion with 99.5% recall on ham and 92% on spam (test macro-F1 about 0.97).

    .venv/bin/python benchmarks/gate.py [--seeds 200] [--rows 673] [--margin 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneloop import gate_stats  # noqa: E402
from tuneloop.config import EvaluationConfig  # noqa: E402

CLASSES = 2
ENCODED = CLASSES + 1  # the gate's encoding keeps one index for "a label outside the known set"


def joint_table(positive_share: float, champion_error: tuple[float, float], challenger_error: tuple[float, float],
                shared_errors: float) -> np.ndarray:
    """P(truth, champion prediction, challenger prediction) for two classes, as a 2x2x2 array.

    ``shared_errors`` is the share of the smaller error rate that both models make on the same rows.
    """
    table = np.zeros((CLASSES, CLASSES, CLASSES))
    for truth, prior in ((0, 1.0 - positive_share), (1, positive_share)):
        wrong = 1 - truth
        a, b = champion_error[truth], challenger_error[truth]
        both = shared_errors * min(a, b)
        table[truth, wrong, wrong] = prior * both
        table[truth, wrong, truth] = prior * (a - both)
        table[truth, truth, wrong] = prior * (b - both)
        table[truth, truth, truth] = prior * (1.0 - a - b + both)
    return table


def population_gain_points(table: np.ndarray) -> float:
    """Macro-F1(challenger) - macro-F1(champion) of the distribution itself, in points."""
    champion, challenger = table.sum(axis=2), table.sum(axis=1)
    scored = list(range(CLASSES))
    return 100.0 * float(gate_stats.macro_f1_of_counts(challenger, scored) - gate_stats.macro_f1_of_counts(champion, scored))


def worse_challenger(args, drop_points: float) -> tuple[np.ndarray, float]:
    """The challenger whose spam recall is lowered until it trails by ``drop_points`` macro-F1 points."""
    low, high = args.spam_error, 0.9
    for _ in range(100):
        middle = (low + high) / 2
        table = joint_table(args.positive_share, (args.ham_error, args.spam_error), (args.ham_error, middle),
                            args.shared_errors)
        if -population_gain_points(table) < drop_points:
            low = middle
        else:
            high = middle
    table = joint_table(args.positive_share, (args.ham_error, args.spam_error), (args.ham_error, high),
                        args.shared_errors)
    return table, population_gain_points(table)


def sample(table: np.ndarray, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cells = rng.choice(table.size, size=rows, p=table.ravel())
    truth, champion, challenger = np.unravel_index(cells, table.shape)
    return truth.astype(np.int64), champion.astype(np.int64), challenger.astype(np.int64)


def gate(truth, champion, challenger, settings: EvaluationConfig, margin: float, seed: int) -> gate_stats.Verdict:
    """The check ``macro_f1_drop_vs_champion_points`` as ``evaluate`` makes it."""
    gain = gate_stats.paired_difference(truth, challenger, champion, ENCODED, confidence=settings.confidence,
                                        resamples=settings.bootstrap_resamples, seed=seed,
                                        scored=list(range(CLASSES))).scaled(100.0)
    return gate_stats.decide(gain, -margin, planning=0.0)


def simulate(table: np.ndarray, rows: int, args, settings: EvaluationConfig) -> dict:
    promoted, undecided, needed = 0, 0, []
    for seed in range(args.seeds):
        rng = np.random.default_rng(10_000 + seed)
        verdict = gate(*sample(table, rows, rng), settings, args.margin, seed)
        promoted += verdict.passed
        undecided += verdict.status == gate_stats.UNDECIDED
        if verdict.rows_needed:
            needed.append(verdict.rows_needed)
    return {"rows": rows, "promoted_share": promoted / args.seeds, "undecided_share": undecided / args.seeds,
            "median_rows_needed": int(statistics.median(needed)) if needed else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--rows", type=int, default=673, help="The demo's test size.")
    parser.add_argument("--margin", type=float, default=EvaluationConfig().max_drop_vs_champion_points,
                        help="Non-inferiority margin in macro-F1 points (evaluation.max_drop_vs_champion_points).")
    parser.add_argument("--confidence", type=float, default=EvaluationConfig().confidence)
    parser.add_argument("--positive-share", type=float, default=0.134)
    parser.add_argument("--ham-error", type=float, default=0.005)
    parser.add_argument("--spam-error", type=float, default=0.08)
    parser.add_argument("--shared-errors", type=float, default=0.5)
    parser.add_argument("--worse-factor", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    settings = EvaluationConfig(confidence=args.confidence, max_drop_vs_champion_points=args.margin)

    equal = joint_table(args.positive_share, (args.ham_error, args.spam_error), (args.ham_error, args.spam_error),
                        args.shared_errors)
    worse, worse_gain = worse_challenger(args, args.worse_factor * args.margin)
    at_demo = {"equal": simulate(equal, args.rows, args, settings), "worse": simulate(worse, args.rows, args, settings)}
    needed = at_demo["equal"]["median_rows_needed"] or args.rows
    at_needed = {"equal": simulate(equal, needed, args, settings), "worse": simulate(worse, needed, args, settings)}
    results = {"seeds": args.seeds, "margin_points": args.margin, "confidence": args.confidence,
               "bootstrap_resamples": settings.bootstrap_resamples,
               "worse_challenger_gain_points": round(worse_gain, 3), "rows_the_gate_asks_for": needed,
               "at_demo_rows": at_demo, "at_rows_needed": at_needed}

    print(f"gate simulation: {args.seeds} seeds, margin {args.margin} macro-F1 points, confidence "
          f"{args.confidence:.0%}, {settings.bootstrap_resamples} paired bootstrap resamples")
    print(f"worse challenger: truly {-worse_gain:.2f} points below the champion ({args.worse_factor:g} x the margin)")
    print(f"{'test rows':>10} {'challenger':>11} {'promoted':>9} {'undecided':>10} {'median rows needed':>19}")
    for label, block in ((f"{args.rows}", at_demo), (f"{needed}", at_needed)):
        for kind in ("equal", "worse"):
            row = block[kind]
            print(f"{label:>10} {kind:>11} {row['promoted_share']:>9.1%} {row['undecided_share']:>10.1%} "
                  f"{str(row['median_rows_needed']):>19}")
    worse_ok = max(at_demo["worse"]["promoted_share"], at_needed["worse"]["promoted_share"]) <= 0.05
    equal_ok = at_needed["equal"]["promoted_share"] >= 0.80
    print(f"target: worse promoted <= 5%: {'met' if worse_ok else 'NOT met'}; equal promoted >= 80% at the "
          f"{needed} rows the gate asks for: {'met' if equal_ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0 if worse_ok and equal_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
