"""``python -m rehearsal``: the cluster, rehearsed on one machine; exits 1 unless every guarantee holds.

Starts the services (:mod:`rehearsal.cluster`), runs the one-time set-up as pods, checks each
guarantee (:mod:`rehearsal.guarantees`) and prints a table. Pod folders and logs stay under the
rehearsal folder when something failed (or with ``--keep``), for reading.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rehearsal.guarantees import Outcome

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="labelled example rows to train on (default 300)")
    parser.add_argument("--workdir", type=Path, default=None, help="rehearsal folder (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the rehearsal folder even when all passed")
    args = parser.parse_args(argv)

    from rehearsal.cluster import bring_up, set_up
    from rehearsal.guarantees import run_all

    root = args.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-rehearsal-"))
    started = time.monotonic()
    print(f"[rehearsal] folder {root}", flush=True)
    with bring_up(root, rows=args.rows) as world:
        print(f"[rehearsal] services up in {time.monotonic() - started:.0f}s: Postgres :{world.postgres.port}, "
              f"Redis :{world.redis.port}, S3 {world.s3.endpoint}, MLflow {world.mlflow.url}, KFP {world.kfp.url}, "
              f"webhook :{world.webhook.port}", flush=True)
        for title, pod in set_up(world):
            state = "ok" if pod.returncode == 0 else f"FAILED (exit {pod.returncode}): {pod.tail(2)[-300:]}"
            print(f"[rehearsal] set-up: {title}: {state}", flush=True)
        outcomes = run_all(world, progress=lambda line: print(line, flush=True))
        outcomes.append(no_secret_in_logs(root, [world.postgres.password, world.api_key]))
    seconds = time.monotonic() - started
    print_table(outcomes)
    failed = [o for o in outcomes if not o.passed]
    print(f"\n[rehearsal] {len(outcomes) - len(failed)}/{len(outcomes)} guarantees passed in {seconds:.0f}s", flush=True)
    if failed or args.keep:
        print(f"[rehearsal] pod folders and logs kept in {root / 'pods'}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def no_secret_in_logs(root: Path, secret_values: list[str]) -> Outcome:
    """No Secret value in any pod's log or output (they come from env, and must stay out of logs)."""
    leaks = []
    for path in (root / "pods").rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            if any(value.encode() in data for value in secret_values):
                leaks.append(str(path.relative_to(root)))
    scanned = sum(1 for p in (root / "pods").rglob("*") if p.is_file())
    return Outcome("+ no Secret value in any pod's files or logs", not leaks,
                   f"{scanned} files scanned; leaks: {leaks[:5] or 'none'}")


def print_table(outcomes: list[Outcome]) -> None:
    """One line per guarantee: guarantee | passed/FAILED | evidence (colour codes and newlines removed)."""
    width = max(len(o.guarantee) for o in outcomes)
    print(f"\n{'guarantee':<{width}}  result  evidence")
    print(f"{'-' * width}  ------  --------")
    for outcome in outcomes:
        evidence = " ".join(ANSI.sub("", outcome.evidence).split())
        print(f"{outcome.guarantee:<{width}}  {'passed' if outcome.passed else 'FAILED':<6}  {evidence}")


if __name__ == "__main__":
    sys.exit(main())
