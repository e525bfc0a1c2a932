"""Padding a split's examples once into tensors, and cutting seeded batches from them.

Tasks encode each split a single time into an `EncodedSplit` (right-padded to the split's longest
example); `iter_batches` then only indexes tensors and trims the padding columns no example of the
batch needs, so batching has no per-example Python work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitdyn.tasks.base import Batch, lm_loss, logit_diff, validate_batch

SPLITS: tuple[str, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class EncodedSplit(Batch):
    """All examples of one split as one right-padded `Batch`; unlike a batch it may be empty."""

    def __post_init__(self) -> None:
        if self.clean.shape[0] > 0:
            validate_batch(self)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def batch(self, index: Int[Tensor, " b"]) -> Batch:
        """The examples at `index` as a `Batch`, trimmed to their longest sequence and read count."""
        return self.select(index).trimmed()


def pad_sequences(rows: Sequence[Sequence[int]], pad: int) -> Int[Tensor, "n pos"]:
    """Right-pad integer rows with `pad` to the longest row."""
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def iter_batches(encoded: EncodedSplit, batch_size: int, *, seed: int = 0) -> Iterator[Batch]:
    """Every example once, in an order shuffled by `seed`; the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(encoded)
    if n == 0:
        raise ValueError("the split has no examples")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield encoded.batch(order[start : start + batch_size])


def check_split(split: str) -> str:
    """`split` itself, or ValueError when it is not 'train', 'dev' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


class EncodedTask(ABC):
    """The `Task` methods of a task that encodes each split once (`encoded`): seeded batches
    of the split, the `logit_diff` metric and the `lm_weight`-weighted LM loss."""

    @abstractmethod
    def encoded(self, split: str) -> EncodedSplit:
        """The whole split as padded tensors."""

    def batches(self, split: str, batch_size: int, *, seed: int = 0) -> Iterator[Batch]:
        """The split's examples once, shuffled by `seed`, right-padded."""
        return iter_batches(self.encoded(split), batch_size, seed=seed)

    def metric(
        self, logits: Float[Tensor, "batch pos vocab"], batch: Batch
    ) -> Float[Tensor, " batch"]:
        """Mean over read positions of logit(target) - logit(foil) (logits)."""
        return logit_diff(logits, batch)

    def loss(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, ""]:
        """Next-token cross-entropy of the clean tokens, weighted by ``lm_weight`` (nats)."""
        return lm_loss(logits, batch)
