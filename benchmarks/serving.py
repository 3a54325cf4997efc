"""Serving benchmark: the tuneloop service against a plain BentoML + PyTorch service, in one run.

(a) ``bentoml serve serving/``: the registry's compressed model (ONNX Runtime, int8 when compression
    kept it) behind adaptive batching, input guard and prediction log: what ``tuneloop serve`` runs.
(b) ``bentoml serve benchmarks.serving:PlainTorchService``: the same fine-tuned checkpoint in PyTorch
    eager (Hugging Face ``transformers``), one request at a time, no batching: the plain-library
    baseline.

Both servers run on this machine, one after the other, on 127.0.0.1. A separate client process
(asyncio + aiohttp, one event loop, niced) drives each with the same closed-loop load: at each
concurrency C, C workers each send one text per request (texts of the held-out split, in the same
order for both servers) and send the next as soon as the answer arrives, for at most ``--requests``
requests or ``--seconds`` seconds. Both servers get the same thread budget (one fewer than the CPUs
for the model, a core for the HTTP server). It prints requests/s, p50 and p99 latency of (a) and (b) and the
throughput ratio a/b per concurrency, counts non-200 answers (a 503 means the adaptive batcher shed
load), and then checks that (a) labels the held-out (test) split with the macro-F1 the evaluate stage
reported for that version.

It needs a trained model: run ``make demo`` (or ``tuneloop run --local --config
examples/sms_spam/tuneloop.yaml``) first. The champion of that registry is benchmarked (``--version``
picks another); its uncompressed checkpoint is found in the local pipeline outputs
(``<state_dir>/pipeline_root/<pipeline run>/finetune/model``, the run recorded on the version) or given
with ``--torch-model``.

Usage (from the repository root):

    .venv/bin/python benchmarks/serving.py --config examples/sms_spam/tuneloop.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bentoml

ROOT = Path(__file__).resolve().parents[1]
PLAIN_MODEL_ENV = "TUNELOOP_BENCH_TORCH_MODEL"


# --------------------------------------------------------------------------------------------
# (b) the plain baseline service


@bentoml.service(name="plain-torch", workers=1, traffic={"timeout": 300})
class PlainTorchService:
    """The fine-tuned checkpoint in PyTorch eager, one request at a time (no adaptive batching)."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        directory = os.environ[PLAIN_MODEL_ENV]
        # The thread budget of (a): one fewer than the CPUs, leaving a core to the HTTP server. With
        # torch's default (all CPUs) its OpenMP threads spin against the event loop and, on a small or
        # shared machine, eager inference gets many times slower, which would flatter (a).
        from tuneloop.runtime import available_cpus

        torch.set_num_threads(max(1, available_cpus() - 1))
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
        metadata_file = Path(directory) / "tuneloop.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
        id2label = self.model.config.id2label
        self.labels = metadata.get("labels") or [id2label[i] for i in sorted(id2label)]
        self.max_length = int(metadata.get("max_length") or 128)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")

    @bentoml.api(route="/predict")
    async def predict(self, texts: list[str]) -> list[dict]:
        # One dedicated inference thread: torch's OpenMP pool belongs to the calling thread, and a
        # sync API hops between the threads of anyio's pool, each spinning up (and spinning) a pool of
        # its own, which on a small CPU makes eager torch look far slower than it is.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._predict, texts)

    def _predict(self, texts: list[str]) -> list[dict]:
        with self.torch.inference_mode():
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                     return_tensors="pt")
            probabilities = self.torch.softmax(self.model(**encoded).logits, dim=-1).tolist()
        return [
            {"label": self.labels[max(range(len(row)), key=row.__getitem__)],
             "probabilities": dict(zip(self.labels, row))}
            for row in probabilities
        ]


# --------------------------------------------------------------------------------------------
# The load client (runs in its own process: `serving.py --client URL ...`)


async def _closed_loop(url: str, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def worker(session):
        for index in counter:
            if time.perf_counter() >= deadline:
                return
            body = {"texts": [texts[index % len(texts)]]}
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
                status = response.status
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan"),
        "statuses": statuses,
    }


async def _label_all(url: str, texts: list[str], batch: int, concurrency: int) -> list:
    import aiohttp

    chunks = [texts[start : start + batch] for start in range(0, len(texts), batch)]
    results: list = [None] * len(chunks)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(session, index):
        async with semaphore, session.post(url, json={"texts": chunks[index]}) as response:
            body = await response.json(content_type=None)
            failed = [{"error": response.status, "body": body}] * len(chunks[index])
            results[index] = body if response.status == 200 else failed

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, i) for i in range(len(chunks))))
    return [item for chunk in results for item in chunk]


def client_main(arguments: list[str]) -> None:
    """Entry of the client process: reads a JSON job on stdin, writes JSON results on stdout."""
    try:
        os.nice(5)
    except OSError:
        pass
    job = json.loads(sys.stdin.read())
    if job["kind"] == "load":
        output = []
        for concurrency in job["concurrency"]:
            output.append(asyncio.run(_closed_loop(job["url"], job["texts"], concurrency, job["requests"],
                                                   job["seconds"])))
    else:
        output = asyncio.run(_label_all(job["url"], job["texts"], job["batch"], job["concurrency"]))
    json.dump(output, sys.stdout)


def run_client(job: dict) -> object:
    process = subprocess.run([sys.executable, __file__, "--client"], input=json.dumps(job), capture_output=True,
                             text=True, check=False)
    if process.returncode != 0:
        raise RuntimeError(f"load client failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout)


# --------------------------------------------------------------------------------------------
# Servers


class Server:
    """``bentoml serve`` in its own process group on 127.0.0.1, stopped with SIGINT."""

    def __init__(self, name: str, target: str, port: int, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.port = name, port
        self.log = log_dir / f"{name}.log"
        command = [str(Path(sys.executable).with_name("bentoml")), "serve", target, "--host", "127.0.0.1",
                   "--port", str(port)]
        if ":" in target:  # an import string: resolve it from the repository root
            command += ["--working-dir", str(ROOT)]
        # The working directory stays the caller's: the config's relative state_dir resolves as here.
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=self.log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited ({self.process.returncode}); see {self.log}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server not ready within {timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# --------------------------------------------------------------------------------------------
# Main


def _resolve(args):
    import pandas as pd

    from tuneloop import registry, serving
    from tuneloop.config import load_config
    from tuneloop.datasets import load_split

    config = load_config(args.config)
    version, compressed_dir = serving.fetch_model(config, args.version)
    row = next((r for r in registry.list_versions(config) if r["version"] == version), None)
    if row is None:
        raise SystemExit(f"version {version} not found in the registry")
    torch_dir = Path(args.torch_model) if args.torch_model else (
        Path(config.state_dir) / "pipeline_root" / row["pipeline_run"] / "finetune" / "model")
    if not (torch_dir / "config.json").is_file():
        raise SystemExit(f"no fine-tuned checkpoint at {torch_dir}; pass --torch-model DIR (the finetune output)")
    mlflow = registry.client(config)
    dataset_uri = mlflow.get_model_version(config.registry.model_name, version).tags.get("tuneloop.dataset_uri")
    from mlflow.artifacts import download_artifacts

    scratch = Path(tempfile.mkdtemp(prefix="tuneloop-bench-data-"))
    dataset = Path(download_artifacts(artifact_uri=dataset_uri, dst_path=str(scratch)))
    test = load_split(dataset, "test")
    assert isinstance(test, pd.DataFrame)
    return config, version, compressed_dir, torch_dir, row, test


def _row(a: dict, b: dict) -> str:
    ratio = a["rps"] / b["rps"] if b["rps"] else float("inf")
    errors = lambda r: sum(n for s, n in r["statuses"].items() if str(s) != "200")  # noqa: E731
    return (f"{a['concurrency']:>11} | {a['rps']:>7.1f} {a['p50_ms']:>8.1f} {a['p99_ms']:>8.1f} {errors(a):>5} | "
            f"{b['rps']:>7.1f} {b['p50_ms']:>8.1f} {b['p99_ms']:>8.1f} {errors(b):>5} | {ratio:>4.1f}x")


def main() -> int:
    if "--client" in sys.argv:
        client_main(sys.argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/sms_spam/tuneloop.yaml")
    parser.add_argument("--version", default=None, help="registry version (default: the champion)")
    parser.add_argument("--torch-model", default=None, help="the uncompressed fine-tuned checkpoint (finetune output)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated closed-loop concurrencies")
    parser.add_argument("--requests", type=int, default=600, help="most requests per concurrency level")
    parser.add_argument("--seconds", type=float, default=30.0, help="most seconds per concurrency level")
    parser.add_argument("--warmup", type=int, default=40, help="requests sent before measuring each server")
    parser.add_argument("--f1-tolerance", type=float, default=0.005,
                        help="largest |served - evaluated| test macro-F1 difference accepted")
    parser.add_argument("--port", type=int, default=3301)
    args = parser.parse_args()

    from tuneloop.metrics import macro_f1

    config, version, compressed_dir, torch_dir, row, test = _resolve(args)
    text_column, label_column = config.data.text_column, config.data.label_column
    limit = config.deployment.max_text_chars
    # The model reads at most max_length tokens, far fewer than max_text_chars characters, so clipping
    # over-long texts to the service's input limit changes no prediction.
    texts = [str(t)[:limit] if str(t).strip() else "(empty)" for t in test[text_column]]
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    print(f"model {config.registry.model_name} version {version}: (a) {compressed_dir} "
          f"({json.loads((compressed_dir / 'tuneloop.json').read_text()).get('precision', '?')}), "
          f"(b) {torch_dir} (torch fp32 eager); {len(texts)} held-out texts; cpus {os.cpu_count()}", flush=True)
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    logs = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    load = {"kind": "load", "texts": texts, "concurrency": levels, "requests": args.requests, "seconds": args.seconds}
    warm = {"kind": "load", "texts": texts, "concurrency": [4], "requests": args.warmup, "seconds": 60}
    results = {}
    served = None
    for name, target, env in [
        ("ours", str(ROOT / "serving"), {"TUNELOOP_CONFIG": str(Path(args.config).resolve()),
                                          "TUNELOOP_WORKDIR": os.getcwd(), "TUNELOOP_MODEL_VERSION": version,
                                          "TUNELOOP_PREDICTION_LOG_DIR": str(logs / "predictions")}),
        ("plain", "benchmarks.serving:PlainTorchService", {PLAIN_MODEL_ENV: str(torch_dir)}),
    ]:
        server = Server(name, target, args.port, env, logs)
        try:
            server.wait_ready()
            run_client({**warm, "url": f"{server.url}/predict"})
            results[name] = run_client({**load, "url": f"{server.url}/predict"})
            if name == "ours":
                served = run_client({"kind": "label", "url": f"{server.url}/predict", "texts": texts, "batch": 32,
                                     "concurrency": 4})
        finally:
            server.stop()

    print("\nclosed loop, one text per request; latency in ms; err = non-200 answers")
    print(f"{'concurrency':>11} | {'(a) ours':^29} | {'(b) plain torch':^29} | a/b")
    print(f"{'':>11} | {'req/s':>7} {'p50':>8} {'p99':>8} {'err':>5} | {'req/s':>7} {'p50':>8} {'p99':>8} "
          f"{'err':>5} | req/s")
    for a, b in zip(results["ours"], results["plain"]):
        print(_row(a, b))
    shed = sum(r["statuses"].get("503", 0) for r in results["ours"])

    rejected = [item for item in served if "label" not in item]
    predicted = [item.get("label", "") for item in served]
    f1 = macro_f1(list(test[label_column].astype(str)), predicted, config.data.classes)
    reported = float(row["metrics"].get("macro_f1", float("nan")))
    matches = abs(f1 - reported) <= args.f1_tolerance and not rejected
    print(f"\nheld-out test split ({len(texts)} texts) served by (a): macro-F1 {f1:.4f}; evaluate reported "
          f"{reported:.4f} for version {version}: {'match' if matches else 'MISMATCH'} "
          f"(|diff| {abs(f1 - reported):.4f}, tolerance {args.f1_tolerance}); rejected {len(rejected)}")
    print(f"503 answers of (a): {shed}; load average before {load_before}, after "
          f"{tuple(round(x, 2) for x in os.getloadavg())}; server logs: {logs}")
    return 0 if matches and shed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
