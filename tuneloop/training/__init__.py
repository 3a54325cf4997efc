"""Fine-tuning: the loop (``loop``), its data order (``data``), checkpoints (``checkpoints``),
multi-process DDP through torchrun (``distributed``) and the Kubeflow Trainer launcher (``trainjob``).

``run`` trains and writes the Model directory; ``finetune`` is what the KFP component calls: it
trains in the step's own pod, or hands the work to a ``TrainJob`` (``training.backend``).
"""

from tuneloop.training.finetune import TrainingSummary, checkpoint_root, finetune_step, run, with_overrides

__all__ = ["TrainingSummary", "checkpoint_root", "finetune_step", "run", "with_overrides"]
