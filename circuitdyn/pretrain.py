"""Pretraining the embedded default model from scratch on the agreement language.

`pretrain(out_dir)` trains a small HookedTransformer with the plain next-token loss on freshly
generated *train-split* sentences (the split is a hash of the sentence pair, so the held-out
sentences of every task are never seen), then measures it on held-out test-split sentences and
writes ``config.json``, ``model.safetensors``, ``tokenizer/`` and ``metrics.json`` to `out_dir`.
Everything is seeded: the same seed and settings give the same weights on the same machine.

The shipped model was made with::

    circuitdyn pretrain --out circuitdyn/assets/default --seed 0
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn.models import default_device, save_model, silence_tl_deprecation
from circuitdyn.tasks.agreement import DEFAULT_GRAMMAR, AgreementPair, Grammar, iter_pairs
from circuitdyn.tasks.agreement_tasks import AgreementTask, encode_pairs
from circuitdyn.tasks.base import Batch, gather_read_logits, lm_loss
from circuitdyn.tasks.batching import pad_sequences
from circuitdyn.tasks.word_tokenizer import (
    build_word_tokenizer,
    load_word_tokenizer,
    save_word_tokenizer,
)


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the default model (LayerNorm, learned positions, GELU MLP of 4x)."""

    n_layers: int = 3
    n_heads: int = 4
    d_model: int = 64
    n_ctx: int = DEFAULT_GRAMMAR.max_words

    def config(self, d_vocab: int) -> HookedTransformerConfig:
        # No `seed` here: TransformerLens would reseed every global RNG; pretrain seeds torch.
        return HookedTransformerConfig(
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_model=self.d_model,
            d_head=self.d_model // self.n_heads,
            d_mlp=4 * self.d_model,
            d_vocab=d_vocab,
            n_ctx=self.n_ctx,
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="standard",
            model_name="circuitdyn-agreement",
            device="cpu",
        )


def pretrain(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 200,
    weight_decay: float = 0.01,
    shape: ModelShape | None = None,
    grammar: Grammar = DEFAULT_GRAMMAR,
    n_eval: int = 2000,
    device: str | torch.device | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train the default model from scratch and write it to `out_dir`.

    Args:
        out_dir: where the model files and ``metrics.json`` go (created if needed).
        seed: seeds the weights' initialisation and the sentence stream.
        steps, batch_size: optimiser steps and sentences per step.
        lr, warmup, weight_decay: AdamW with linear warmup then cosine decay to 0.
        shape: the architecture (default `ModelShape()`).
        n_eval: held-out test-split sentence pairs to measure at the end.
        device: None means CUDA if available, else CPU.
        progress: show a tqdm progress bar.
        command: the command line recorded in ``metrics.json``.

    Returns:
        The held-out metrics (see `heldout_metrics`) plus the training time (``wall_time_s``).
    """
    out_dir = Path(out_dir)
    shape = shape or ModelShape()
    device = torch.device(device) if device is not None else default_device()
    start = time.perf_counter()

    # The model reloads its tokenizer from disk (TransformerLens's set_tokenizer), so save first.
    tokenizer_dir = save_word_tokenizer(build_word_tokenizer(), out_dir / "tokenizer")
    tokenizer = load_word_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    with silence_tl_deprecation():
        model = HookedTransformer(shape.config(len(tokenizer)), tokenizer=tokenizer)
    model = model.to(device, print_details=False)
    model.train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, steps))
    stream = _train_batches(tokenizer, batch_size, seed=seed, grammar=grammar)
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, mininterval=1.0)
    smoothed = None
    for _ in bar:
        batch = next(stream).to(device)
        loss = lm_loss(model(batch.clean), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        bar.set_postfix(loss=f"{smoothed:.3f}", refresh=False)
    wall_time = time.perf_counter() - start

    model.eval()
    metrics = heldout_metrics(model, n=n_eval, seed=seed, grammar=grammar)
    metrics["wall_time_s"] = round(wall_time, 1)
    save_model(model, out_dir)
    record = {
        "command": command or f"circuitdyn pretrain --out {out_dir} --seed {seed} --steps {steps}",
        "heldout": metrics,
        "training": {
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "warmup": warmup,
            "weight_decay": weight_decay,
            "shape": asdict(shape),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    if progress:
        print(format_metrics(metrics))
    return metrics


@torch.no_grad()
def heldout_metrics(
    model: HookedTransformer,
    *,
    n: int = 2000,
    seed: int = 0,
    batch_size: int = 250,
    grammar: Grammar = DEFAULT_GRAMMAR,
) -> dict[str, float]:
    """Agreement quality on `n` test-split pairs (clean sentences), never seen in pretraining.

    Returns:
        ``accuracy``: fraction of verbs whose correct form outscores the wrong-number form at
        the position before the verb (all verbs); ``attractor_accuracy``: the same over verbs
        with an opposite-number noun between subject and verb; ``main_accuracy``: verbs of the
        main subject; ``logit_diff``: mean correct-minus-wrong logit over all verbs;
        ``lm_loss_non_verb``: next-token cross-entropy (nats/token) on tokens that are not
        verbs; counts ``n_sentences``, ``n_verbs``, ``n_attractor_verbs``.
    """
    device = next(model.parameters()).device
    task = AgreementTask(
        model.tokenizer, mode="general", n_train=0, n_dev=0, n_test=n, seed=seed, grammar=grammar
    )
    encoded = task.encoded("test")
    # Per read slot (all verbs, in sentence order): is it an attractor verb, a main verb?
    slots = [task.read_verbs(p.clean) for p in task.pairs("test")]
    attractor = pad_sequences([[int(v.attractor) for v in verbs] for verbs in slots], 0).bool()
    main = pad_sequences([[int(v.main) for v in verbs] for verbs in slots], 0).bool()
    correct, diffs, used = [], [], []
    loss_sum = loss_weight = 0.0
    for start in range(0, len(encoded), batch_size):
        index = torch.arange(start, min(start + batch_size, len(encoded)))
        batch = encoded.batch(index).to(device)
        logits = model(batch.clean)
        target, foil = gather_read_logits(logits, batch)
        width = encoded.read_pos.shape[1] - target.shape[1]
        correct.append(torch.nn.functional.pad((target > foil).cpu(), (0, width)))
        diffs.append(torch.nn.functional.pad((target - foil).cpu(), (0, width)))
        used.append(torch.nn.functional.pad(batch.read_mask.cpu(), (0, width)))
        weight = _target_weight(batch)
        loss_sum += float(task.loss(logits, batch)) * weight
        loss_weight += weight
    ok, diff, mask = torch.cat(correct), torch.cat(diffs), torch.cat(used)
    return {
        "accuracy": float(ok[mask].float().mean()),
        "attractor_accuracy": float(ok[mask & attractor].float().mean()),
        "main_accuracy": float(ok[mask & main].float().mean()),
        "logit_diff": float(diff[mask].mean()),
        "lm_loss_non_verb": loss_sum / loss_weight,
        "n_sentences": len(encoded),
        "n_verbs": int(mask.sum()),
        "n_attractor_verbs": int((mask & attractor).sum()),
    }


def format_metrics(metrics: dict[str, float]) -> str:
    """The held-out numbers as one readable block."""
    return "\n".join(
        [
            f"held-out agreement accuracy: {metrics['accuracy']:.4f} "
            f"({metrics['n_verbs']} verbs in {metrics['n_sentences']} sentences)",
            f"  on attractor verbs:        {metrics['attractor_accuracy']:.4f} "
            f"({metrics['n_attractor_verbs']} verbs)",
            f"  on main-subject verbs:     {metrics['main_accuracy']:.4f}",
            f"  mean logit difference:     {metrics['logit_diff']:.3f}",
            f"LM loss on non-verb tokens:  {metrics['lm_loss_non_verb']:.4f} nats/token",
        ]
        + ([f"training time: {metrics['wall_time_s']:.0f} s"] if "wall_time_s" in metrics else [])
    )


def _target_weight(batch: Batch) -> float:
    """Total weight `lm_loss` divides by for this batch (to average over batches exactly)."""
    weight = batch.attention_mask[:, 1:].float()
    if batch.lm_weight is not None:
        weight = weight * batch.lm_weight[:, :-1]
    return float(weight.sum())


def _train_batches(
    tokenizer: Any, batch_size: int, *, seed: int, grammar: Grammar, pool: int = 16
) -> Iterator[Batch]:
    """Endless batches of fresh train-split sentences (both members of each pair are used).

    Sentences are drawn `pool` batches at a time and grouped by length, so a batch carries
    little padding (lengths vary 2-3x; padding would otherwise waste about half the compute);
    the order of the batches within a pool is shuffled (seeded).
    """
    pairs = (p for p in iter_pairs(seed, grammar) if p.split == "train")
    order_rng = torch.Generator().manual_seed(seed)
    while True:
        chunk: list[AgreementPair] = list(itertools.islice(pairs, pool * batch_size // 2))
        # Each twin once as the clean sentence: (clean, corrupted) and (corrupted, clean).
        both = chunk + [AgreementPair(p.corrupted, p.clean) for p in chunk]
        both.sort(key=lambda pair: len(pair.clean))
        encoded = encode_pairs(both, tokenizer)
        starts = torch.arange(0, len(both) - batch_size + 1, batch_size)
        for start in starts[torch.randperm(len(starts), generator=order_rng)].tolist():
            yield encoded.batch(torch.arange(start, start + batch_size))


def _warmup_cosine(warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
