"""The local server: serve a model version on this machine with ``bentoml serve serving/``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tuneloop.config import load_config
from tuneloop.deployment.bento import serving_dir


def serve(
    config_path: str | os.PathLike[str],
    *,
    port: int | None = None,
    version: str | None = None,
    host: str = "127.0.0.1",
    check: bool = True,
    extra_args: list[str] | None = None,
) -> int:
    """Serve the champion (or ``version``) on this machine with ``bentoml serve serving/``; blocks.

    With ``check`` the model is resolved, downloaded and loaded here first, so a missing champion,
    an unknown version or a corrupt artifact fails with one clear error before any server starts;
    the server is then pinned to the version that was checked (restart to pick up a new champion).

    Returns:
        the exit status of the server process.

    Raises:
        ConfigError, RegistryError, ModelError: the configuration or the model is unusable.
    """
    from tuneloop import serving

    config_path = Path(config_path).resolve()
    config = load_config(config_path)
    env = dict(os.environ)
    env[serving.CONFIG_ENV] = str(config_path)
    env[serving.WORKDIR_ENV] = os.getcwd()  # the server's workers run inside serving/
    requested = version or env.get(serving.VERSION_ENV) or config.deployment.model_version
    model_dir = env.get(serving.MODEL_DIR_ENV)
    if check:
        if model_dir:
            serving.load_model(model_dir, requested or "local")
        else:
            requested, directory = serving.fetch_model(config, requested)
            serving.load_model(directory, requested)
    if requested:
        env[serving.VERSION_ENV] = str(requested)
    command = [*_bentoml_command(), "serve", str(serving_dir()), "--host", host,
               "--port", str(port or config.deployment.port), *(extra_args or [])]
    print(f"serving {config.registry.model_name} version {requested or 'champion'}: {' '.join(command)}", flush=True)
    return run_server(command, env)


def run_server(command: list[str], env: dict[str, str], *, grace_s: float = 60.0) -> int:
    """Run the server in the foreground and return its exit status. Ctrl+C reaches the server from the
    terminal and SIGTERM is forwarded to it; either way the server gets ``grace_s`` seconds to shut
    down cleanly (flushing the prediction log) before it is killed."""
    import signal

    process = subprocess.Popen(command, env=env)

    def forward(signum, _frame):
        if process.poll() is None:
            process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        try:
            return process.wait()
        except KeyboardInterrupt:
            try:
                process.wait(timeout=grace_s)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
            return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _bentoml_command() -> list[str]:
    executable = Path(sys.executable).with_name("bentoml")
    if executable.is_file():
        return [str(executable)]
    return [sys.executable, "-m", "bentoml"]
