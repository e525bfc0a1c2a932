"""The `Task` contract: what circuit discovery and circuit-tuning need from a task.

A task yields `Batch`es of right-padded token ids. Each batch carries

* ``clean`` tokens (the behaviour under study) and, for corrupted-ablation attribution,
  ``corrupted`` tokens of exactly the same shape, aligned position by position;
* ``attention_mask`` (True on real tokens; padding only at the right end);
* the *read positions* where the metric is read, with the ``target`` token (the behaviour
  we want, larger metric is better) and the ``foil`` token at each read position. A batch
  may have several read positions per example (e.g. one per verb); unused slots hold -1;
* optional per-token weights of the training loss (``lm_weight``, weight of predicting
  token t+1 at position t).

`logit_diff` is the default metric: per example, the mean over its read positions of
logit(target) - logit(foil). `lm_loss` is the default training loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """One right-padded batch of a task. All tensors share the leading batch dimension."""

    clean: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    read_pos: Int[Tensor, "batch k"]
    target: Int[Tensor, "batch k"]
    foil: Int[Tensor, "batch k"]
    corrupted: Int[Tensor, "batch pos"] | None = None
    lm_weight: Float[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        validate_batch(self)

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])

    @property
    def read_mask(self) -> Bool[Tensor, "batch k"]:
        """True where a read slot is used."""
        return self.read_pos >= 0

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor moved to `device`."""
        moved = {
            name: (value.to(device) if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return replace(self, **moved)

    def trimmed(self) -> Batch:
        """The same examples without the padding columns and read slots none of them uses."""
        length = int(self.attention_mask.sum(dim=1).max())
        k = int((self.read_pos >= 0).sum(dim=1).max())
        return self._cut(length, k)

    def through_last_read(self) -> Batch:
        """The same examples cut after the last read position any of them uses (unchanged
        when none has one). For a causal model nothing read at a read position (the logits
        there, a metric such as `logit_diff`, the gradients reaching earlier positions)
        depends on the tokens cut; an example's real tokens after its reads go with them."""
        last = int(self.read_pos.max()) if self.read_pos.numel() else -1
        if last < 0 or last + 1 >= self.clean.shape[1]:
            return self
        return self._cut(last + 1, self.read_pos.shape[1])

    def _cut(self, length: int, k: int) -> Batch:
        """The first `length` token columns and `k` read slots."""

        def cut(tensor: Tensor | None, width: int) -> Tensor | None:
            return None if tensor is None else tensor[:, :width]

        return Batch(
            clean=self.clean[:, :length],
            attention_mask=self.attention_mask[:, :length],
            read_pos=self.read_pos[:, :k],
            target=self.target[:, :k],
            foil=self.foil[:, :k],
            corrupted=cut(self.corrupted, length),
            lm_weight=cut(self.lm_weight, length),
        )

    def select(self, index: Int[Tensor, " n"] | slice) -> Batch:
        """A sub-batch of the examples at `index` (a slice or index tensor)."""
        picked = {
            name: (value[index] if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return Batch(**picked)


def validate_batch(batch: Batch) -> None:
    """Raise ValueError naming the problem when a batch breaks the contract."""
    clean = batch.clean
    if clean.ndim != 2:
        raise ValueError(
            f"Batch.clean must be [batch, pos] token ids, got shape {tuple(clean.shape)}"
        )
    if clean.shape[0] == 0 or clean.shape[1] == 0:
        raise ValueError("Batch is empty: it needs at least one example with at least one token")
    if clean.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Batch.clean must hold integer token ids, got dtype {clean.dtype}")
    if batch.attention_mask.shape != clean.shape:
        raise ValueError(
            f"Batch.attention_mask has shape {tuple(batch.attention_mask.shape)} but clean tokens "
            f"have shape {tuple(clean.shape)}; they must match"
        )
    if batch.attention_mask.dtype != torch.bool:
        raise ValueError("Batch.attention_mask must be a bool tensor (True on real tokens)")
    mask = batch.attention_mask
    if not bool(mask[:, 0].all()):
        raise ValueError(
            "Every example needs at least one real token at position 0 (right padding)"
        )
    # Right padding: once a row turns False it stays False.
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask is not right-padded (a real token follows a pad); "
            "pad at the end of each sequence"
        )
    if batch.corrupted is not None and batch.corrupted.shape != clean.shape:
        raise ValueError(
            f"clean and corrupted tokens must have the same shape (aligned positions), got "
            f"{tuple(clean.shape)} vs {tuple(batch.corrupted.shape)}; pad both to the same length "
            "or drop pairs whose lengths differ"
        )
    k_shape = batch.read_pos.shape
    if batch.read_pos.ndim != 2 or k_shape[0] != clean.shape[0]:
        raise ValueError(
            f"read_pos must be [batch, k] with batch={clean.shape[0]}, got {tuple(k_shape)}"
        )
    if batch.target.shape != k_shape or batch.foil.shape != k_shape:
        raise ValueError(
            f"target {tuple(batch.target.shape)} and foil {tuple(batch.foil.shape)} must have the "
            f"shape of read_pos {tuple(k_shape)}"
        )
    used = batch.read_pos >= 0
    # k = 0: a batch of plain text (a task with a loss and no read positions).
    if k_shape[1] > 0 and not bool(used.any(dim=1).all()):
        raise ValueError("every example needs at least one read position (read_pos >= 0)")
    lengths = mask.sum(dim=1, keepdim=True)
    if bool((used & (batch.read_pos >= lengths)).any()):
        raise ValueError("a read position lies in the padding or past the sequence end")
    if batch.lm_weight is not None and batch.lm_weight.shape != clean.shape:
        raise ValueError(
            f"lm_weight must have the shape of clean tokens {tuple(clean.shape)}, "
            f"got {tuple(batch.lm_weight.shape)}"
        )


Metric = Callable[[Tensor, "Batch"], Tensor]
"""``metric(logits [batch, pos, vocab], batch) -> [batch]``; larger = more of the behaviour."""


def check_tokens(batch: Batch, d_vocab: int, n_ctx: int) -> None:
    """ValueError when the batch's token ids or length do not fit a model's vocabulary / context."""
    for name, tokens in (("clean", batch.clean), ("corrupted", batch.corrupted)):
        if tokens is not None and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0):
            raise ValueError(
                f"{name} token ids must lie in [0, {d_vocab}) for this model's vocabulary; "
                "was the batch made with another tokenizer?"
            )
    if batch.clean.shape[1] > n_ctx:
        raise ValueError(f"sequences of {batch.clean.shape[1]} tokens exceed the model's {n_ctx=}")


def checked_metric(
    values: Float[Tensor, " batch"], batch: Batch, what: str = "a batch"
) -> Float[Tensor, " batch"]:
    """The metric's per-example values, after checking their shape and finiteness."""
    if values.shape != (batch.size,):
        raise ValueError(
            f"the metric must return one value per example, shape ({batch.size},), "
            f"got {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()):
        bad = (~torch.isfinite(values)).nonzero()[:, 0].tolist()
        raise ValueError(f"the metric is NaN/inf on {what} for examples {bad[:10]}")
    return values


def read_positions(batch: Batch) -> Bool[Tensor, "batch pos"]:
    """True at each example's read positions (where the metric is read)."""
    mask = torch.zeros_like(batch.attention_mask)
    used = batch.read_pos >= 0
    rows = torch.arange(batch.size, device=mask.device)[:, None].expand_as(batch.read_pos)
    mask[rows[used], batch.read_pos[used]] = True
    return mask


def gather_read_logits(
    logits: Float[Tensor, "batch pos vocab"], batch: Batch
) -> tuple[Float[Tensor, "batch k"], Float[Tensor, "batch k"]]:
    """Logits of the target and of the foil token at each read position (0 in unused slots)."""
    pos = batch.read_pos.clamp(min=0)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    at_pos = logits[rows, pos]  # [batch, k, vocab]
    target = at_pos.gather(-1, batch.target.clamp(min=0)[..., None])[..., 0]
    foil = at_pos.gather(-1, batch.foil.clamp(min=0)[..., None])[..., 0]
    used = batch.read_mask
    return target.where(used, 0.0), foil.where(used, 0.0)


def logit_diff(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " batch"]:
    """Per example: mean over read positions of logit(target) - logit(foil). Units: logits."""
    target, foil = gather_read_logits(logits, batch)
    used = batch.read_mask
    return (target - foil).sum(dim=1) / used.sum(dim=1)


def accuracy(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " batch"]:
    """Per example: fraction of read positions where the target outscores the foil."""
    target, foil = gather_read_logits(logits, batch)
    used = batch.read_mask
    return ((target > foil) & used).sum(dim=1) / used.sum(dim=1)


def lm_loss_weights(
    batch: Batch, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "batch pos_1"]:
    """Weight of each next-token target in `lm_loss`: 1 for a real token (times `lm_weight`
    when given), 0 for padding. Their sum is the loss's normaliser, which data-parallel
    training needs to weight each rank's share of a batch."""
    weight = batch.attention_mask[:, 1:].to(dtype)
    if batch.lm_weight is not None:
        weight = weight * batch.lm_weight[:, :-1].to(dtype)
    return weight


def lm_loss(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, ""]:
    """Next-token cross-entropy on real tokens, weighted by `lm_weight` when given (nats)."""
    log_probs = logits[:, :-1].log_softmax(dim=-1)
    next_tokens = batch.clean[:, 1:]
    nll = -log_probs.gather(-1, next_tokens[..., None])[..., 0]
    weight = lm_loss_weights(batch, nll.dtype)
    total = weight.sum()
    if float(total) <= 0:
        raise ValueError("lm_loss: the batch has no weighted next-token targets")
    return (nll * weight).sum() / total


def take_examples(batches: Iterable[Batch], n_examples: int) -> Iterator[Batch]:
    """The first `n_examples` examples of `batches` (the last batch cut to fit)."""
    left = n_examples
    for batch in batches:
        if left <= 0:
            return
        if batch.size > left:
            batch = batch.select(slice(0, left))
        left -= batch.size
        yield batch


@runtime_checkable
class Task(Protocol):
    """What every task provides. Splits are 'train', 'dev' and 'test' and never overlap."""

    name: str

    def batches(self, split: str, batch_size: int, *, seed: int = 0) -> Iterator[Batch]:
        """Yield the split's examples as batches, in a seeded order."""
        ...

    def metric(
        self, logits: Float[Tensor, "batch pos vocab"], batch: Batch
    ) -> Float[Tensor, " batch"]:
        """Per-example task metric; larger is better for the behaviour under study."""
        ...

    def loss(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, ""]:
        """Scalar training loss (used by circuit-tuning)."""
        ...
