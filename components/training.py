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
    pipeline_run: str = "",
    task_name: str = "finetune",
):
    """Fine-tune a transformer for sequence classification (full or LoRA) on the train split.

    Trains in this pod (``training.backend: pod``; ``training.processes`` > 1 runs DDP through
    torchrun) or in a Kubeflow Trainer ``TrainJob`` it launches, waits for and reads back
    (``trainjob``). Checkpoints go to ``training.checkpoint_uri`` keyed by ``pipeline_run`` and
    ``task_name``, so a retry resumes (or attaches to its job) instead of starting over. Writes a
    Hugging Face checkpoint (safetensors) plus tuneloop.json. Empty/zero overrides keep the config.
    """
    from tuneloop.config import TuneloopConfig
    from tuneloop.training import finetune_step

    summary = finetune_step(
        TuneloopConfig.from_json(config_json),
        dataset.path,
        model.path,
        base_model=base_model or None,
        epochs=epochs or None,
        learning_rate=learning_rate or None,
        data_fingerprint=data_fingerprint,
        pipeline_run=pipeline_run,
        task=task_name,
    )
    for name, value in summary.to_metrics().items():
        metrics.log_metric(name, value)
