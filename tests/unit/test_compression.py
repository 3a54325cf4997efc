"""Compression exports a faithful ONNX graph, quantizes within the budget, and writes the contract."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import make_config
from tuneloop import compression
from tuneloop.artifacts import write_metadata
from tuneloop.compression import ONNX_FP32, ONNX_INT8, TORCH_FP32, choose_variant, export_onnx
from tuneloop.datasets import load_split
from tuneloop.errors import CompressionError, DataError
from tuneloop.runtime import OnnxClassifier, TorchClassifier, load_classifier

TEXTS = ["x", "WINNER!! Claim your free prize now, call 09061701461", "ok lar", "see you at 3 tomorrow then"]
VARIANT_KEYS = {"latency_ms", "size_bytes", "macro_f1", "agreement_with_fp32"}


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    """A Model directory: the tiny checkpoint plus the tuneloop.json the training stage writes."""
    target = tmp_path_factory.mktemp("compression") / "model"
    shutil.copytree(tiny_checkpoint, target)
    write_metadata(target, {
        "kind": "model", "labels": ["ham", "spam"], "max_length": 32, "base_model": "tiny-bert",
        "data_fingerprint": "fp123", "text_column": "text", "label_column": "label",
        "metrics": {"validation": {"macro_f1": 0.5, "accuracy": 0.6}},
    })
    return target


def compression_config(tmp_path, **settings):
    return make_config(tmp_path, compression={"latency_batch_sizes": [1, 4], "latency_repeats": 1, **settings})


def test_onnx_fp32_logits_match_torch(model_dir, tmp_path):
    torch_model = TorchClassifier(model_dir)
    exporter = export_onnx(torch_model, tmp_path / "model.onnx", opset=17)
    assert exporter in {"torchscript", "dynamo"}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert session.get_outputs()[0].name == "logits"
    for batch in (TEXTS[:1], TEXTS):  # batch and sequence axes are dynamic
        encoded = torch_model.tokenizer(batch, padding=True, truncation=True, max_length=32, return_tensors="np")
        feed = {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
        np.testing.assert_allclose(session.run(None, feed)[0], torch_model._logits(batch), atol=1e-4)


def test_dynamo_exporter_takes_over_when_torchscript_fails(model_dir, tmp_path, monkeypatch):
    real_export = compression._torch_export

    def no_torchscript(*args, dynamo, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript exporter was removed")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(compression, "_torch_export", no_torchscript)
    torch_model = TorchClassifier(model_dir)
    assert export_onnx(torch_model, tmp_path / "model.onnx", opset=18) == "dynamo"
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    encoded = torch_model.tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="np")
    feed = {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()}
    np.testing.assert_allclose(session.run(None, feed)[0], torch_model._logits(TEXTS), atol=1e-4)


def test_compressed_directory_honours_the_contract(model_dir, tiny_dataset, tmp_path):
    output = tmp_path / "compressed"
    summary = compression.run(compression_config(tmp_path, max_f1_loss_points=100), model_dir, tiny_dataset, output)

    assert {p.name for p in output.iterdir()} >= {"model.onnx", "tokenizer.json", "tokenizer_config.json",
                                                  "tuneloop.json"}
    assert not list(output.glob("*.safetensors")), "the compressed model carries no torch weights"
    metadata = json.loads((output / "tuneloop.json").read_text())
    assert metadata["kind"] == "compressed_model" and metadata["runtime"] == "onnxruntime"
    assert metadata["precision"] == "int8" and metadata["chosen"] == ONNX_INT8 == summary.chosen
    assert metadata["labels"] == ["ham", "spam"] and metadata["max_length"] == 32
    assert (metadata["base_model"], metadata["data_fingerprint"]) == ("tiny-bert", "fp123")
    assert (metadata["text_column"], metadata["label_column"]) == ("text", "label")
    assert metadata["source_metrics"]["validation"]["macro_f1"] == 0.5
    assert set(metadata["variants"]) == {TORCH_FP32, ONNX_FP32, ONNX_INT8}
    for variant in metadata["variants"].values():
        assert set(variant) == VARIANT_KEYS
        assert set(variant["latency_ms"]) == {"1", "4"} and all(ms > 0 for ms in variant["latency_ms"].values())
        assert variant["size_bytes"] > 0 and 0.0 <= variant["agreement_with_fp32"] <= 1.0
    assert metadata["variants"][ONNX_FP32]["agreement_with_fp32"] == 1.0
    assert metadata["variants"][ONNX_INT8]["size_bytes"] < metadata["variants"][ONNX_FP32]["size_bytes"]
    assert (output / "model.onnx").stat().st_size == metadata["variants"][ONNX_INT8]["size_bytes"]
    assert set(metadata["latency_speedup"]) == {"1", "4"} and "within the budget" in metadata["reason"]
    assert metadata["size_ratio"] == pytest.approx(summary.size_ratio) and metadata["size_ratio"] < 1.0
    change = 100 * (metadata["variants"][ONNX_INT8]["macro_f1"] - metadata["variants"][TORCH_FP32]["macro_f1"])
    assert metadata["macro_f1_change_points"] == pytest.approx(change, abs=1e-3)

    metrics = summary.to_metrics()
    assert metrics["int8_chosen"] == 1.0 and "latency_ms_onnx_int8_batch1" in metrics
    assert all(isinstance(value, float) for value in metrics.values())

    classifier = load_classifier(output)
    assert isinstance(classifier, OnnxClassifier)
    assert set(classifier.predict(TEXTS)) <= {"ham", "spam"}


class Int8GetsEverythingWrong(OnnxClassifier):
    """The int8 variant answers the wrong label for every validation row; fp32 behaves."""

    wrong: dict[str, str] = {}

    def predict_proba(self, texts, batch_size=32):
        probabilities = super().predict_proba(texts, batch_size)
        if "int8" not in self.model_path.name:
            return probabilities
        rows = [self.labels.index(self.wrong.get(text, "ham")) for text in texts]
        return np.eye(len(self.labels), dtype=np.float32)[rows]


def test_int8_over_budget_keeps_fp32_with_a_reason(model_dir, tiny_dataset, tmp_path, monkeypatch):
    validation = load_split(tiny_dataset, "validation")
    Int8GetsEverythingWrong.wrong = {
        text: "spam" if label == "ham" else "ham" for text, label in zip(validation["text"], validation["label"])
    }
    monkeypatch.setattr(compression, "OnnxClassifier", Int8GetsEverythingWrong)
    output = tmp_path / "compressed"
    summary = compression.run(compression_config(tmp_path, max_f1_loss_points=0), model_dir, tiny_dataset, output)

    assert summary.macro_f1[TORCH_FP32] > 0.0 and summary.macro_f1[ONNX_INT8] == 0.0
    assert summary.chosen == ONNX_FP32 and summary.precision == "fp32"
    metadata = json.loads((output / "tuneloop.json").read_text())
    assert metadata["precision"] == "fp32" and metadata["chosen"] == ONNX_FP32
    assert "over the budget of 0 points" in metadata["reason"] and "kept ONNX fp32" in metadata["reason"]
    assert metadata["macro_f1_change_points"] == pytest.approx(0.0, abs=1e-6)
    assert (output / "model.onnx").stat().st_size == metadata["variants"][ONNX_FP32]["size_bytes"]
    assert summary.to_metrics()["int8_chosen"] == 0.0


@pytest.mark.parametrize(
    ("reference", "int8", "budget", "chosen"),
    [
        (0.90, 0.90, 0.0, ONNX_INT8),
        (0.3 + 0.6, 0.9, 0.0, ONNX_INT8),  # float noise is not a loss
        (0.90, 0.8999, 0.0, ONNX_FP32),
        (0.90, 0.895, 1.0, ONNX_INT8),
        (0.90, 0.89, 1.0, ONNX_INT8),  # exactly at the budget
        (0.90, 0.88, 1.0, ONNX_FP32),
        (0.90, 0.95, 0.0, ONNX_INT8),  # a gain is never a loss
        (0.90, None, 100.0, ONNX_FP32),  # quantization off
    ],
)
def test_choose_variant(reference, int8, budget, chosen):
    name, reason = choose_variant(reference, int8, budget)
    assert name == chosen and reason
    if chosen == ONNX_FP32 and int8 is not None:
        assert f"over the budget of {budget:g} points" in reason


def test_quantize_none_keeps_onnx_fp32(model_dir, tiny_dataset, tmp_path):
    output = tmp_path / "compressed"
    summary = compression.run(compression_config(tmp_path, quantize="none", latency_batch_sizes=[2]),
                              model_dir, tiny_dataset, output)
    metadata = json.loads((output / "tuneloop.json").read_text())
    assert summary.chosen == ONNX_FP32 and metadata["precision"] == "fp32"
    assert set(metadata["variants"]) == {TORCH_FP32, ONNX_FP32}
    assert "quantization is off" in metadata["reason"]
    assert metadata["macro_f1_change_points"] == pytest.approx(0.0, abs=1e-6)


def test_unsupported_architecture_names_the_model_type(model_dir, tiny_dataset, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_attention' to ONNX is not supported")

    monkeypatch.setattr(compression, "_torch_export", refuse)
    output = tmp_path / "compressed"
    with pytest.raises(CompressionError, match="model type 'bert'") as raised:
        compression.run(compression_config(tmp_path), model_dir, tiny_dataset, output)
    assert "fancy_attention" in str(raised.value) and raised.value.stage == "compression"
    assert not (output / "tuneloop.json").exists()


def test_unknown_validation_labels_are_a_data_error(model_dir, tiny_dataset, tmp_path):
    import pandas as pd

    frame = pd.read_parquet(tiny_dataset)
    frame.loc[frame["split"] == "validation", "label"] = "eggs"
    odd = tmp_path / "odd.parquet"
    frame.to_parquet(odd, index=False)
    with pytest.raises(DataError, match="eggs"):
        compression.run(compression_config(tmp_path), model_dir, odd, tmp_path / "compressed")
