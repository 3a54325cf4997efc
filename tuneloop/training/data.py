"""Training data for the loop: tokenised examples, length-grouped global batches and rank shards.

The batch order of an epoch is a pure function of (seed, epoch), so a resumed run rebuilds exactly
the order it was interrupted in and skips the batches it already did; no sampler state is saved.
Every process builds the same global batches and takes its own slice of each, so the processes of a
DDP run together see every training row exactly once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding

MEGABATCH_FACTOR = 50
"""Length grouping sorts within windows of this many batches, so batches stay shuffled overall."""


@dataclass
class EncodedSplit:
    """One split, tokenised once: per-row features and the label ids."""

    examples: list[dict]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(example["input_ids"]) for example in self.examples])


def encode_split(tokenizer, frame: pd.DataFrame, text_column: str, label_column: str, classes: list[str],
                 max_length: int) -> EncodedSplit:
    """Tokenise a split (truncated to ``max_length``, unpadded) and map labels to their ids."""
    label_ids = {label: i for i, label in enumerate(classes)}
    texts = frame[text_column].fillna("").astype(str).tolist()
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    labels = np.array([label_ids[str(value)] for value in frame[label_column]], dtype=np.int64)
    examples = [{key: encoded[key][i] for key in keys} for i in range(len(texts))]
    return EncodedSplit(examples, labels)


def global_batches(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                   group_by_length: bool) -> list[list[int]]:
    """The epoch's batches of row indices, identical in every process.

    With ``group_by_length`` rows are shuffled, sorted by length inside windows of
    ``MEGABATCH_FACTOR`` batches, cut into batches, and the batches shuffled again: padding shrinks
    while the order stays random (the approach of transformers' ``LengthGroupedSampler``).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        window = batch_size * MEGABATCH_FACTOR
        order = np.concatenate([
            chunk[np.argsort(-lengths[chunk], kind="stable")]
            for chunk in np.array_split(order, max(1, int(np.ceil(len(order) / window))))
        ])
    batches = [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def rank_share(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This process's rows of a global batch (strided, so the shares differ by at most one row)."""
    return batch[rank::world_size]


def evaluation_batches(size: int, batch_size: int, lengths: np.ndarray) -> list[list[int]]:
    """Validation batches sorted by length (order does not change metrics, padding does cost)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[start:start + batch_size].tolist() for start in range(0, size, batch_size)]


class Collator:
    """Pads a list of rows to the longest one and returns tensors plus the label ids."""

    def __init__(self, tokenizer, split: EncodedSplit) -> None:
        self._pad = DataCollatorWithPadding(tokenizer)
        self._split = split

    def __call__(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        features = self._pad([self._split.examples[i] for i in indices])
        labels = torch.as_tensor(self._split.labels[indices])
        return dict(features), labels
