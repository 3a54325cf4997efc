"""The `finetune` component: fine-tune the base model on the training split."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def finetune(
    config_json: str,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    data_fingerprint: str = "",
    base_model: str = "",
    epochs: int = 0,
    learning_rate: float = 0.0,
):
    """Fine-tune a transformer for sequence classification (full or LoRA) on the train split.

    Uses CUDA with bf16 autocast when a GPU is present, CPU otherwise. Writes a Hugging Face
    checkpoint (safetensors) plus tuneloop.json. Empty/zero overrides keep the config's values.
    """
    from tuneloop import training
    from tuneloop.config import TuneloopConfig

    summary = training.run(
        TuneloopConfig.from_json(config_json),
        dataset.path,
        model.path,
        base_model=base_model or None,
        epochs=epochs or None,
        learning_rate=learning_rate or None,
        data_fingerprint=data_fingerprint,
    )
    for name, value in summary.to_metrics().items():
        metrics.log_metric(name, value)
