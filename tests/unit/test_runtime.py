"""Loading model directories for inference: torch, ONNX Runtime, and clear errors for the rest."""

import importlib.util
import shutil

import numpy as np
import pytest

from tuneloop.artifacts import read_metadata, write_metadata
from tuneloop.errors import ModelError
from tuneloop.runtime import (
    Classifier,
    OnnxClassifier,
    TorchClassifier,
    default_threads,
    load_classifier,
)

TEXTS = [
    "WINNER!! Claim your free prize now",
    "ok",
    "I'll be home soon, do you want me to pick up some milk on the way back?",
    "",
    "See you at the library at 3",
]


def make_model_dir(checkpoint, target, **overrides):
    """A Model directory: the tiny checkpoint plus the tuneloop.json the training stage writes."""
    shutil.copytree(checkpoint, target)
    metadata = {
        "kind": "model", "labels": ["ham", "spam"], "max_length": 32, "base_model": "tiny-bert",
        "data_fingerprint": "fp123", "text_column": "text", "label_column": "label",
        "metrics": {"validation": {"macro_f1": 0.5}},
    }
    write_metadata(target, {**metadata, **overrides})
    return target


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    return make_model_dir(tiny_checkpoint, tmp_path_factory.mktemp("runtime") / "model")


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory):
    """A Compressed Model directory holding an fp32 export of the tiny model."""
    from tests.conftest import export_compressed_fp32

    return export_compressed_fp32(model_dir, tmp_path_factory.mktemp("runtime-onnx") / "compressed")


def torch_has_cuda():
    import torch

    return torch.cuda.is_available()


def copy_with(directory, target, **metadata_changes):
    shutil.copytree(directory, target)
    write_metadata(target, {**read_metadata(directory), **metadata_changes})
    return target


def test_model_directory_loads_in_torch(model_dir):
    classifier = load_classifier(model_dir)
    assert isinstance(classifier, TorchClassifier) and isinstance(classifier, Classifier)
    probabilities = classifier.predict_proba(TEXTS, batch_size=2)
    assert probabilities.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert set(classifier.predict(TEXTS)) <= {"ham", "spam"}
    # dynamic padding: a text scores the same alone or in a padded batch
    np.testing.assert_allclose(classifier.predict_proba(TEXTS, batch_size=1), probabilities, atol=1e-5)


def test_onnx_directory_matches_torch(model_dir, onnx_dir):
    classifier = load_classifier(onnx_dir)
    assert isinstance(classifier, OnnxClassifier) and classifier.labels == ["ham", "spam"]
    expected = TorchClassifier(model_dir).predict_proba(TEXTS)
    np.testing.assert_allclose(classifier.predict_proba(TEXTS, batch_size=3), expected, atol=1e-5)
    assert classifier.predict(TEXTS) == TorchClassifier(model_dir).predict(TEXTS)
    assert classifier.predict_proba([]).shape == (0, 2)


def test_truncates_to_max_length(onnx_dir):
    classifier = load_classifier(onnx_dir)
    long_text = " ".join(["word"] * 500)
    assert classifier.predict_proba([long_text]).shape == (1, 2)
    assert classifier._encode([long_text], "np")["input_ids"].shape[1] == 32


def test_corrupt_onnx_file_fails_at_load(onnx_dir, tmp_path):
    broken = copy_with(onnx_dir, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"\x00garbage, not a protobuf\xff" * 10)
    with pytest.raises(ModelError, match="model.onnx") as raised:
        load_classifier(broken)
    assert raised.value.path == str(broken / "model.onnx")


def test_missing_onnx_file_fails_at_load(onnx_dir, tmp_path):
    missing = copy_with(onnx_dir, tmp_path / "missing")
    (missing / "model.onnx").unlink()
    with pytest.raises(ModelError, match="no model.onnx"):
        load_classifier(missing)


def test_label_count_must_match_the_graph(onnx_dir, tmp_path):
    three = copy_with(onnx_dir, tmp_path / "three", labels=["ham", "spam", "eggs"])
    with pytest.raises(ModelError, match="outputs 2 logits"):
        load_classifier(three)


def test_tensorrt_without_gpu_is_a_clear_error(onnx_dir, tmp_path):
    engine = copy_with(onnx_dir, tmp_path / "engine", runtime="tensorrt", precision="fp16")
    if importlib.util.find_spec("tensorrt") is not None and torch_has_cuda():
        pytest.skip("this machine has a CUDA device and TensorRT")
    with pytest.raises(ModelError, match="needs an NVIDIA GPU with TensorRT; this machine has none"):
        load_classifier(engine)


def test_unknown_runtime_and_missing_metadata(onnx_dir, tmp_path):
    with pytest.raises(ModelError, match="unknown runtime 'tflite'"):
        load_classifier(copy_with(onnx_dir, tmp_path / "odd", runtime="tflite"))
    with pytest.raises(ModelError, match="no tuneloop.json"):
        load_classifier(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_classifier(tmp_path / "nowhere")


def test_thread_count(monkeypatch):
    monkeypatch.setenv("TUNELOOP_ORT_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("TUNELOOP_ORT_THREADS")
    assert default_threads() >= 1
    monkeypatch.setenv("TUNELOOP_ORT_THREADS", "many")
    with pytest.raises(ModelError, match="TUNELOOP_ORT_THREADS"):
        default_threads()


def test_tensorrt_without_its_module_is_the_same_clear_error(onnx_dir, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tuneloop.tensorrt_engine" else real_find_spec(name, *args))
    engine = copy_with(onnx_dir, tmp_path / "engine", runtime="tensorrt", precision="int8")
    with pytest.raises(ModelError, match="needs an NVIDIA GPU with TensorRT; this machine has none") as raised:
        load_classifier(engine)
    assert raised.value.field == "runtime"
