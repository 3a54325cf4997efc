"""TensorRT engines: built from the ONNX export and faithful to ONNX fp32 where a GPU exists; a clear
error at load where none does.

The GPU tests skip themselves (no change to tests/conftest.py): they need ``tensorrt`` importable
and ``torch.cuda.is_available()``.
"""

import shutil

import numpy as np
import pytest

from tuneloop import tensorrt_engine
from tuneloop.artifacts import read_metadata, write_metadata
from tuneloop.errors import ModelError
from tuneloop.runtime import OnnxClassifier, TorchClassifier, load_classifier

TEXTS = [
    "WINNER!! Claim your free prize now",
    "ok",
    "I'll be home soon, do you want me to pick up some milk on the way back?",
    "",
    "See you at the library at 3",
]
METADATA = {"labels": ["ham", "spam"], "max_length": 32}


def require_gpu():
    """Skip unless TensorRT imports and torch sees a CUDA device."""
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    """A Compressed Model directory holding the fp32 ONNX export of the tiny model."""
    from tuneloop.compression import export_onnx

    model_dir = tmp_path_factory.mktemp("trt-model") / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    write_metadata(model_dir, {"kind": "model", **METADATA})
    target = tmp_path_factory.mktemp("trt-onnx") / "compressed"
    target.mkdir()
    torch_model = TorchClassifier(model_dir)
    export_onnx(torch_model, target / "model.onnx", opset=17)
    torch_model.tokenizer.save_pretrained(target)
    write_metadata(target, {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "fp32", **METADATA})
    return target


def test_tensorrt_artifact_without_a_gpu_is_a_clear_error(onnx_dir, tmp_path):
    if tensorrt_engine.unavailable_reason() is None:
        pytest.skip("this machine has a CUDA device and TensorRT")
    engine = tmp_path / "engine"
    shutil.copytree(onnx_dir, engine)
    (engine / "model.onnx").unlink()
    (engine / "model.plan").write_bytes(b"a serialised engine from a GPU machine")
    write_metadata(engine, {**read_metadata(onnx_dir), "runtime": "tensorrt", "precision": "fp16",
                            "tensorrt": {"version": "10.0.0", "gpu": "NVIDIA H100"}})
    with pytest.raises(ModelError, match=r"needs an NVIDIA GPU with TensorRT; this machine has none") as raised:
        load_classifier(engine)
    assert str(engine) in str(raised.value) and raised.value.field == "runtime"


def test_module_imports_tensorrt_lazily():
    import subprocess
    import sys

    code = "import sys, tuneloop.tensorrt_engine, tuneloop.compression; print('tensorrt' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    reason = tensorrt_engine.unavailable_reason()
    assert reason is None or reason == "no CUDA device" or "tensorrt" in reason


def test_calibration_batches_have_the_profile_shape(onnx_dir):
    tokenizer = OnnxClassifier(onnx_dir).tokenizer
    batches = tensorrt_engine.calibration_batches(
        tokenizer, TEXTS, ["input_ids", "attention_mask", "token_type_ids"], batch=4, sequence=16)
    assert len(batches) == 2  # five texts fill two batches of four, the last one cyclically
    for batch in batches:
        assert {name: array.shape for name, array in batch.items()} == {
            "input_ids": (4, 16), "attention_mask": (4, 16), "token_type_ids": (4, 16)}
        assert all(array.dtype == np.int64 for array in batch.values())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_matches_onnx_fp32(precision, onnx_dir, tmp_path):
    require_gpu()
    import tensorrt as trt

    reference = OnnxClassifier(onnx_dir)
    target = tmp_path / "engine"
    target.mkdir()
    reference.tokenizer.save_pretrained(target)
    info = tensorrt_engine.build_engine(
        onnx_dir / "model.onnx", target / "model.plan", precision=precision, tokenizer=reference.tokenizer,
        max_length=32, calibration_texts=TEXTS * 8,
    )
    assert info["version"] == trt.__version__ and info["gpu"] and info["precision"] == precision
    write_metadata(target, {"kind": "compressed_model", "runtime": "tensorrt", "precision": precision,
                            "tensorrt": info, **METADATA})

    engine = load_classifier(target)
    assert isinstance(engine, tensorrt_engine.TensorRTClassifier)
    expected = reference.predict_proba(TEXTS, batch_size=2)
    for batch_size in (1, 3, 5):  # dynamic batch and sequence within the profile
        probabilities = engine.predict_proba(TEXTS, batch_size=batch_size)
        assert probabilities.shape == expected.shape and np.isfinite(probabilities).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
        np.testing.assert_allclose(probabilities, expected, atol=1e-2 if precision == "fp16" else 0.1)
    many = engine.predict_proba(TEXTS * 30, batch_size=150)  # larger than the profile's max batch
    np.testing.assert_allclose(many[: len(TEXTS)], probabilities, atol=1e-2)


@pytest.mark.gpu
def test_engine_from_another_tensorrt_version_is_refused(onnx_dir, tmp_path):
    require_gpu()
    reference = OnnxClassifier(onnx_dir)
    target = tmp_path / "engine"
    target.mkdir()
    reference.tokenizer.save_pretrained(target)
    info = tensorrt_engine.build_engine(onnx_dir / "model.onnx", target / "model.plan", precision="fp16",
                                        tokenizer=reference.tokenizer, max_length=32)
    write_metadata(target, {"kind": "compressed_model", "runtime": "tensorrt", "precision": "fp16",
                            "tensorrt": {**info, "version": "1.0.0"}, **METADATA})
    with pytest.raises(ModelError, match="built with TensorRT 1.0.0"):
        load_classifier(target)


@pytest.mark.gpu
def test_compression_keeps_a_tensorrt_engine(onnx_dir, tiny_checkpoint, tiny_dataset, tmp_path):
    require_gpu()
    import tensorrt as trt
    import torch

    from tests.conftest import make_config
    from tuneloop import compression

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    write_metadata(model_dir, {"kind": "model", "text_column": "text", "label_column": "label", **METADATA})
    config = make_config(tmp_path, compression={"variants": ["tensorrt_fp16", "tensorrt_int8", "pruned_tensorrt_fp16"],
                                                "latency_batch_sizes": [1, 4], "latency_repeats": 1,
                                                "max_f1_loss_points": 100,
                                                "pruning": {"importance_rows": 16, "recovery_epochs": 0}},
                         deployment={"device": "cuda"})
    output = tmp_path / "compressed"
    summary = compression.run(config, model_dir, tiny_dataset, output)
    metadata = read_metadata(output)
    assert {"tensorrt_fp16", "tensorrt_int8", "pruned_tensorrt_fp16"} <= set(metadata["variants"])
    assert metadata["tensorrt"]["version"] == trt.__version__
    assert metadata["tensorrt"]["gpu"] == torch.cuda.get_device_name(0)
    # serving on cuda: only engines are eligible, so an engine is kept and runs on the GPU
    assert metadata["selection"]["eligible"] == ["tensorrt_fp16", "tensorrt_int8", "pruned_tensorrt_fp16"]
    assert metadata["runtime"] == "tensorrt" and summary.chosen in metadata["selection"]["eligible"]
    assert (output / "model.plan").is_file()
    assert isinstance(load_classifier(output), tensorrt_engine.TensorRTClassifier)


@pytest.mark.gpu
def test_gpu_compress_step_serving_on_cpu_keeps_a_cpu_variant(tiny_checkpoint, tiny_dataset, tmp_path):
    """A GPU compress step whose model serves on CPU builds no engine and measures ONNX Runtime on CPU."""
    require_gpu()
    from tests.conftest import make_config
    from tuneloop import compression

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    write_metadata(model_dir, {"kind": "model", "text_column": "text", "label_column": "label", **METADATA})
    config = make_config(tmp_path, compression={"variants": ["onnx_int8_dynamic", "tensorrt_fp16"],
                                                "latency_batch_sizes": [1, 4], "latency_repeats": 1,
                                                "max_f1_loss_points": 100})
    output = tmp_path / "compressed"
    compression.run(config, model_dir, tiny_dataset, output)
    metadata = read_metadata(output)
    assert "tensorrt_fp16" not in metadata["variants"] and "deployment.device is cpu" in metadata["skipped"]["tensorrt_fp16"]
    assert metadata["runtime"] == "onnxruntime" and metadata["variants"][metadata["chosen"]]["device"] == "cpu"
