"""Compression benchmark: every variant the compress stage can keep, against torch fp32 eager, in one run.

    .venv/bin/python benchmarks/compression.py [--rows N] [--model DIR] [--latency-rows N] [--repeats N]
        [--student-layers N] [--distil-epochs N] [--prune-share S] [--no-students]

The model (the teacher), in this order:

1. ``--model DIR``: a Model directory (Hugging Face checkpoint + ``tuneloop.json`` of kind
   ``model``); nothing is trained.
2. otherwise the newest finished pipeline output, ``.tuneloop/pipeline_root/*/finetune/model``
   (under the working directory, then the repository root), as ``make demo`` leaves it;
3. otherwise a quick fine-tune of MiniLM-L6 (body and head, one epoch over the training split,
   max_length 64) with ``tuneloop.training``, cached in ``.tuneloop/benchmarks/minilm-quick``.

Texts: the SMS spam example (``examples/sms_spam/data``), split by ``tuneloop.datasets.assign_split``
with the default shares and salt (validation 0.15, test 0.15, salt ``tuneloop``). The students are
built by the stage's own :func:`tuneloop.compression.stage.build_all`: the distilled student
(``--student-layers`` of the teacher's layers, ``--distil-epochs`` on the train split) and the pruned
model (``--prune-share`` of heads and neurons removed by importance on validation rows, one recovery
epoch). Every variant is scored on the test split (``--rows`` caps it), which no variant has seen
(validation rows calibrate int8 and score pruning importance). Latency is measured with the stage's
own :func:`tuneloop.compression.measure_latencies` on the first ``--latency-rows`` test texts at
batch 1, 8 and 32: ``--repeats`` rounds, variants interleaved within a round, median of one
``predict_proba`` call (tokenisation included). Throughput is rows per second at that batch size.
Speed-ups are against torch fp32 eager (``N.Nx``). "build s" is what each variant cost to make on
this machine from the fine-tuned teacher: for a student's variants, its training and export
included. TensorRT rows appear only where they were built and measured on a GPU. The 1-minute load
average before and after is printed: on a shared machine, other processes slow torch's spinning
threads far more than ONNX Runtime, so a run with load above the core count says so.

The line "kept by the compress rule" applies :func:`tuneloop.compression.choose_variant` (fastest
within ``--budget`` macro-F1 points, latency at batch 1 and 32, variants that run on CPU) to these
numbers, and checks it against the issue's targets (within 1 point, >= 10x at batch 1, >= 4x at
batch 32, <= 15% of the fp32 size).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from tuneloop import compression, tensorrt_engine  # noqa: E402
from tuneloop.compression.stage import CompressionInputs, build_all  # noqa: E402
from tuneloop.artifacts import METADATA_FILE, read_metadata  # noqa: E402
from tuneloop.datasets import assign_split  # noqa: E402
from tuneloop.metrics import macro_f1  # noqa: E402
from tuneloop.runtime import TorchClassifier, available_cpus, default_threads  # noqa: E402

DATA = REPO / "examples" / "sms_spam" / "data"
BATCH_SIZES = (1, 8, 32)
QUICK_MODEL = Path(".tuneloop") / "benchmarks" / "minilm-quick"
TARGETS = {"speedup_batch1": 10.0, "speedup_batch32": 4.0, "size_share": 0.15, "f1_loss_points": 1.0}
STUDENT_VARIANTS = ["distilled_fp32", "distilled_int8", "distilled_int8_static", "distilled_int8_emb4", "pruned_fp32",
                    "pruned_int8", "pruned_int8_static", "pruned_int8_emb4"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Model directory (default: latest pipeline output, else train)")
    parser.add_argument("--rows", type=int, default=None, help="test rows scored (default: the whole test split)")
    parser.add_argument("--latency-rows", type=int, default=64, help="test texts in the latency sample")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--calibration-rows", type=int, default=100, help="validation texts for int8 calibration")
    parser.add_argument("--budget", type=float, default=1.0, help="macro-F1 points a kept variant may lose")
    parser.add_argument("--student-layers", type=int, default=3, help="encoder layers of the distilled student")
    parser.add_argument("--distil-epochs", type=int, default=3, help="distillation epochs on the train split")
    parser.add_argument("--prune-share", type=float, default=0.5, help="share of heads and neurons pruned")
    parser.add_argument("--no-students", action="store_true", help="only the teacher's variants")
    args = parser.parse_args(argv)

    frame = _dataset()
    model_dir, origin = _model(args.model, frame)
    metadata = read_metadata(model_dir)
    labels = [str(label) for label in metadata["labels"]]
    max_length = int(metadata.get("max_length") or 128)
    test = frame[frame["split"] == "test"]
    if args.rows:
        test = test.head(args.rows)
    texts, truth = test["text"].fillna("").astype(str).tolist(), test["label"].astype(str).tolist()
    validation = frame[frame["split"] == "validation"]["text"].fillna("").astype(str).tolist()
    calibration_texts, _ = compression.calibration_sample(validation, args.calibration_rows)

    print(_machine())
    load_before = _load()
    print(f"model: {model_dir} ({origin}; {metadata.get('base_model', '?')}, max_length {max_length})")
    print(f"texts: {len(texts)} SMS spam test rows scored; latency on the first {min(args.latency_rows, len(texts))} "
          f"at batch {', '.join(map(str, BATCH_SIZES))}, {args.repeats} interleaved rounds; "
          f"{len(calibration_texts)} validation rows calibrate int8")

    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as scratch:
        work = Path(scratch)
        torch_model = TorchClassifier(model_dir, labels=labels, max_length=max_length)
        torch_model.tokenizer.save_pretrained(work)
        names = [*compression.CPU_VARIANTS, *compression.TENSORRT_VARIANTS] + ([] if args.no_students
                                                                              else STUDENT_VARIANTS)
        config = _config(names, args)
        train = frame[frame["split"] == "train"]
        validation_frame = frame[frame["split"] == "validation"]
        inputs = CompressionInputs(
            labels, max_length, "text", "label", validation_frame["text"].fillna("").astype(str).tolist(),
            validation_frame["label"].astype(str).tolist(), train["text"].fillna("").astype(str).tolist(),
            train["label"].astype(str).tolist())
        started = time.perf_counter()
        candidates, skipped, _, students = build_all(config, torch_model, work, calibration_texts, inputs)
        print(f"built {len(candidates)} variants in {time.perf_counter() - started:.0f}s"
              + (f"; skipped: {', '.join(f'{n} ({why})' for n, why in skipped.items())}" if skipped else ""))
        for source, recipe in students.items():
            print(f"  {source} student: {recipe['parameters']:,} parameters (teacher {recipe['teacher_parameters']:,}), "
                  f"built in {recipe['build_seconds']:.0f}s: {_student_text(recipe)}")

        classifiers = {compression.TORCH_FP32: torch_model}
        sizes = {compression.TORCH_FP32: compression.checkpoint_size(model_dir)}
        for name, candidate in candidates.items():
            classifiers[name] = compression.load_candidate(candidate, work, labels=labels, max_length=max_length)
            sizes[name] = (work / candidate.file).stat().st_size
        predictions = {name: classifier.predict(texts, batch_size=compression.SCORING_BATCH_SIZE)
                       for name, classifier in classifiers.items()}
        latencies = compression.measure_latencies(classifiers, texts[: args.latency_rows], BATCH_SIZES, args.repeats)

    reference = predictions[compression.TORCH_FP32]
    results = {
        name: {
            "macro_f1": macro_f1(truth, predicted, labels),
            "agreement_with_fp32": sum(a == b for a, b in zip(predicted, reference)) / max(len(reference), 1),
            "latency_ms": latencies[name],
            "size_bytes": sizes[name],
            "build_seconds": candidates[name].build_seconds if name in candidates else 0.0,
        }
        for name, predicted in predictions.items()
    }
    print()
    print(_table(results))
    selection = compression.choose_variant(results, max_loss_points=args.budget, batch_sizes=[1, 32])
    print()
    print(f"kept by the compress rule (budget {args.budget:g} points, batch 1 and 32): {selection.chosen}")
    print(_verdict(results, selection.chosen))
    load_after = _load()
    if load_before is not None and load_after is not None:
        print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores")
        cores = os.cpu_count() or 1
        if load_before > cores or load_after > cores + 1:  # the benchmark itself keeps about `cores` busy
            print("warning: other processes competed for the cores; torch eager suffers most from that (its "
                  "threads spin), so speed-ups against it are inflated. Rerun on a quiet machine.")
    return 0


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _dataset() -> pd.DataFrame:
    texts, labels = pd.read_parquet(DATA / "texts.parquet"), pd.read_parquet(DATA / "labels.parquet")
    frame = texts.merge(labels[["id", "label"]], on="id")
    frame["split"] = [assign_split(str(key), validation=0.15, test=0.15, salt="tuneloop") for key in frame["id"]]
    return frame


def _model(explicit: Path | None, frame: pd.DataFrame) -> tuple[Path, str]:
    if explicit is not None:
        if read_metadata(explicit).get("kind") != "model":
            raise SystemExit(f"{explicit} is not a Model directory (tuneloop.json kind 'model')")
        return explicit, "--model"
    outputs = [path for root in dict.fromkeys([Path.cwd(), REPO])
               for path in (root / ".tuneloop" / "pipeline_root").glob("*/finetune/model")
               if (path / METADATA_FILE).is_file() and list(path.glob("*.safetensors"))]
    if outputs:
        newest = max(outputs, key=lambda path: (path / METADATA_FILE).stat().st_mtime)
        return newest, "the newest pipeline output"
    if (QUICK_MODEL / METADATA_FILE).is_file():
        return QUICK_MODEL, "cached quick fine-tune"
    return _quick_finetune(frame), "quick fine-tune, one epoch over the training split"


def _quick_finetune(frame: pd.DataFrame) -> Path:
    from tuneloop import training
    from tuneloop.config import parse_config

    print(f"no Model directory given or found: fine-tuning MiniLM-L6 briefly into {QUICK_MODEL}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-data-") as scratch:
        dataset = Path(scratch) / "dataset.parquet"
        frame.to_parquet(dataset, index=False)
        config = parse_config({
            "name": "benchmark", "state_dir": str(Path(scratch) / "state"),
            "data": {"texts": str(DATA / "texts.parquet"), "labels": str(DATA / "labels.parquet"),
                     "classes": ["ham", "spam"]},
            "training": {"epochs": 1, "batch_size": 32, "learning_rate": 1e-4, "max_length": 64},
        }, source="benchmark")
        training.run(config, dataset, QUICK_MODEL)
    return QUICK_MODEL


def _config(names: list[str], args: argparse.Namespace):
    """A config that lists the benchmark's variants and student settings (CPU serving)."""
    from tuneloop.config import parse_config

    return parse_config({
        "name": "benchmark",
        "data": {"texts": str(DATA / "texts.parquet"), "labels": str(DATA / "labels.parquet"), "classes": ["ham", "spam"]},
        "compression": {"variants": names, "distillation": {"student_layers": args.student_layers,
                                                            "epochs": args.distil_epochs},
                        "pruning": {"share": args.prune_share}},
    }, source="benchmark")


def _student_text(recipe: dict) -> str:
    if recipe["method"] == "distillation":
        return (f"{recipe['student_layers']} of {recipe['teacher_layers']} layers "
                f"{recipe['initialised_from_teacher_layers']}, {recipe['epochs']} epochs on {recipe['labelled_rows']} "
                f"rows, temperature {recipe['temperature']:g}, soft weight {recipe['soft_weight']:g}")
    shape = (f"heads {recipe['heads_per_layer'][0]}->{recipe['heads_per_layer'][1]}, neurons "
             f"{recipe['neurons_per_layer'][0]}->{recipe['neurons_per_layer'][1]} per layer"
             if recipe["unit"] == "heads_and_neurons" else f"layers kept {recipe['kept_layers']}")
    recovery = recipe.get("recovery") or {}
    return f"{shape}, importance on {recipe['importance_rows']} validation rows, recovery {recovery.get('seconds', 0):.0f}s"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    gpu = tensorrt_engine.unavailable_reason()
    gpu_text = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    if gpu is None:
        gpu_text += f", TensorRT {tensorrt_engine.environment()['version']}"
    return (f"machine: {cpu}, {os.cpu_count()} cores ({available_cpus()} usable; ONNX Runtime {default_threads()} "
            f"threads, torch {torch.get_num_threads()}), {gpu_text}; torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}")


def _table(results: dict[str, dict]) -> str:
    reference = results[compression.TORCH_FP32]
    header = (f"{'variant':<22} {'batch':>5} {'latency ms':>10} {'rows/s':>8} {'vs torch':>8} {'size MB':>8} "
              f"{'size':>5} {'macro-F1':>8} {'dF1 pts':>7} {'agree':>6} {'build s':>7}")
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        for batch in BATCH_SIZES:
            ms = result["latency_ms"][batch]
            lines.append(
                f"{name:<22} {batch:>5} {ms:>10.2f} {batch / ms * 1000:>8.0f} "
                f"{reference['latency_ms'][batch] / ms:>7.1f}x {result['size_bytes'] / 1e6:>8.1f} "
                f"{result['size_bytes'] / reference['size_bytes']:>5.0%} {result['macro_f1']:>8.4f} "
                f"{100 * (result['macro_f1'] - reference['macro_f1']):>+7.2f} {result['agreement_with_fp32']:>6.3f} "
                f"{result['build_seconds']:>7.0f}"
            )
    return "\n".join(lines)


def _verdict(results: dict[str, dict], chosen: str) -> str:
    reference, kept = results[compression.TORCH_FP32], results[chosen]
    checks = [
        ("batch-1 speed-up", reference["latency_ms"][1] / kept["latency_ms"][1], TARGETS["speedup_batch1"], ">=", "x"),
        ("batch-32 speed-up", reference["latency_ms"][32] / kept["latency_ms"][32], TARGETS["speedup_batch32"], ">=",
         "x"),
        ("size share of fp32", kept["size_bytes"] / reference["size_bytes"], TARGETS["size_share"], "<=", ""),
        ("macro-F1 points lost", 100 * (reference["macro_f1"] - kept["macro_f1"]), TARGETS["f1_loss_points"], "<=",
         ""),
    ]
    lines = []
    for label, value, target, op, unit in checks:
        met = value >= target if op == ">=" else value <= target
        lines.append(f"  {label:<22} {value:6.2f}{unit:<1}  target {op} {target:g}{unit}  {'met' if met else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
