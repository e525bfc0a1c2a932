"""Head roles at checkpoints: does a head look at the subject, and does it push the verb?

For each attention head, on the first ``n_examples`` examples of a task split (in the split's
order, so every checkpoint sees the same examples), at each read position (the position before
a read verb, where the task's metric is read):

* ``attention_to_subject``: the attention probability from the read position to the subject
  noun the verb agrees with, averaged over read positions; ``uniform_baseline``: the mean of
  1 / (number of positions the read position can attend to, i.e. read_pos + 1, causal
  attention), what a head attending uniformly would give; ``attention_ratio`` = their ratio.
  Subject positions come from the agreement tasks' sentence pairs (`AgreementTask.pairs` and
  `AgreementTask.read_verbs`: ``VerbSlot.subject``), because `Batch` does not carry them; for
  tasks without subject positions (``sv-jsonl``) these columns are NaN.
* ``dla`` (direct logit attribution, logits): the head's output at the read position,
  ``z_h W_O[h]``, through the final LayerNorm as the model applied it at that position (centred
  for LayerNorm, divided by the position's cached scale, times ``ln_final.w``), dotted with
  ``W_U[:, target] - W_U[:, foil]``; averaged over read positions. Summed with the same terms of
  every other residual component plus the bias terms, it gives the logit difference exactly.

Checkpoints: ``step`` is the checkpoint step (weights after update ``step``), ``updates`` =
step + 1; the initial model is ``step = -1``, ``updates = 0``. The model is
``load_model(manifest["model_name"])`` with the checkpoint's weights loaded in turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitdyn.analysis.runs import tuning_config
from circuitdyn.analysis.weights import load_checkpoint_weights, model_at
from circuitdyn.store import RunStore, StoreError

if TYPE_CHECKING:  # transformer_lens is imported (slowly) only where a model is loaded
    from transformer_lens import HookedTransformer
from circuitdyn.tasks.base import Batch

INITIAL_STEP = -1
"""The ``step`` label of the initial model (before any update) in head-role tables."""


def run_task(store: RunStore, model: HookedTransformer, task: str | None = None) -> Any:
    """The run's task (or the task named ``task``, e.g. ``"agreement"`` for a ``disagreement``
    run) built as the run built it: ``load_task(name, model, seed=config.seed,
    **config.task_options)``. A run without a tuning config needs ``task`` (then built with
    `load_task`'s own defaults)."""
    from circuitdyn.tasks import load_task

    config = tuning_config(store)
    if config is None:
        if task is None:
            raise StoreError(
                f"{store.directory}: no tuning config names the run's task; pass task="
            )
        return load_task(task, model)
    return load_task(task or config.task, model, seed=config.seed, **config.task_options)


def subject_positions(task: Any, split: str) -> Tensor | None:
    """Int [n, k]: for each example of the split (encoded order) and read slot, the position of
    the subject noun the read verb agrees with (-1 in unused slots); None when the task does not
    record subjects (only the agreement-language tasks do)."""
    if not (hasattr(task, "pairs") and hasattr(task, "read_verbs")):
        return None
    rows = [[v.subject for v in task.read_verbs(p.clean)] for p in task.pairs(split)]
    width = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def task_examples(
    task: Any, split: str, n_examples: int, batch_size: int
) -> Iterator[tuple[Batch, Tensor | None]]:
    """The split's first ``n_examples`` examples in order, as (batch, subjects [b, k] or None)."""
    subjects = subject_positions(task, split)
    if hasattr(task, "encoded"):
        encoded = task.encoded(split)
        n = min(n_examples, len(encoded))
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(n, start + batch_size))
            batch = encoded.batch(index)
            k = batch.read_pos.shape[1]
            yield batch, None if subjects is None else subjects[index, :k]
        return
    seen = 0  # a generic Task: its own (seeded) batches, no subjects
    for batch in task.batches(split, batch_size, seed=0):
        if seen >= n_examples:
            return
        yield batch, None
        seen += batch.size


@torch.no_grad()
def head_roles_of_model(
    model: HookedTransformer, batches: Sequence[tuple[Batch, Tensor | None]]
) -> pd.DataFrame:
    """Head roles of one model on ``batches`` of (batch, subject positions [b, k] or None).

    Columns: ``layer``, ``head``, ``node``, ``attention_to_subject``, ``uniform_baseline``,
    ``attention_ratio`` (probabilities, dimensionless), ``dla`` (logits), ``n_reads`` (read
    positions averaged over). Rows in (layer, head) order.
    """
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    device = next(model.parameters()).device
    att_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    base_sum = 0.0
    dla_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    n_att = n_dla = 0
    names = {"ln_final.hook_scale"}
    for layer in range(n_layers):
        names |= {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_pattern"}
    centre = cfg.normalization_type in ("LN", "LNPre")
    ln_w = getattr(model.ln_final, "w", None)
    for batch, subjects in batches:
        batch = batch.to(device)
        _, cache = model.run_with_cache(batch.clean, names_filter=lambda n: n in names)
        used = batch.read_mask  # [b, k]
        pos = batch.read_pos.clamp(min=0)
        rows = torch.arange(batch.size, device=device)[:, None]
        direction = model.W_U[:, batch.target.clamp(min=0)] - model.W_U[:, batch.foil.clamp(min=0)]
        direction = direction.permute(1, 2, 0)  # [b, k, d_model]
        scale = cache["ln_final.hook_scale"][rows, pos]  # [b, k, 1]
        has_subject = None
        if subjects is not None:
            subjects = subjects.to(device)
            has_subject = used & (subjects >= 0)
            base_sum += float((1.0 / (pos + 1).double())[has_subject].sum())
            n_att += int(has_subject.sum())
        n_dla += int(used.sum())
        for layer in range(n_layers):
            if has_subject is not None:
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [b, H, q, k]
                picked = pattern[rows, :, pos, subjects.clamp(min=0)]  # [b, k, H]
                att_sum[layer] += picked[has_subject].double().sum(0).cpu()
            z = cache[f"blocks.{layer}.attn.hook_z"][rows, pos]  # [b, k, H, d_head]
            out = torch.einsum("bkhd,hdm->bkhm", z, model.W_O[layer])
            if centre:
                out = out - out.mean(-1, keepdim=True)
            out = out / scale[..., None]
            if ln_w is not None:
                out = out * ln_w
            dla = torch.einsum("bkhm,bkm->bkh", out, direction)
            dla_sum[layer] += dla[used].double().sum(0).cpu()
    att = (att_sum / n_att).numpy() if n_att else np.full((n_layers, n_heads), np.nan)
    baseline = base_sum / n_att if n_att else np.nan
    dla_mean = (dla_sum / max(n_dla, 1)).numpy()
    layer_idx, head_idx = np.divmod(np.arange(n_layers * n_heads), n_heads)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = att.reshape(-1) / baseline
    return pd.DataFrame(
        {
            "layer": layer_idx,
            "head": head_idx,
            "node": [f"a{la}.h{h}" for la, h in zip(layer_idx, head_idx, strict=True)],
            "attention_to_subject": att.reshape(-1),
            "uniform_baseline": baseline,
            "attention_ratio": ratio,
            "dla": dla_mean.reshape(-1),
            "n_reads": n_dla,
        }
    )


def head_roles(
    store: RunStore,
    steps: Sequence[int] | None = None,
    *,
    include_initial: bool = True,
    task: str | None = None,
    split: str = "dev",
    n_examples: int = 64,
    batch_size: int = 32,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """`head_roles_of_model` at the initial model (if ``include_initial``) and at each
    checkpoint in ``steps`` (default: every checkpoint), on the first ``n_examples`` examples
    of ``split`` of the run's task (or ``task``). Columns: ``step`` (-1 for the initial
    model), ``updates``, then those of `head_roles_of_model`."""
    selected = store.checkpoint_steps() if steps is None else [int(s) for s in steps]
    model = model_at(store, None, device=device, model_name=model_name)
    data = list(task_examples(run_task(store, model, task), split, n_examples, batch_size))
    if not data:
        raise ValueError(f"the {split} split of the task has no examples")
    frames = []
    plan = ([INITIAL_STEP] if include_initial else []) + selected
    for step in plan:
        if step != INITIAL_STEP:
            load_checkpoint_weights(model, store, step)
        frame = head_roles_of_model(model, data)
        frame.insert(0, "updates", step + 1)
        frame.insert(0, "step", step)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def head_role_changes(
    roles: pd.DataFrame, first: int | None = None, last: int | None = None
) -> pd.DataFrame:
    """Per head, the roles at two steps of a `head_roles` table (default: its first and last
    step) and their differences. Columns: ``layer``, ``head``, ``node``, ``step_first``,
    ``step_last``, ``attention_first``, ``attention_last``, ``delta_attention``,
    ``ratio_first``, ``ratio_last``, ``dla_first``, ``dla_last``, ``delta_dla``; sorted by
    |delta_dla|, largest first."""
    first = int(roles["step"].min()) if first is None else first
    last = int(roles["step"].max()) if last is None else last
    keys = ["layer", "head", "node"]
    a = roles[roles["step"] == first].set_index(keys)
    b = roles[roles["step"] == last].set_index(keys)
    out = pd.DataFrame(index=a.index)
    out["step_first"], out["step_last"] = first, last
    out["attention_first"] = a["attention_to_subject"]
    out["attention_last"] = b["attention_to_subject"]
    out["delta_attention"] = out["attention_last"] - out["attention_first"]
    out["ratio_first"] = a["attention_ratio"]
    out["ratio_last"] = b["attention_ratio"]
    out["dla_first"] = a["dla"]
    out["dla_last"] = b["dla"]
    out["delta_dla"] = out["dla_last"] - out["dla_first"]
    out = out.reset_index()
    order = out["delta_dla"].abs().sort_values(ascending=False, kind="stable").index
    return out.loc[order].reset_index(drop=True)
