"""Pods on one machine: each one a process with its own fresh working directory, ``HOME`` and temp dir,
and an environment built from a whitelist, never inherited from the rehearsal.

What a pod gets is what a Kubernetes pod of tuneloop gets:

- the image's environment (``PATH`` to the venv, locale, offline Hugging Face switches);
- the cluster's settings (object-store endpoint and region, ``MLFLOW_TRACKING_URI``,
  ``KF_PIPELINES_ENDPOINT``): the ``tuneloop-settings`` ConfigMap;
- the config file, read-only, at the path ``TUNELOOP_CONFIG`` names (the ConfigMap mount);
- the Secrets its step is given (``kubeflow.secrets`` of the config, by step), as environment variables.

Nothing else: a pod that reads a file another pod wrote to its own disk finds nothing there.
Pipeline tasks run through ``kfp.local``'s SubprocessRunner, with its subprocess call replaced by
:meth:`Cluster.run_task`, so each task is such a pod; its declared input and output artifacts are the
only files it shares (the pipeline root plays the artifact store).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

IMAGE_ENV = {
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
}
"""What the tuneloop image sets (docker/Dockerfile): no hub downloads, unbuffered logs."""


@dataclass
class PodResult:
    """A finished pod: its name, directory, exit code, log and run time."""

    name: str
    directory: Path
    returncode: int
    seconds: float

    @property
    def log_path(self) -> Path:
        return self.directory / "pod.log"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.rstrip().splitlines()[-lines:])


@dataclass
class Cluster:
    """Where pods live and what they are given.

    Args:
        root: the rehearsal's folder; pods get fresh folders under ``root/pods``.
        settings: the cluster-wide, non-secret environment (endpoints), as a ConfigMap holds it.
        secrets: ``{(secret name, key): value}``, the Kubernetes Secrets of the namespace.
        config_path: the cluster config file every pod reads (``TUNELOOP_CONFIG``).
    """

    root: Path
    settings: dict[str, str]
    secrets: dict[tuple[str, str], str] = field(repr=False)
    config_path: Path
    pods: list[PodResult] = field(default_factory=list)
    task_commands: dict[str, list[str]] = field(default_factory=dict)
    _counter: Iterator[int] = field(default_factory=itertools.count, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # what a pod gets ------------------------------------------------------------------------------

    def secret_env(self, step: str) -> dict[str, str]:
        """The Secrets ``step`` is given by the config's ``kubeflow.secrets``, as env vars.

        A Secret that does not exist fails the pod at start in Kubernetes; here it is an error too.
        """
        from tuneloop.config import load_config

        env = {}
        for entry in load_config(self.config_path).kubeflow.secrets:
            if entry.applies_to(step):
                try:
                    env[entry.env] = self.secrets[(entry.secret, entry.key)]
                except KeyError:
                    raise RuntimeError(f"pod for step {step}: secret {entry.secret!r} key {entry.key!r} does "
                                       f"not exist (CreateContainerConfigError)") from None
        return env

    def pod_env(self, directory: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The whole environment of a pod living in ``directory``."""
        venv_bin = str(Path(sys.executable).parent)
        tmp = directory / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {
            **IMAGE_ENV,
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "VIRTUAL_ENV": str(Path(venv_bin).parent),
            "HOME": str(directory),
            "TMPDIR": str(tmp),
            "XDG_CACHE_HOME": str(directory / ".cache"),
            "TUNELOOP_CONFIG": str(self.config_path),
            **self.settings,
        }
        env.update(extra or {})
        return env

    def new_pod_dir(self, name: str) -> Path:
        """A fresh, empty folder for one pod."""
        with self._lock:
            number = next(self._counter)
        directory = self.root / "pods" / f"{number:03d}-{name}"
        directory.mkdir(parents=True)
        return directory

    # running pods ---------------------------------------------------------------------------------

    def run(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float = 600) -> PodResult:
        """Run a pod to completion (``argv`` in a fresh folder); the log goes to ``<pod>/pod.log``."""
        directory = self.new_pod_dir(name)
        return self._run_in(name, directory, argv, self.pod_env(directory, env), timeout)

    def _run_in(self, name: str, directory: Path, argv: Sequence[str], env: dict[str, str],
                timeout: float) -> PodResult:
        started = time.monotonic()
        with open(directory / "pod.log", "wb") as log:
            process = subprocess.Popen(list(argv), cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                returncode = -signal.SIGKILL
                log.write(f"\n[rehearsal] pod {name} killed after {timeout:.0f}s\n".encode())
        result = PodResult(name, directory, returncode, time.monotonic() - started)
        with self._lock:
            self.pods.append(result)
        return result

    def start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> "RunningPod":
        """Start a long-running pod (a serving replica); stop it with :meth:`RunningPod.stop`."""
        directory = self.new_pod_dir(name)
        log = open(directory / "pod.log", "wb")
        process = subprocess.Popen(list(argv), cwd=directory, env=self.pod_env(directory, env), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return RunningPod(name, directory, process, log)

    def tuneloop(self, name: str, *args: str, step: str | None = None, secrets_of: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, timeout: float = 600) -> PodResult:
        """Run ``tuneloop <args>`` as a pod given the Secrets of ``step`` (or of each of ``secrets_of``)."""
        secret_env: dict[str, str] = {}
        for each in ([step] if step else []) + list(secrets_of):
            secret_env.update(self.secret_env(each))
        return self.run(name, [str(Path(sys.executable).with_name("tuneloop")), *args],
                        env={**secret_env, **(env or {})}, timeout=timeout)

    # pipeline tasks through kfp.local -------------------------------------------------------------

    def run_task(self, full_command: list[str], env_vars: Mapping[str, str] | None = None) -> int:
        """Replacement of ``kfp.local.subprocess_task_handler.run_local_subprocess``: the task runs as
        a pod of its step (fresh folder, whitelisted env, its Secrets); prints one line per task."""
        step = task_step(full_command)
        self.task_commands[step] = list(full_command)
        directory = self.new_pod_dir(f"task-{step}")
        env = self.pod_env(directory, {**self.secret_env(step), **(env_vars or {})})
        result = self._run_in(f"task-{step}", directory, full_command, env, timeout=1800)
        state = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode}, log {result.log_path})"
        print(f"    task {step:<18} {result.seconds:6.1f}s  {state}", flush=True)
        return result.returncode

    def rerun_task(self, step: str, name: str, *, parameters: Mapping[str, object] | None = None,
                   extra_env: Mapping[str, str] | None = None, timeout: float = 900) -> PodResult:
        """Run a pipeline task again as KFP's retry would: the same command in a new pod, with its
        outputs redirected to a fresh folder and ``parameters`` overriding input parameter values."""
        command = list(self.task_commands[step])
        directory = self.new_pod_dir(name)
        index = command.index("--executor_input") + 1
        command[index] = _redirected_executor_input(command[index], directory / "outputs", parameters or {})
        env = self.pod_env(directory, {**self.secret_env(step), **(extra_env or {})})
        return self._run_in(name, directory, command, env, timeout)

    @contextlib.contextmanager
    def kfp_pods(self) -> Iterator[None]:
        """While active, every ``kfp.local`` SubprocessRunner task runs through :meth:`run_task`."""
        from kfp.local import subprocess_task_handler

        original = subprocess_task_handler.run_local_subprocess
        subprocess_task_handler.run_local_subprocess = self.run_task
        try:
            yield
        finally:
            subprocess_task_handler.run_local_subprocess = original


@dataclass
class RunningPod:
    """A pod that keeps running until stopped (SIGTERM, as the kubelet does, then SIGKILL)."""

    name: str
    directory: Path
    process: subprocess.Popen
    _log: object = field(repr=False)

    @property
    def log(self) -> str:
        return (self.directory / "pod.log").read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 30) -> int:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(self.process)
        self._log.close()
        return self.process.returncode


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def task_step(full_command: Sequence[str]) -> str:
    """The component function a kfp.local task command runs (``--function_to_execute <name>``)."""
    command = list(full_command)
    if "--function_to_execute" in command:
        return command[command.index("--function_to_execute") + 1]
    return "task"


def _redirected_executor_input(executor_input: str, output_dir: Path, parameters: Mapping[str, object]) -> str:
    """The executor input with every output (artifacts and the output file) under ``output_dir``."""
    document = json.loads(executor_input)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs = document.get("outputs", {})
    for name, artifact_list in outputs.get("artifacts", {}).items():
        for number, artifact in enumerate(artifact_list.get("artifacts", [])):
            target = output_dir / f"{name}-{number}"
            artifact["uri"] = str(target)
    if "outputFile" in outputs:
        outputs["outputFile"] = str(output_dir / "executor_output.json")
    values = document.setdefault("inputs", {}).setdefault("parameterValues", {})
    values.update(parameters)
    return json.dumps(document)
