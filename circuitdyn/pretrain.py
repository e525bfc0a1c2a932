"""Pretraining the embedded default model from scratch on the agreement language.

`pretrain(out_dir)` trains a small HookedTransformer with the plain next-token loss on freshly
generated *train-split* sentences mixed with *copy items* (``<bos> S S`` of a short train-split
sentence S, a fraction `copy_fraction` of the sequences), so that it learns to copy (induction);
the split is a hash of the sentence pair, so the held-out sentences of every task are never seen.
It then measures agreement and the capabilities of `circuitdyn.tasks.capabilities` on held-out
test-split data and writes ``config.json``, ``model.safetensors``, ``tokenizer/`` and
``metrics.json`` to `out_dir`.
Everything is seeded: the same seed and settings give the same weights on the same machine.

The shipped model was made with::

    OMP_NUM_THREADS=1 circuitdyn pretrain --out circuitdyn/assets/default --seed 0 --steps 10000

(the exact command is in its ``metrics.json``).

With ``record_every=K`` (``circuitdyn pretrain --record-every K --out RUN``) the agreement
circuit is recorded every K steps by a `circuitdyn.recorder.CircuitRecorder` into the run
directory RUN (a `RunStore`, resumable with ``resume=True``), and the model goes to
``RUN/model``: the same weights, bit for bit, as without recording.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn.models import default_device, save_model, silence_tl_deprecation
from circuitdyn.recorder import RECORDER_DEFAULTS, CircuitRecorder
from circuitdyn.store import RunStore, flatten_state, strip_prefix, unflatten_state
from circuitdyn.tasks.agreement import (
    BOS,
    DEFAULT_GRAMMAR,
    AgreementPair,
    Grammar,
    copy_grammar,
    iter_pairs,
)
from circuitdyn.tasks.agreement_tasks import AgreementTask
from circuitdyn.tasks.base import Batch, gather_read_logits, lm_loss
from circuitdyn.tasks.batching import pad_sequences
from circuitdyn.tasks.capabilities import CAPABILITIES, CapabilityTask, Probe, encode_probes
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
    steps: int = 10_000,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 200,
    weight_decay: float = 0.01,
    shape: ModelShape | None = None,
    grammar: Grammar = DEFAULT_GRAMMAR,
    copy_fraction: float = 0.5,
    n_eval: int = 2000,
    device: str | torch.device | None = None,
    progress: bool = True,
    command: str | None = None,
    record_every: int | None = None,
    record: Mapping[str, Any] | None = None,
    save_every: int | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the default model from scratch and write it to `out_dir`.

    Args:
        out_dir: where the model files and ``metrics.json`` go (created if needed); with
            `record_every`, the run directory of the recording, and the model goes to
            ``out_dir/model``.
        seed: seeds the weights' initialisation and the sentence stream.
        steps, batch_size: optimiser steps and sentences per step.
        lr, warmup, weight_decay: AdamW with linear warmup then cosine decay to 0.
        shape: the architecture (default `ModelShape()`).
        copy_fraction: fraction of the training sequences that are copy items.
        n_eval: held-out test-split sentence pairs (and examples of each capability) to
            measure at the end.
        device: None means CUDA if available, else CPU.
        progress: show a tqdm progress bar.
        command: the command line recorded in ``metrics.json``.
        record_every: record the agreement circuit every this many steps and at the end
            (`circuitdyn.recorder.CircuitRecorder`); the weights come out the same as without.
        record: the recorder's `TuningConfig` fields (e.g. ``{"top_n": 40, "method": "eap"}``);
            the agreement task is built with ``n_eval`` sentence pairs per split unless
            ``task_options`` says otherwise.
        save_every: also save the model every this many steps and at the end as
            ``out_dir/models/step_<8 digits>`` (the weights after that many updates), e.g.
            for ``circuitdyn track``.
        checkpoint_every: with `record_every`, save model, optimizer and RNG state in the run
            every this many steps (and at the end), so that `resume` can continue it; the
            initial model is kept in ``out_dir/models/step_00000000``, the run's ``model_name``
            (so the weight and head-role analyses see how the weights moved).
        resume: continue a recording run from its last checkpoint (same settings); the result
            is the same as that of an uninterrupted run. Skipping the sentence stream to the
            checkpoint costs about 10 ms per step done.
        overwrite: replace an existing recording run (and its ``model/`` and ``models/``).

    Returns:
        The held-out metrics (see `heldout_metrics`) plus the training time (``wall_time_s``).
    """
    out_dir = Path(out_dir)
    shape = shape or ModelShape()
    device = torch.device(device) if device is not None else default_device()
    for name, value in (("record_every", record_every), ("save_every", save_every)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= copy_fraction < 1.0:
        raise ValueError(f"copy_fraction must lie in [0, 1), got {copy_fraction}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    recording = record_every is not None
    model_dir = out_dir / "model" if recording else out_dir
    settings = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "copy_fraction": copy_fraction,
        "shape": asdict(shape),
        "record_every": record_every,
    }
    if recording and overwrite and not resume and (out_dir / "manifest.json").is_file():
        for name in ("model", "models"):  # ours; the store refuses to delete foreign entries
            shutil.rmtree(out_dir / name, ignore_errors=True)
    start = time.perf_counter()

    # The model reloads its tokenizer from disk (TransformerLens's set_tokenizer), so save first;
    # a recording run's directory must be empty until the run is created in it.
    with tempfile.TemporaryDirectory(prefix="circuitdyn-tokenizer-") as scratch:
        where = Path(scratch) if recording else model_dir
        tokenizer_dir = save_word_tokenizer(build_word_tokenizer(), where / "tokenizer")
        tokenizer = load_word_tokenizer(tokenizer_dir)
        torch.manual_seed(seed)
        with silence_tl_deprecation():
            model = HookedTransformer(shape.config(len(tokenizer)), tokenizer=tokenizer)
    model = model.to(device, print_details=False)
    model.train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, steps))
    stream = _train_batches(
        tokenizer, batch_size, seed=seed, grammar=grammar, copy_fraction=copy_fraction
    )
    recorder, first, last_loss, smoothed = None, 0, None, None
    if record_every is not None:
        settings["checkpoint_every"] = checkpoint_every
        recorder = _recorder(out_dir, model, settings, record, resume=resume, overwrite=overwrite)
        if resume:
            first, last_loss, smoothed = _resume(recorder, model, optimizer, schedule, device)
            for _ in range(first):
                next(stream)
        if first == 0:
            save_model(model, _initial_model(out_dir))

    bar = tqdm(
        range(first, steps),
        desc="pretrain",
        disable=not progress,
        mininterval=1.0,
        initial=first,
        total=steps,
    )
    for step in bar:
        if recorder is not None and step % record_every == 0:
            recorder.record(model, step, _train_metrics(schedule, last_loss, smoothed))
        if save_every is not None and step % save_every == 0 and not (recording and step == 0):
            save_model(model, out_dir / "models" / f"step_{step:08d}")
        batch = next(stream).to(device)
        loss = lm_loss(model(batch.clean), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        last_loss = loss.item()
        smoothed = last_loss if smoothed is None else 0.98 * smoothed + 0.02 * last_loss
        bar.set_postfix(loss=f"{smoothed:.3f}", refresh=False)
        if recorder is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            meta = {"loss": last_loss, "smoothed": smoothed}
            _save_checkpoint(recorder.store, step, model, optimizer, schedule, meta)
    if recorder is not None:
        recorder.record(model, steps, _train_metrics(schedule, last_loss, smoothed))
        recorder.close()
    if save_every is not None:
        save_model(model, out_dir / "models" / f"step_{steps:08d}")
    wall_time = time.perf_counter() - start

    model.eval()
    metrics = heldout_metrics(model, n=n_eval, seed=seed, grammar=grammar)
    metrics["wall_time_s"] = round(wall_time, 1)
    save_model(model, model_dir)
    training = {key: value for key, value in settings.items() if value is not None}
    training.update(
        device=str(device), torch_threads=torch.get_num_threads(), torch_version=torch.__version__
    )
    record_json = {
        "command": command or f"circuitdyn pretrain --out {out_dir} --seed {seed} --steps {steps}",
        "heldout": metrics,
        "training": training,
    }
    (model_dir / "metrics.json").write_text(json.dumps(record_json, indent=2) + "\n")
    if progress:
        print(format_metrics(metrics))
    return metrics


def _initial_model(out_dir: Path) -> Path:
    """Where a recording run keeps its initial weights: the reference of the weight and
    head-role analyses (the run's ``model_name``)."""
    return (out_dir / "models" / f"step_{0:08d}").resolve()


def _recorder(
    out_dir: Path,
    model: HookedTransformer,
    settings: dict[str, Any],
    record: Mapping[str, Any] | None,
    *,
    resume: bool,
    overwrite: bool,
) -> CircuitRecorder:
    """The recorder of a pretraining run: its `TuningConfig` describes the training and the
    circuit selection (`record`); ``source`` holds the pretraining settings, which a resumed
    run must share."""
    options = {
        "seed": settings["seed"],
        "steps": settings["steps"],
        "record_every": settings["record_every"],
        # Faithfulness (a patched run of the probe set) about every 10 steps, at recorded steps.
        "eval_every": settings["record_every"] * max(1, 10 // settings["record_every"]),
        "checkpoint_every": settings["checkpoint_every"],
        "lr": settings["lr"],
        "weight_decay": settings["weight_decay"],
        "warmup_steps": settings["warmup"],
        "schedule": "cosine",
        **(record or {}),
    }
    if "task_options" not in options:  # the splits the probe set needs, nothing more
        n = options.get("n_eval", RECORDER_DEFAULTS["n_eval"])
        options["task_options"] = {"n_train": n, "n_dev": n, "n_test": n}
    source = {"kind": "pretrain", **settings}
    recorder = CircuitRecorder(
        out_dir,
        model,
        model_name=str(_initial_model(out_dir)),
        source=source,
        resume=resume,
        overwrite=overwrite,
        **options,
    )
    saved = recorder.store.manifest.get("source", {})
    if resume and saved != json.loads(json.dumps(source)):
        changed = sorted(k for k in source if saved.get(k) != source[k])
        raise ValueError(
            f"cannot resume {out_dir}: it was pretrained with other settings "
            f"({', '.join(changed)}); resume with the same settings"
        )
    return recorder


def _resume(
    recorder: CircuitRecorder,
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[int, float | None, float | None]:
    """Load the run's last usable checkpoint into the training state and forget what was
    recorded after it; returns the step to continue at and the last and smoothed loss."""
    last = _resume_checkpoint(recorder.store, recorder.config.record_every)
    first, loss, smoothed = 0, None, None
    if last is not None:
        meta = _load_checkpoint(recorder.store, last, model, optimizer, schedule, device)
        first, loss, smoothed = last + 1, meta["loss"], meta["smoothed"]
    recorder.rewind(first)
    return first, loss, smoothed


def _train_metrics(
    schedule: torch.optim.lr_scheduler.LRScheduler, loss: float | None, smoothed: float | None
) -> dict[str, float]:
    """The training metrics a snapshot gets: the learning rate of the next update and, after
    the first update, the last batch's loss and its running mean (nats/token)."""
    metrics = {"lr": float(schedule.get_last_lr()[0])}
    if loss is not None and smoothed is not None:
        metrics.update(loss=loss, loss_smoothed=smoothed)
    return metrics


def _save_checkpoint(
    store: RunStore,
    step: int,
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    meta: dict[str, Any],
) -> None:
    """Model, optimizer, schedule and RNG state after update `step` (to resume at step + 1)."""
    tensors, skeleton = flatten_state(optimizer.state_dict(), "optimizer")
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "step": step, "optimizer": skeleton, "schedule": schedule.state_dict()}
    store.save_checkpoint(step, tensors=tensors, meta=meta)


def _load_checkpoint(
    store: RunStore,
    step: int,
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> dict[str, Any]:
    """Restore what `_save_checkpoint` saved at `step`; returns its meta."""
    tensors, meta = store.load_checkpoint(step, device=device)
    model.load_state_dict(strip_prefix(tensors, "model"))
    optim = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    optimizer.load_state_dict(unflatten_state(optim, meta["optimizer"]))
    schedule.load_state_dict(meta["schedule"])
    torch.set_rng_state(tensors["rng.torch"].cpu())
    return meta


def _resume_checkpoint(store: RunStore, record_every: int) -> int | None:
    """The newest intact checkpoint whose recorded snapshots (every `record_every` steps up to
    it) are all intact, after removing damaged files with a warning; None if there is none."""
    check = store.verify()
    for path, problem in check.damaged:
        warnings.warn(f"resume: {path} is damaged ({problem}); it is recomputed", stacklevel=3)
    store.remove_damaged(check)
    intact = set(check.snapshot_steps)
    for step in reversed(check.checkpoint_steps):
        if all(s in intact for s in range(0, step + 1, record_every)):
            return step
    return None


@torch.no_grad()
def heldout_metrics(
    model: HookedTransformer,
    *,
    n: int = 2000,
    seed: int = 0,
    batch_size: int = 250,
    grammar: Grammar = DEFAULT_GRAMMAR,
) -> dict[str, float]:
    """Agreement quality on `n` test-split pairs (clean sentences), and each capability's
    accuracy on `n` test-split examples, all never seen in pretraining.

    Returns:
        ``accuracy``: fraction of verbs whose correct form outscores the wrong-number form at
        the position before the verb (all verbs); ``attractor_accuracy``: the same over verbs
        with an opposite-number noun between subject and verb; ``main_accuracy``: verbs of the
        main subject; ``logit_diff``: mean correct-minus-wrong logit over all verbs;
        ``lm_loss_non_verb``: next-token cross-entropy (nats/token) on tokens that are not
        verbs; counts ``n_sentences``, ``n_verbs``, ``n_attractor_verbs``;
        ``<capability>_accuracy`` for ``determiner``, ``selection`` and ``copy``: fraction of
        read positions where the target outscores the foil (`circuitdyn.tasks.capabilities`).
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
    capabilities = {
        f"{name}_accuracy": _capability_accuracy(model, name, n=n, seed=seed, grammar=grammar)
        for name in CAPABILITIES
    }
    return {
        "accuracy": float(ok[mask].float().mean()),
        "attractor_accuracy": float(ok[mask & attractor].float().mean()),
        "main_accuracy": float(ok[mask & main].float().mean()),
        "logit_diff": float(diff[mask].mean()),
        "lm_loss_non_verb": loss_sum / loss_weight,
        "n_sentences": len(encoded),
        "n_verbs": int(mask.sum()),
        "n_attractor_verbs": int((mask & attractor).sum()),
        **capabilities,
    }


def _capability_accuracy(
    model: HookedTransformer, name: str, *, n: int, seed: int, grammar: Grammar
) -> float:
    """Fraction of read positions of `n` test-split examples of capability `name` where the
    target outscores the foil."""
    device = next(model.parameters()).device
    task = CapabilityTask(
        model.tokenizer, capability=name, n_train=0, n_dev=0, n_test=n, seed=seed, grammar=grammar
    )
    correct = total = 0
    for batch in task.batches("test", 250):
        batch = batch.to(device)
        target, foil = gather_read_logits(model(batch.clean), batch)
        correct += int(((target > foil) & batch.read_mask).sum())
        total += int(batch.read_mask.sum())
    return correct / total


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
        + [
            f"held-out {name} accuracy: {metrics[f'{name}_accuracy']:.4f}"
            for name in CAPABILITIES
            if f"{name}_accuracy" in metrics
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
    tokenizer: Any,
    batch_size: int,
    *,
    seed: int,
    grammar: Grammar,
    copy_fraction: float = 0.5,
    pool: int = 16,
) -> Iterator[Batch]:
    """Endless batches of fresh train-split sentences (both members of each pair are used) and,
    a `copy_fraction` of the sequences, copy items ``<bos> S S`` of fresh train-split short
    sentences (both members of each pair, from a stream of its own).

    Sequences are drawn `pool` batches at a time and grouped by length, so a batch carries
    little padding (lengths vary 2-3x; padding would otherwise waste about half the compute);
    the order of the batches within a pool is shuffled (seeded).
    """
    pairs = (p for p in iter_pairs(seed, grammar) if p.split == "train")
    copies = (p for p in iter_pairs(seed + 1, copy_grammar(grammar)) if p.split == "train")
    n_copy_pairs = round(copy_fraction * pool * batch_size / 2)
    n_pairs = pool * batch_size // 2 - n_copy_pairs
    order_rng = torch.Generator().manual_seed(seed)
    while True:
        chunk: list[AgreementPair] = list(itertools.islice(pairs, n_pairs))
        sequences = [s.words for p in chunk for s in (p.clean, p.corrupted)]
        for pair in itertools.islice(copies, n_copy_pairs):
            sequences += [(BOS, *s.words[1:], *s.words[1:]) for s in (pair.clean, pair.corrupted)]
        sequences.sort(key=len)
        # Plain text, no read positions: what `lm_loss` needs.
        encoded = encode_probes([Probe(s, ()) for s in sequences], tokenizer)
        starts = torch.arange(0, len(sequences) - batch_size + 1, batch_size)
        for start in starts[torch.randperm(len(starts), generator=order_rng)].tolist():
            yield encoded.batch(torch.arange(start, start + batch_size))


def _warmup_cosine(warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
