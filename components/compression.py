"""The `compress` component: build compressed variants, keep the fastest within the accuracy budget."""

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
    """Export the fine-tuned model (the teacher) to ONNX and build the variants in
    compression.variants: ONNX Runtime fp32, fp32 with transformer fusions, int8 dynamic and int8
    static (calibrated on validation texts), TensorRT fp16/int8 engines, and the same recipes on a
    distilled student (fewer layers, trained on the teacher's soft targets) and a structurally
    pruned model (heads and neurons removed by importance, then a recovery fine-tune).

    Only variants that run on deployment.device are built and eligible (cpu: ONNX Runtime, measured
    on CPU even on a GPU node; cuda: TensorRT). Scores every variant and torch fp32 on the
    validation split and times them at the configured batch sizes in one process. Keeps the fastest
    eligible variant whose macro-F1 loss against torch fp32 is within
    compression.max_f1_loss_points, and records every candidate's F1, agreement with the teacher,
    latency, size, build seconds and the reason in the Compressed Model's tuneloop.json
    (model.onnx or model.plan + tokenizer).
    """
    from tuneloop import compression
    from tuneloop.config import TuneloopConfig

    summary = compression.run(TuneloopConfig.from_json(config_json), model.path, dataset.path, compressed.path)
    for name, value in summary.to_metrics().items():
        metrics.log_metric(name, value)
