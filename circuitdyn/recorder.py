"""Recording circuits from any training loop, and from a series of saved checkpoints.

`CircuitRecorder` is what a training loop calls every K steps (a plain PyTorch loop,
TransformerLens's training utilities, `circuitdyn.pretrain`)::

    recorder = CircuitRecorder("runs/formation", model, task="agreement", steps=1000, top_n=40)
    for step in range(1000):
        if step % 10 == 0:
            recorder.record(model, step, metrics={"loss": last_loss})
        ...  # forward, backward, optimizer step
    recorder.record(model, 1000)  # the final model
    recorder.close()

Each call attributes the task on a *fixed held-out probe set* (the first ``n_eval`` examples of
the task's dev split, so that scores are comparable across steps), selects the circuit with the
options of circuit-tuning (a `TuningConfig`: ``top_n``, ``selection``, ``method``,
``ablation``, ...), evaluates the model and the circuit on the probe set and appends a snapshot
to a `RunStore`, so every analysis, figure and the report read it like a tuning run.

The probe batches are run only up to their last read position (`Batch.through_last_read`)
when that changes nothing but float rounding: the model is causal and the task's metric
reads the read positions only (checked once, on the first probe batch; the manifest's
``probe.cut_after_last_read`` says which). The tokens after the reads cannot change the
logits there, and the gradient they receive is exactly zero, so their scores are zero; on the
default model's agreement probe the cut drops 60% of the token columns and 40% of a record's
time.

What is recorded at step t (the step convention of the analyses: the weights after t updates):

* the snapshot: edge scores on the probe set (metric units, mean over examples), the selected
  circuit, node scores, and the metrics ``attributed`` (1), ``n_selected``, ``n_edges``,
  ``n_nodes``, ``time_s`` (seconds the call took) plus whatever the caller passes (e.g. the
  training loss);
* one evaluation (`RunStore.log_eval`): ``dev_metric`` (mean task metric of the model, e.g.
  logits), ``dev_accuracy`` (fraction of read positions where the target wins),
  ``dev_metric_empty`` / ``dev_metric_circuit`` (the metric with every edge / every edge
  outside the circuit ablated) and ``faithfulness`` = (circuit - empty) / (model - empty),
  meaningless (or NaN) while model and empty nearly agree, as at initialisation. The circuit's
  numbers need a patched run of the probe set; they are measured at steps that are multiples of
  the config's ``eval_every`` (1 by default: every record; `circuitdyn.pretrain` uses about 10
  steps) and at the planned last step, the model's own numbers at every record.

Recording never changes the training: during a call the model is in eval mode, and afterwards
every module's train/eval mode, the RNG states (torch CPU and CUDA, Python's ``random``,
numpy's global generator) and the parameters' ``.grad`` tensors are as before it. Attribution
back-propagates to the activations only, never into parameter gradients (the parameters do not
require grad during the call; their ``requires_grad`` flags are put back after it).

`track_checkpoints` records an ordered series of saved checkpoints (directories in circuitdyn
or Hugging Face format, or glob patterns) into one run: ``circuitdyn track``.

The manifest of a recording run holds ``"kind": "circuitdyn.recording"``, the `TuningConfig`
of the recorder's settings (``strategy`` "full": the training it watches updates every
parameter; ``steps``: the planned training steps; ``n_eval`` / ``batch_size``: the probe set),
the probe set's description and the caller's ``source`` (what was trained, how).
"""

from __future__ import annotations

import glob
import json
import random
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm import tqdm
from transformer_lens import HookedTransformer

from circuitdyn.activations import (
    ABLATIONS,
    ablated_sources,
    difference_writer,
    mean_activations,
    position_mask,
    source_hooks,
    work_dtype,
)
from circuitdyn.attribution import METHODS, BatchJob, gradient_hooks
from circuitdyn.config import TuningConfig
from circuitdyn.evaluate import Faithfulness, ablation_weights
from circuitdyn.graph import QKV, Graph
from circuitdyn.models import load_model
from circuitdyn.patching import run_patched
from circuitdyn.scores import Scores
from circuitdyn.selection import SELECTIONS, Selection, select
from circuitdyn.store import RunStore
from circuitdyn.tasks import load_task
from circuitdyn.tasks.base import (
    Batch,
    Metric,
    Task,
    accuracy,
    check_tokens,
    checked_metric,
    read_positions,
    take_examples,
)

RECORDING_KIND = "circuitdyn.recording"
"""The manifest ``kind`` of a run written by `CircuitRecorder`."""

RECORDER_DEFAULTS: dict[str, Any] = {
    "task": "agreement",
    "strategy": "full",
    "top_n": 40,
    "n_eval": 32,
    "batch_size": 64,
    "score_dtype": "float32",
    "eval_every": 1,
}
"""`TuningConfig` fields the recorder sets differently from tuning: the behaviour a model
learns (agreement), no circuit-restricted training, a small circuit, a 32-example probe set
(a recording of the default model then costs about as much as one of its training steps),
float32 scores (at initialisation scores are tiny, below float16's resolution), and the
circuit's faithfulness measured at every recorded step (``eval_every``: only at steps that are
multiples of it, and at the planned last step; it costs a patched run of the probe set)."""

KEEP_ABLATED_BYTES = 256 * 2**20
"""The ablated activations of the probe set are kept between attribution and evaluation when
they take at most this many bytes (else they are recomputed: one more forward pass per batch)."""


class CircuitRecorder:
    """Record the circuit of a model under training into a `RunStore` (see the module docstring).

    Args:
        out: the run directory.
        model: the model being trained (its tokenizer builds the task; its architecture is the
            run's graph).
        config: the recorder's settings as a `TuningConfig`; or give its fields as ``options``
            (e.g. ``task="agreement", top_n=40, steps=1000``), with `RECORDER_DEFAULTS` for
            the rest. ``steps`` (the planned training steps) is required either way.
        probe: the probe batches (default: the first ``n_eval`` dev examples of the task).
        reference: batches whose mean activations define mean ablation (default: the first
            ``n_eval`` train examples of the task; required with ``probe`` and mean ablation).
        model_name: what `circuitdyn.models.load_model` loads the initial model by, if anything.
        source: JSON description of the training (saved in the manifest as ``source``).
        resume: continue an existing run made with the same settings (only ``steps`` may
            differ); call `rewind` with the step the training resumes at.
        overwrite: replace an existing run.
    """

    def __init__(
        self,
        out: str | Path,
        model: HookedTransformer,
        config: TuningConfig | None = None,
        *,
        probe: Sequence[Batch] | None = None,
        reference: Sequence[Batch] | None = None,
        model_name: str | None = None,
        source: Mapping[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        **options: Any,
    ) -> None:
        if config is None:
            if "steps" not in options:
                raise ValueError("CircuitRecorder needs steps= (the planned training steps)")
            config = TuningConfig(**{**RECORDER_DEFAULTS, **options})
        elif options:
            raise ValueError(f"give either config or options, not both ({sorted(options)})")
        self.config = config
        self.graph = Graph.from_model(model, config.mlp_blocks)
        rule = ABLATIONS[config.ablation]
        with preserved_state(model):  # building a task must not touch the training's RNG
            self.task: Task = load_task(
                config.task,
                model,
                seed=config.seed,
                twins=rule.needs_corrupted,
                **config.task_options,
            )
            where = str(config.task_options.get("path", "the probe set"))
            if probe is None:
                probe = self._examples("dev")
                where = str(config.task_options.get("path", f"the {config.task} task's dev split"))
                if rule.needs_means and reference is None:
                    reference = self._examples("train")
        self.probe = [batch.trimmed() for batch in probe]
        self.reference = None if reference is None else [b.trimmed() for b in reference]
        check_probe(self.probe, config.ablation, self.reference, where=where)
        self.cut_after_reads = _cut_is_exact(model, self.probe[0], self.task.metric)
        self.positions = read_positions if config.score_positions == "read" else None
        self._prepared: tuple[Any, list[tuple[Batch, Tensor, Tensor | None]]] | None = None

        out = Path(out)
        if resume and (out / "manifest.json").exists():
            self.store = RunStore.open(out)
            _check_same_settings(self.store, config)
        else:
            self.store = RunStore.create(
                out,
                manifest=self._manifest(model, model_name, source),
                src_names=self.graph.src_names,
                dst_names=self.graph.dst_names,
                edge_valid=self.graph.edge_valid,
                node_names=self.graph.node_names,
                score_dtype=getattr(torch, config.score_dtype),
                overwrite=resume or overwrite,
            )

    # ---- setup ----------------------------------------------------------------------------
    def _examples(self, split: str) -> list[Batch]:
        batches = self.task.batches(split, self.config.batch_size, seed=0)
        return list(take_examples(batches, self.config.n_eval))

    def _manifest(
        self,
        model: HookedTransformer,
        model_name: str | None,
        source: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        n_probe = sum(batch.size for batch in self.probe)
        return {
            "kind": RECORDING_KIND,
            "config": self.config.to_dict(),
            "n_selectable": SELECTIONS[self.config.selection].n_max(self.graph),
            "model_name": model_name,
            "model_config": json.loads(json.dumps(model.cfg.to_dict(), default=str)),
            "snapshot_semantics": (
                f"scores on a fixed probe set of {n_probe} held-out examples with the weights "
                "after `step` updates"
            ),
            "probe": {
                "split": "dev",
                "n_examples": n_probe,
                "task": self.config.task,
                "cut_after_last_read": self.cut_after_reads,
            },
            "source": dict(source or {}),
        }

    # ---- recording ------------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        """The last recorded step, or None."""
        return self.store.last_step

    def rewind(self, step: int) -> None:
        """Forget every recording at or after `step`: call it when the training resumes at
        `step` from a checkpoint, before recording again."""
        self.store.truncate_after(step - 1)

    def record(
        self,
        model: HookedTransformer,
        step: int,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Attribute, select, evaluate and append the snapshot of `step` (the weights after
        `step` updates; larger than every recorded step). `metrics`: the caller's scalars for
        the snapshot (e.g. ``{"loss": 2.3, "lr": 1e-3}``). Returns the evaluation (see the
        module docstring) and the circuit's size. The model's modes, the RNG states and the
        parameters' gradients are as before the call."""
        started = time.perf_counter()
        last = self.store.last_step
        if last is not None and step <= last:
            raise ValueError(
                f"step {step} is not after the last recorded step {last}; record steps in "
                "increasing order (after resuming, call rewind(step) first)"
            )
        self._check_model(model)
        with preserved_state(model), _frozen_parameters(model):
            model.eval()
            scores, selection, evaluation = self._measure(model, step)
        circuit_metrics = {
            "attributed": 1.0,
            "n_selected": float(selection.n),
            "n_edges": float(selection.circuit.n_edges),
            "n_nodes": float(selection.circuit.n_nodes),
        }
        # The evaluation goes with the snapshot: its line is written first and made durable
        # before the snapshot's rename commits the step (a crash in between leaves an
        # evaluation that `rewind` removes), fsynced beside the snapshot file.
        self.store.append(
            step,
            edge_scores=scores.edges,
            edge_mask=selection.circuit.mask,
            node_scores=scores.nodes,
            metrics={
                **circuit_metrics,
                "time_s": time.perf_counter() - started,
                **(metrics or {}),
            },
            evaluation=evaluation,
        )
        return {**evaluation, **circuit_metrics}

    def _check_model(self, model: HookedTransformer) -> None:
        graph = Graph.from_model(model, self.config.mlp_blocks)
        if graph.src_names != self.graph.src_names or graph.dst_names != self.graph.dst_names:
            raise ValueError(
                f"the model's graph ({graph}) is not the recorded run's ({self.graph}); a run "
                "records one architecture"
            )

    def _measure(
        self, model: HookedTransformer, step: int
    ) -> tuple[Scores, Selection, dict[str, float]]:
        """Scores of the probe set, the selected circuit and the probe-set evaluation.

        Per probe batch: the ablated sources (for corrupted ablation the corrupted run, whose
        logits are those of the empty circuit), one attribution pass (for EAP it also gives the
        clean logits), then, once the circuit is selected, one patched run of the circuit (and
        of the empty circuit, for the other ablations)."""
        c, graph, metric = self.config, self.graph, self.task.metric
        device = next(model.parameters()).device
        means = None
        if ABLATIONS[c.ablation].needs_means:
            means = mean_activations(model, graph, [b.to(device) for b in self.reference or []])
        probe = self._probe_on(model, device)
        total = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.float64)
        values: dict[str, list[Tensor]] = {"full": [], "empty": [], "circuit": [], "correct": []}
        kept = []
        patched = step % c.eval_every == 0 or step >= c.steps  # the circuit is evaluated
        for batch, mask, _ in probe:
            ablated, empty_logits = self._sources(model, batch, means)
            size = ablated.numel() * ablated.element_size() * len(probe)
            if patched and size <= KEEP_ABLATED_BYTES:
                kept.append(ablated.clone())  # attribution overwrites its copy
            summed, logits, full = self._attribute(model, batch, ablated, mask)
            total += summed.detach().double().cpu()
            values["full"].append(full)
            values["correct"].append(accuracy(logits, batch))
            if empty_logits is not None:
                values["empty"].append(checked_metric(metric(empty_logits, batch), batch))
        n = sum(batch.size for batch, _, _ in probe)
        scores = Scores(graph, total / n, {"method": c.method, "ablation": c.ablation})
        selection = select(scores, c.n_at(step), c.selection, absolute=c.absolute)
        if not patched:
            # No faithfulness at this step: the model's own numbers came free with attribution.
            full = torch.cat(values["full"]).double()
            evaluation = {"dev_metric": float(full.mean())}
            evaluation["dev_accuracy"] = float(torch.cat(values["correct"]).double().mean())
            if values["empty"]:
                evaluation["dev_metric_empty"] = float(torch.cat(values["empty"]).double().mean())
            return scores, selection, evaluation

        runs = [("circuit", ablation_weights(graph, selection.circuit, device))]
        if not values["empty"]:
            runs.append(("empty", graph.edge_valid.to(device=device, dtype=torch.float32)))
        for i, (batch, _, pad) in enumerate(probe):
            ablated = kept[i] if kept else self._sources(model, batch, means)[0]
            for name, weights in runs:
                logits = run_patched(model, graph, batch.clean, ablated, weights, pad)
                values[name].append(checked_metric(metric(logits, batch), batch))
        joined = {name: torch.cat(parts).double().cpu() for name, parts in values.items()}
        with warnings.catch_warnings():  # degenerate early in training: reported, not warned
            warnings.simplefilter("ignore")
            faithful = Faithfulness.from_values(joined["circuit"], joined["full"], joined["empty"])
        return (
            scores,
            selection,
            {
                "dev_metric": faithful.m_full,
                "dev_accuracy": float(joined["correct"].mean()),
                "dev_metric_empty": faithful.m_empty,
                "dev_metric_circuit": faithful.m_circuit,
                "faithfulness": faithful.value,
            },
        )

    def _sources(
        self, model: HookedTransformer, batch: Batch, means: Tensor | None
    ) -> tuple[Float[Tensor, "n_src batch pos d_model"], Tensor | None]:
        """The ablated source activations of `batch` and, for corrupted ablation, the logits of
        the corrupted run from the same forward pass: the run with every edge ablated (what
        patching every edge reproduces), so the empty circuit needs no patched run."""
        if self.config.ablation != "corrupted":
            return ablated_sources(model, self.graph, batch, self.config.ablation, means), None
        assert batch.corrupted is not None  # check_probe
        shape = (self.graph.n_src, *batch.clean.shape, model.cfg.d_model)
        out = torch.empty(shape, device=batch.clean.device, dtype=work_dtype(model))

        def write(index: slice | int, value: Tensor) -> None:
            out[index] = value

        with torch.no_grad(), _temporary_hooks(model, source_hooks(model, self.graph, write)):
            logits = model(batch.corrupted)
        return out, logits

    def _attribute(
        self,
        model: HookedTransformer,
        batch: Batch,
        ablated: Float[Tensor, "n_src batch pos d_model"],
        mask: Bool[Tensor, "batch pos"],
    ) -> tuple[Float[Tensor, "n_src n_dst"], Float[Tensor, "batch pos d_vocab"], Tensor]:
        """Edge scores of `batch` summed over its examples (overwrites `ablated`), the clean
        logits and the task metric of each example on them. EAP is `circuitdyn.attribution`'s
        pass, keeping the logits of its clean run; other methods score with their `METHODS`
        entry, then run the model once more."""
        c, graph, metric = self.config, self.graph, self.task.metric
        if c.method != "eap":
            job = BatchJob(model, graph, batch, metric, ablated, mask, c.ig_steps)
            summed = METHODS[c.method](job)
            with torch.no_grad():
                logits = model(batch.clean)
            return summed, logits, checked_metric(metric(logits, batch), batch)
        summed = ablated.new_zeros(graph.n_src, graph.n_dst)
        leaf: dict[str, Tensor] = {}
        first: list[Tensor] = []  # layer 0's query, key and value: the earliest destinations

        def input_leaf(act: Tensor, hook: Any) -> Tensor:
            # The backward pass stops at the embedding: no parameter gradients.
            leaf["input"] = act.detach().requires_grad_(True)
            return leaf["input"]

        def keep_first(act: Tensor, hook: Any) -> None:
            first.append(act)

        hooks = [*source_hooks(model, graph, difference_writer(ablated, mask))]
        hooks += [("blocks.0.hook_resid_pre", input_leaf)]
        hooks += gradient_hooks(model, graph, ablated, summed)
        hooks += [(f"blocks.0.attn.hook_{name}", keep_first) for name in QKV]
        with torch.enable_grad(), _temporary_hooks(model, hooks):
            logits = model(batch.clean)
            values = checked_metric(metric(logits, batch), batch)
            torch.autograd.grad(values.sum(), _backward_inputs(first, leaf["input"]))
        return summed, logits.detach(), values.detach()

    def _probe_on(
        self, model: HookedTransformer, device: torch.device
    ) -> list[tuple[Batch, Tensor, Tensor | None]]:
        """The probe batches on `device`, checked against the model's vocabulary and context,
        each with its attribution position mask and its padding mask for patched runs (None
        when it has no padding); built once per device and model shape, as the probe set is
        fixed."""
        key = (device, model.cfg.d_vocab, model.cfg.n_ctx)
        if self._prepared is None or self._prepared[0] != key:
            prepared = []
            for batch in self.probe:
                batch = batch.to(device)
                if self.cut_after_reads:
                    batch = batch.through_last_read()
                check_tokens(batch, model.cfg.d_vocab, model.cfg.n_ctx)
                chosen = None if self.positions is None else self.positions(batch)
                pad = None if bool(batch.attention_mask.all()) else batch.attention_mask
                prepared.append((batch, position_mask(batch, chosen), pad))
            self._prepared = (key, prepared)
        return self._prepared[1]

    def close(self) -> None:
        """Release the run's write lock."""
        self.store.close()

    def __enter__(self) -> CircuitRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_probe(
    probe: Sequence[Batch],
    ablation: str,
    reference: Sequence[Batch] | None = None,
    *,
    where: str = "the probe set",
) -> None:
    """ValueError, naming `where` and the fix, when the probe set cannot be attributed with
    `ablation`: it is empty, lacks corrupted tokens that the ablation reads, or the ablation
    needs reference batches for its means and none are given."""
    if not probe:
        raise ValueError(f"{where}: the probe set is empty; give at least one example")
    rule = ABLATIONS[ablation]
    if rule.needs_corrupted and any(batch.corrupted is None for batch in probe):
        raise ValueError(
            f"{where}: the probe set has no corrupted tokens, which ablation {ablation!r} needs; "
            "give examples with corrupted twins or use ablation 'mean' or 'zero'"
        )
    if rule.needs_means and not reference:
        raise ValueError(
            f"{where}: ablation {ablation!r} needs reference examples for its mean activations; "
            "give reference batches or use ablation 'corrupted' or 'zero'"
        )


def _cut_is_exact(model: HookedTransformer, batch: Batch, metric: Metric) -> bool:
    """Whether every record may cut the probe batches after their last read position
    (`Batch.through_last_read`) and still record the same numbers: the model is causal, so
    nothing at or before a read position depends on later tokens, and the task's metric reads
    the logits at the read positions only, as the `Task` contract says. That is checked on one
    probe batch (the metric of the whole batch and of the cut one agree to rounding; a metric
    that reads elsewhere keeps the whole probe). Exact up to float rounding: the scores sum
    the same nonzero terms (the gradient after the last read position is exactly zero)."""
    if model.cfg.attention_dir != "causal":
        return False
    batch = batch.to(next(model.parameters()).device)
    cut = batch.through_last_read()
    if cut is batch:
        return False
    with preserved_state(model), torch.no_grad():
        model.eval()
        whole = metric(model(batch.clean), batch).double()
        try:
            part = metric(model(cut.clean), cut).double()
        except (IndexError, RuntimeError, ValueError):  # it reads past the cut
            return False
    tolerance = max(1e-4, 8 * torch.finfo(model.cfg.dtype).eps) * (1 + float(whole.abs().max()))
    return part.shape == whole.shape and float((part - whole).abs().max()) <= tolerance


@contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block anything may change the model's train/eval modes, the RNG states and
    the parameters' gradients; after it they are as before (each module's mode; torch's CPU
    and initialised CUDA generators, Python's ``random``, numpy's global generator; each
    parameter's ``.grad`` tensor, unchanged, as gradients computed inside go to fresh
    tensors that are dropped)."""
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for module, mode in modes:
            # What ``module.training = mode`` does, without nn.Module.__setattr__'s checks for
            # parameters, buffers and submodules (a tenth of the cost).
            object.__setattr__(module, "training", mode)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002


@contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block no parameter of `model` requires grad; afterwards each has its flag
    back. Attribution differentiates with respect to the activations only (the embedding leaf
    and what follows it), so the gradients it computes are the same, bit for bit, but autograd
    no longer records the parameters' side of each operation: a tenth less time for the
    attribution pass of the default model."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _backward_inputs(first: Sequence[Tensor], embedding: Tensor) -> list[Tensor]:
    """Where the EAP backward pass may stop: layer 0's query, key and value (`first`), rather
    than the embedding leaf. They are the earliest destinations, and every other destination
    (a later layer's q/k/v, any MLP input, the logits) lies between them and the output, as
    circuitdyn's graphs are sequential blocks (`circuitdyn.graph.check_supported` refuses
    parallel attention+MLP), so all the gradients the scores need have arrived by then. What
    is cut off (layer 0's q/k/v projections and ln1, the embedding) would only compute the
    unused gradient of the embedding; the nodes that do run, and the order in which they
    accumulate gradients, are the same, so the scores are too, bit for bit (tested against
    the full pass). The embedding leaf when one of `first` is not part of the graph."""
    if len(first) == len(QKV) and all(act.requires_grad for act in first):
        return list(first)
    return [embedding]


@contextmanager
def _temporary_hooks(model: HookedTransformer, hooks: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """``model.hooks(fwd_hooks=hooks)`` for named hook points, removing on exit only the hooks
    it added: TransformerLens's context resets every hook point of the model on exit (about
    0.3 ms for the default model, twice per recorded step), this touches the named ones."""
    model.context_level += 1
    level = model.context_level
    points: dict[int, Any] = {}
    try:
        for name, hook in hooks:
            point = model.mod_dict[name]
            point.add_hook(hook, dir="fwd", level=level)
            points[id(point)] = point
        yield
    finally:
        for point in points.values():
            point.remove_hooks("fwd", level=level)
        model.context_level -= 1


def _check_same_settings(store: RunStore, config: TuningConfig) -> None:
    saved = {k: v for k, v in store.config.to_dict().items() if k != "steps"}
    given = {k: v for k, v in config.to_dict().items() if k != "steps"}
    if saved != given:
        changed = sorted(k for k in given if saved.get(k) != given[k])
        raise ValueError(
            f"cannot resume {store.directory}: it was recorded with other settings "
            f"({', '.join(changed)}); resume with the same settings or use overwrite"
        )


# ---------------------------------------------------------------------------------------------
# a series of saved checkpoints
# ---------------------------------------------------------------------------------------------
_STEP_IN_NAME = re.compile(r"(?:global_step|step|checkpoint|ckpt|iter)[-_]?(\d+)", re.IGNORECASE)
# config.json entries that say nothing about the architecture
_VOLATILE_CONFIG = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "model_name", "_commit_hash"}
)


def expand_checkpoints(patterns: Sequence[str | Path]) -> list[Path]:
    """The checkpoint directories named by `patterns`: paths as given, glob patterns (``*``,
    ``?``, ``[``) expanded and sorted by the step in their names. ValueError for a pattern that
    matches nothing and FileNotFoundError for a path that does not exist."""
    paths: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if any(ch in text for ch in "*?["):
            matches = [Path(m) for m in glob.glob(text)]
            if not matches:
                raise ValueError(
                    f"{text}: the pattern matches nothing; check it (quote it so that the shell "
                    "passes it on unexpanded)"
                )
            paths += sorted(matches, key=_step_order)
        else:
            if not Path(text).exists():
                raise FileNotFoundError(f"{text}: no such checkpoint directory")
            paths.append(Path(text))
    if not paths:
        raise ValueError("no checkpoints given")
    return paths


def _step_order(path: Path) -> tuple[bool, int, str]:
    step = step_from_name(path)
    return (step is None, step or 0, str(path))


def step_from_name(path: str | Path) -> int | None:
    """The training step in a checkpoint's directory name: ``step_00000100``, ``step100``,
    ``checkpoint-100`` (Hugging Face Trainer), ``global_step100``, ``iter_100`` or a name that
    is only digits; None when the name has none of these."""
    name = Path(path).name
    if name.isdigit():
        return int(name)
    found = _STEP_IN_NAME.findall(name)
    return int(found[-1]) if found else None


def checkpoint_steps(paths: Sequence[Path], steps: Sequence[int] | None = None) -> list[int]:
    """The step of each checkpoint (`steps` if given, else parsed from the names), checked to
    be strictly increasing. ValueError naming the checkpoint and the fix otherwise."""
    if steps is not None:
        if len(steps) != len(paths):
            raise ValueError(
                f"--steps gives {len(steps)} steps for {len(paths)} checkpoints; give one per "
                "checkpoint"
            )
        found = [int(s) for s in steps]
    else:
        found = []
        for path in paths:
            step = step_from_name(path)
            if step is None:
                raise ValueError(
                    f"{path}: no step in the name (like step_100 or checkpoint-100); rename it or "
                    "give the steps with --steps"
                )
            found.append(step)
    for i in range(1, len(found)):
        if found[i] <= found[i - 1]:
            raise ValueError(
                f"{paths[i]}: step {found[i]} does not come after step {found[i - 1]} of "
                f"{paths[i - 1]}; give the checkpoints in training order (or fix --steps)"
            )
    if found and found[0] < 0:
        raise ValueError(f"{paths[0]}: step {found[0]} is negative")
    return found


def check_same_architecture(paths: Sequence[Path]) -> None:
    """ValueError naming the first checkpoint whose ``config.json`` describes another
    architecture than the first checkpoint's (entries such as the dtype or the name are
    ignored)."""
    first = _architecture(paths[0])
    for path in paths[1:]:
        other = _architecture(path)
        if other != first:
            key = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))[0]
            raise ValueError(
                f"{path}: its architecture differs from the first checkpoint {paths[0]} ({key} is "
                f"{other.get(key)!r}, not {first.get(key)!r}); track checkpoints of one training run"
            )


def _architecture(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(
            f"{path}: no config.json; give model directories (circuitdyn save_model or Hugging "
            "Face save_pretrained)"
        )
    try:
        payload = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config}: not valid JSON ({error})") from None
    return {k: v for k, v in payload.items() if k not in _VOLATILE_CONFIG}


def track_checkpoints(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    steps: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    **options: Any,
) -> RunStore:
    """Record the circuit of each of an ordered series of saved checkpoints into one run.

    Args:
        checkpoints: model directories (circuitdyn or Hugging Face format) or glob patterns
            (see `expand_checkpoints`), in training order.
        out: the run directory.
        steps: the training step of each checkpoint (default: parsed from the names).
        resume: continue a run of the same settings, skipping the checkpoints already recorded.
        overwrite: replace an existing run.
        device: where to run the models (default: the accelerator, else the CPU).
        options: the recorder's `TuningConfig` fields (``task``, ``top_n``, ``method``, ...;
            `RECORDER_DEFAULTS` otherwise). ``steps`` of the config is the last checkpoint's.

    Returns the run's `RunStore` (closed for writing). Cost per checkpoint: loading it plus one
    recording (about 0.2 s for the default model on 2 CPU cores).
    """
    paths = expand_checkpoints(checkpoints)
    found = checkpoint_steps(paths, steps)
    check_same_architecture(paths)
    model = load_model(paths[0], device=device)
    source = {
        "kind": "checkpoints",
        "checkpoints": [str(p) for p in paths],
        "steps": found,
    }
    recorder = CircuitRecorder(
        out,
        model,
        steps=max(found[-1], 1),
        model_name=str(paths[0]),
        source=source,
        resume=resume,
        overwrite=overwrite,
        **options,
    )
    with recorder:
        done = recorder.last_step
        if resume:
            recorder.rewind(0 if done is None else done + 1)  # drops a half-written record
        todo = [(p, s) for p, s in zip(paths, found, strict=True) if done is None or s > done]
        for i, (path, step) in enumerate(tqdm(todo, desc="track", disable=not progress)):
            if i > 0 or path != paths[0]:
                model = load_model(path, device=device)
            recorder.record(model, step, {"checkpoint_index": float(paths.index(path))})
    return recorder.store


__all__ = [
    "KEEP_ABLATED_BYTES",
    "RECORDER_DEFAULTS",
    "RECORDING_KIND",
    "CircuitRecorder",
    "check_probe",
    "check_same_architecture",
    "checkpoint_steps",
    "expand_checkpoints",
    "preserved_state",
    "step_from_name",
    "track_checkpoints",
]
