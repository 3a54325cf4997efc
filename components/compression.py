"""The `compress` component: ONNX export, int8 quantization within the accuracy budget."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def compress(
    config_json: str,
    model: Input[Model],
    dataset: Input[Dataset],
    compressed: Output[Model],
    metrics: Output[Metrics],
):
    """Export the fine-tuned model to ONNX and quantize it to int8 (ONNX Runtime, dynamic).

    Scores torch fp32, ONNX fp32 and ONNX int8 on the validation split and times them at the
    configured batch sizes. Keeps int8 only when its macro-F1 loss against torch fp32 is within
    compression.max_f1_loss_points, else ONNX fp32, and records the numbers and the reason in the
    Compressed Model's tuneloop.json (model.onnx + tokenizer).
    """
    from tuneloop import compression
    from tuneloop.config import TuneloopConfig

    summary = compression.run(TuneloopConfig.from_json(config_json), model.path, dataset.path, compressed.path)
    for name, value in summary.to_metrics().items():
        metrics.log_metric(name, value)
