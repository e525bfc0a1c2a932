"""`TextTask`: plain text, one passage per line, for measuring the LM loss on held-out text (the
general-capability measure of runs on the paper's data, ``--general-data``).

Lines are split into train/dev/test by a stable hash of the text (80/10/10), as sv-jsonl rows
are. The task has no read positions: its `loss` is the next-token cross-entropy; it has no
behaviour `metric`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from circuitdyn.tasks.agreement import split_of
from circuitdyn.tasks.base import Batch
from circuitdyn.tasks.batching import SPLITS, EncodedSplit, EncodedTask, check_split, pad_sequences


class TextTask(EncodedTask):
    """Next-token loss on the lines of a text file (lines shorter than two tokens are dropped;
    longer ones are cut to `max_tokens`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        path: str | Path,
        prepend_bos: bool = True,
        max_tokens: int = 256,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        if prepend_bos and tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        self.name = "text"
        prefix = [tokenizer.bos_token_id] if prepend_bos else []
        by_split: dict[str, list[list[int]]] = {split: [] for split in SPLITS}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            ids = (prefix + tokenizer(line, add_special_tokens=False)["input_ids"])[:max_tokens]
            if len(ids) >= 2:
                by_split[split_of(line)].append(ids)
        if not all(by_split.values()):
            counts = {split: len(rows) for split, rows in by_split.items()}
            raise ValueError(f"{path}: too few lines of text for train/dev/test ({counts})")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._encoded = {split: _encode(rows, pad) for split, rows in by_split.items()}

    def encoded(self, split: str) -> EncodedSplit:
        return self._encoded[check_split(split)]

    def metric(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Tensor:
        raise ValueError("a text task measures only the LM loss; it has no behaviour metric")


def _encode(rows: list[list[int]], pad: int) -> EncodedSplit:
    clean = pad_sequences(rows, pad)
    lengths = torch.tensor([len(row) for row in rows])
    mask = torch.arange(clean.shape[1])[None, :] < lengths[:, None]
    none = torch.zeros((len(rows), 0), dtype=torch.long)
    return EncodedSplit(clean, mask, none, none, none)
