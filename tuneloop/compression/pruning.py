"""Structured pruning: remove whole attention heads and feed-forward neurons (or whole layers) by an
importance score measured on validation data, then a short recovery fine-tune on the teacher's soft
targets.

Importance is the first-order Taylor estimate of the loss change when a structure is removed
(Molchanov et al. 2019; for heads, Michel et al. 2019): the sum of ``|weight x gradient|`` of the
cross-entropy on ``compression.pruning.importance_rows`` validation rows over the structure's weights
(a head's rows of the query, key and value projections and its columns of the attention output; a
neuron's row of the intermediate projection and column of the output projection; for a layer, all
its weights). ``unit: heads_and_neurons`` removes ``share`` of the heads and of the neurons in every
layer (at least one of each stays); ``unit: layers`` removes ``share`` of the layers (at least one
stays).

Removal rebuilds the ``nn.Linear`` layers smaller with ``transformers.pytorch_utils.prune_linear_layer``
(``PreTrainedModel.prune_heads`` is gone from transformers 5): the result is a smaller dense model,
not a mask of zeros, so its ONNX export is smaller and faster. Layers that keep a different head
count than the config states cannot be reloaded with ``from_pretrained``; that is fine here, the
pruned model lives in memory until it is exported to ONNX.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import prune_linear_layer

from tuneloop.compression.common import log
from tuneloop.compression.distillation import (
    SoftTargetTraining,
    encoder_layers,
    keep_layers,
    teacher_logits,
    train_on_soft_targets,
)

IMPORTANCE_BATCH = 16


def importance_scores(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], label_ids: Sequence[int], *,
                      max_length: int) -> dict[str, torch.Tensor]:
    """Taylor importance of every head (``[layers, heads]``), neuron (``[layers, intermediate]``) and
    layer (``[layers]``) on labelled texts. The model's weights are left unchanged."""
    layers = encoder_layers(model)
    model.eval()
    heads = torch.zeros(len(layers), _heads(layers[0]))
    neurons = torch.zeros(len(layers), layers[0].intermediate.dense.out_features)
    whole = torch.zeros(len(layers))
    labels = torch.tensor(list(label_ids), dtype=torch.long)
    for start in range(0, len(texts), IMPORTANCE_BATCH):
        encoded = tokenizer(list(texts[start : start + IMPORTANCE_BATCH]), truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(**encoded).logits, labels[start : start + IMPORTANCE_BATCH]).backward()
        for index, layer in enumerate(layers):
            heads[index] += _head_scores(layer)
            neurons[index] += _neuron_scores(layer)
            whole[index] += sum(_taylor(p).sum() for p in layer.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {"heads": heads, "neurons": neurons, "layers": whole}


def prune(teacher: Any, importance_texts: Sequence[str], importance_labels: Sequence[str],
          recovery_texts: Sequence[str], recovery_labels: Sequence[str],
          settings: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A pruned copy of the fine-tuned ``teacher`` (a ``TorchClassifier``), recovered on soft targets.

    Args:
        importance_texts, importance_labels: validation rows that score importance.
        recovery_texts, recovery_labels: train rows for the recovery fine-tune.
        settings: ``compression.pruning`` (``PruningConfig``).

    Returns:
        ``(pruned model on CPU in eval mode, the recipe record)``.

    Raises:
        CompressionError: the architecture is not a supported BERT-style encoder (named).
    """
    started = time.perf_counter()
    model = copy.deepcopy(teacher.model)
    layers = encoder_layers(model)
    index_of = {label: i for i, label in enumerate(teacher.labels)}
    rows = list(importance_texts)[: settings.importance_rows]
    scores = importance_scores(model, teacher.tokenizer, rows, [index_of[x] for x in importance_labels[: len(rows)]],
                               max_length=teacher.max_length)
    before = _parameters(model)
    heads_before, neurons_before = _heads(layers[0]), layers[0].intermediate.dense.out_features
    if settings.unit == "layers":
        drop = min(len(layers) - 1, max(1, round(settings.share * len(layers))))
        kept_layers = sorted(torch.argsort(scores["layers"], descending=True)[: len(layers) - drop].tolist())
        keep_layers(model, kept_layers)
        shape = {"unit": "layers", "teacher_layers": len(layers), "kept_layers": kept_layers}
    else:
        keep_heads = max(1, heads_before - round(settings.share * heads_before))
        keep_neurons = max(1, neurons_before - round(settings.share * neurons_before))
        for index, layer in enumerate(layers):
            _prune_heads(layer, torch.argsort(scores["heads"][index], descending=True)[:keep_heads])
            _prune_neurons(layer, torch.argsort(scores["neurons"][index], descending=True)[:keep_neurons])
        shape = {"unit": "heads_and_neurons", "heads_per_layer": [heads_before, keep_heads],
                 "neurons_per_layer": [neurons_before, keep_neurons]}
    log(f"pruned {shape['unit']} by importance on {len(rows)} validation rows: {before:,} -> "
        f"{_parameters(model):,} parameters")
    recovery = None
    if settings.recovery_epochs > 0:
        label_ids = [index_of[label] for label in recovery_labels]
        targets = teacher_logits(teacher, list(recovery_texts))
        recovery = train_on_soft_targets(
            model, teacher.tokenizer, list(recovery_texts), label_ids, targets,
            SoftTargetTraining(settings.recovery_epochs, settings.learning_rate, settings.batch_size,
                               settings.temperature, settings.soft_weight, settings.seed),
            max_length=teacher.max_length, what="prune recovery")
    model.eval()
    recipe = {"method": "structured_pruning", "importance": "taylor |weight x gradient| of cross-entropy",
              "importance_rows": len(rows), "share": settings.share, **shape, "parameters": _parameters(model),
              "teacher_parameters": before, "recovery": recovery, "seconds": round(time.perf_counter() - started, 1)}
    return model, recipe


def _heads(layer: torch.nn.Module) -> int:
    attention = layer.attention.self
    return attention.query.out_features // attention.attention_head_size


def _taylor(parameter: torch.Tensor) -> torch.Tensor:
    return (parameter.detach() * parameter.grad.detach()).abs()


def _head_scores(layer: torch.nn.Module) -> torch.Tensor:
    attention, size = layer.attention.self, layer.attention.self.attention_head_size
    per_row = sum(_taylor(linear.weight).sum(dim=1) + _taylor(linear.bias)
                  for linear in (attention.query, attention.key, attention.value))
    per_column = _taylor(layer.attention.output.dense.weight).sum(dim=0)
    return (per_row + per_column).view(-1, size).sum(dim=1)


def _neuron_scores(layer: torch.nn.Module) -> torch.Tensor:
    inner = layer.intermediate.dense
    return (_taylor(inner.weight).sum(dim=1) + _taylor(inner.bias)
            + _taylor(layer.output.dense.weight).sum(dim=0))


def _prune_heads(layer: torch.nn.Module, keep: torch.Tensor) -> None:
    """Rebuild the attention projections with only the heads in ``keep``."""
    attention, size = layer.attention.self, layer.attention.self.attention_head_size
    keep = torch.sort(keep).values
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep.tolist()])
    attention.query = prune_linear_layer(attention.query, index, dim=0)
    attention.key = prune_linear_layer(attention.key, index, dim=0)
    attention.value = prune_linear_layer(attention.value, index, dim=0)
    layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, index, dim=1)
    attention.num_attention_heads = len(keep)
    attention.all_head_size = len(keep) * size


def _prune_neurons(layer: torch.nn.Module, keep: torch.Tensor) -> None:
    """Rebuild the feed-forward projections with only the neurons in ``keep``."""
    index = torch.sort(keep).values
    layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
    layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)


def _parameters(model: torch.nn.Module) -> int:
    return int(sum(parameter.numel() for parameter in model.parameters()))
