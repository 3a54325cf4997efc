"""One training process: what ``torchrun`` starts for ``training.processes`` and for a ``TrainJob``.

``python -m tuneloop.training.worker --config-json FILE --dataset PATH --output DIR`` trains with
the loop of :mod:`tuneloop.training.finetune`; rank 0 writes the Model directory (and, with
``--upload-to``, copies it to an object-store prefix the launching step reads it back from).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneloop.config import TuneloopConfig
from tuneloop.errors import TuneloopError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, and report a tuneloop error as one line plus a non-zero exit code."""
    parser = argparse.ArgumentParser(prog="tuneloop.training.worker")
    parser.add_argument("--config-json", required=True, help="A file or object-store URI holding the config as JSON.")
    parser.add_argument("--dataset", required=True, help="The Dataset artifact: a path or URI.")
    parser.add_argument("--output", required=True)
    parser.add_argument("--fingerprint", default="")
    parser.add_argument("--pipeline-run", default="")
    parser.add_argument("--task", default="finetune")
    parser.add_argument("--upload-to", default="", help="Object-store prefix rank 0 copies the Model to.")
    args = parser.parse_args(argv)

    from tuneloop.training import distributed, finetune, storage

    try:
        scratch = Path(args.output).parent
        config_file = storage.local_copy(args.config_json, scratch / "config.json")
        config = TuneloopConfig.from_json(config_file.read_text(encoding="utf-8"))
        dataset = storage.local_copy(args.dataset, scratch / "dataset.parquet")
        finetune.run(config, dataset, args.output, data_fingerprint=args.fingerprint,
                     pipeline_run=args.pipeline_run, task=args.task)
        if args.upload_to and distributed.is_rank_zero():
            storage.upload_directory(args.output, args.upload_to)
    except TuneloopError as error:
        distributed.record_worker_error(error)
        print(f"tuneloop.errors.{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
