"""The wheel is enough: installed from it alone, tuneloop compiles the shipped pipelines by name
from an empty directory, and nothing is found through the working directory or ``sys.path`` scans.

The fast tests run the installed CLI from an empty directory that holds decoys (a ``pipelines/``
and a ``serving/`` that fail when used). The slow test builds the wheel from a copy of the sources,
installs it alone into a fresh virtualenv that sees the dependencies of ``.venv`` but not the repository
(nor its editable install), and compiles both pipelines there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from tuneloop import deployment, orchestration

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_FOLDERS = ("tuneloop", "components", "pipelines", "serving", "feature_repo")
WHEEL_MUST_HOLD = (
    "pipelines/training.py", "pipelines/monitoring.py", "pipelines/cluster.py", "components/__init__.py",
    "components/training.py", "serving/service.py", "serving/bentofile.yaml", "serving/README.md",
    "feature_repo/feature_store.yaml", "feature_repo/definitions.py", "feature_repo/cluster/feature_store.yaml",
    "tuneloop/cli.py", "tuneloop/orchestration.py", "tuneloop/deployment/__init__.py", "tuneloop/serving/__init__.py",
)


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _with_decoys(directory: Path) -> Path:
    """An otherwise empty directory whose pipelines/ and serving/ break anything that reads them."""
    (directory / "pipelines").mkdir(parents=True)
    (directory / "pipelines" / "__init__.py").write_text("raise RuntimeError('decoy pipelines/ imported')\n")
    (directory / "pipelines" / "training.py").write_text("raise RuntimeError('decoy training.py imported')\n")
    (directory / "serving").mkdir()
    (directory / "serving" / "service.py").write_text("raise RuntimeError('decoy service')\n")
    (directory / "serving" / "bentofile.yaml").write_text("service: decoy\n")
    return directory


def _compile_both(tuneloop: list[str], cwd: Path, env: dict[str, str]) -> None:
    for name in ("training", "monitoring"):
        result = subprocess.run([*tuneloop, "compile", name, "--output", f"out/{name}.yaml"], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        spec = next(yaml.safe_load_all((cwd / "out" / f"{name}.yaml").read_text(encoding="utf-8")))
        assert spec["pipelineInfo"]["name"] == f"tuneloop-{name}"
        assert spec["root"]["dag"]["tasks"].keys() == {"exit-handler-1", "notify"}


def test_shipped_pipelines_and_folders_come_from_the_installed_packages():
    assert orchestration.shipped_pipeline_file("training") == ROOT / "pipelines" / "training.py"
    assert deployment.serving_dir() == ROOT / "serving"
    training = orchestration.load_pipeline("training")
    assert training.name == "tuneloop-training"
    assert orchestration.load_pipeline("monitoring").name == "tuneloop-monitoring"


def test_compile_by_name_from_a_directory_with_decoys(tmp_path):
    """The installed CLI never looks at the working directory's pipelines/ (fast variant). It runs as
    the console script: ``python -m`` would itself put the working directory first on ``sys.path``."""
    directory = _with_decoys(tmp_path / "project")
    script = Path(sys.executable).with_name("tuneloop")
    if not script.is_file():
        pytest.skip(f"no tuneloop console script beside {sys.executable}")
    _compile_both([str(script)], directory, _clean_env())


def test_serving_dir_ignores_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(_with_decoys(tmp_path))
    monkeypatch.delenv(deployment.SERVING_DIR_ENV, raising=False)
    assert deployment.serving_dir() == ROOT / "serving"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The tuneloop wheel, built from a copy of the sources (the checkout gets no build/ folder)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in SHIPPED_FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dist),
         str(source)], capture_output=True, text=True, timeout=600, env=_clean_env(),
    )
    assert result.returncode == 0, result.stderr
    (built,) = dist.glob("tuneloop-*.whl")
    return built


@pytest.mark.slow
@pytest.mark.ci
def test_wheel_holds_the_shipped_folders(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in WHEEL_MUST_HOLD if name not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert not [name for name in names if name.startswith(("tests/", "examples/", "k8s/", "benchmarks/"))]


@pytest.mark.slow
@pytest.mark.ci
def test_compile_from_an_empty_directory_with_only_the_wheel_installed(wheel, tmp_path):
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from .venv, appended after the new venv's own site-packages. A path line of
    # a .pth file does not run the .pth files inside that folder, so tuneloop's editable finder stays off.
    dependencies = sysconfig.get_path("purelib")
    (site_packages / "dependencies-from-dev-venv.pth").write_text(dependencies + "\n", encoding="utf-8")
    env = _clean_env()
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "--quiet", str(wheel)], capture_output=True, text=True, timeout=600,
                             env=env)
    assert install.returncode == 0, install.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    probe = subprocess.run(
        [python, "-c", "import sys, tuneloop.cli, pipelines, serving, components, feature_repo; "
                       "print(tuneloop.cli.__file__, pipelines.__file__, serving.__file__, components.__file__, "
                       "feature_repo.__file__); print(any('editable' in type(f).__name__.lower() or "
                       "'editable' in getattr(f, '__module__', '') for f in sys.meta_path))"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    files, editable = probe.stdout.splitlines()
    assert editable == "False", "the editable install's finder must not be active"
    for path in files.split():
        assert Path(path).is_relative_to(site_packages), f"{path} does not come from the wheel"

    out = empty / "out"
    _compile_both([str(environment / "bin" / "tuneloop")], empty, env)
    assert sorted(p.name for p in empty.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == [
        "monitoring.yaml", "training.yaml"]
