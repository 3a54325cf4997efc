"""MLflow registry (real SQLite in tmp): versions, lineage tags, aliases, all-or-nothing."""

import json

import pytest

from tests.conftest import make_config
from tuneloop import registry
from tuneloop.artifacts import write_metadata
from tuneloop.errors import RegistryError

BLESSED = {"blessed": True, "checks": [{"name": "test_macro_f1", "value": 0.95, "threshold": 0.9, "passed": True}],
           "test_metrics": {"accuracy": 0.97, "macro_f1": 0.95, "rows": 10}}


@pytest.fixture
def compressed_dir(tmp_path):
    directory = tmp_path / "compressed"
    write_metadata(directory, {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "int8",
                               "labels": ["ham", "spam"], "base_model": "tiny", "data_fingerprint": "f00d"})
    (directory / "model.onnx").write_bytes(b"onnx bytes")
    return directory


def test_register_tags_lineage_and_moves_aliases(tmp_path, compressed_dir, tiny_dataset):
    config = make_config(tmp_path)
    assert registry.list_versions(config) == []
    assert registry.alias_version(config, registry.CHAMPION) is None
    first = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-1")
    second = registry.register(config, compressed_dir, BLESSED, tiny_dataset, pipeline_run="run-2")
    assert (first.version, second.version) == ("1", "2")
    versions = registry.list_versions(config)
    assert [v["version"] for v in versions] == ["2", "1"]
    assert versions[0]["aliases"] == ["challenger", "champion"] and versions[1]["aliases"] == []
    assert versions[0]["metrics"]["macro_f1"] == 0.95
    assert versions[0]["data_fingerprint"] == "f00d" and versions[0]["pipeline_run"] == "run-2"
    champion = registry.download_champion(config, tmp_path / "download")
    assert champion.version == "2"
    assert json.loads((champion.directory / "tuneloop.json").read_text())["precision"] == "int8"


def test_unblessed_model_is_never_registered(tmp_path, compressed_dir, tiny_dataset):
    config = make_config(tmp_path)
    with pytest.raises(RegistryError, match="did not bless"):
        registry.register(config, compressed_dir, {"blessed": False, "checks": []}, tiny_dataset)
    assert registry.list_versions(config) == []


def test_failed_alias_leaves_no_version_behind(tmp_path, compressed_dir, tiny_dataset, monkeypatch):
    config = make_config(tmp_path)
    registry.register(config, compressed_dir, BLESSED, tiny_dataset)
    from mlflow.tracking import MlflowClient

    def refuse(self, name, alias, version):
        raise RuntimeError("alias store offline")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(RegistryError, match="could not set aliases"):
        registry.register(config, compressed_dir, BLESSED, tiny_dataset)
    monkeypatch.undo()
    versions = registry.list_versions(config)
    assert [v["version"] for v in versions] == ["1"] and versions[0]["aliases"] == ["challenger", "champion"]
