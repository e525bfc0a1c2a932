"""Circuit-tuning and its baselines in one engine, with a snapshot of the circuit at every step.

Circuit-tuning (Fine-Tuning is Subgraph Search, arXiv 2502.06106): every K optimizer steps,
attribute the task metric on the current training batch, select the circuit (top-n edges by
|score| by default), turn it into a parameter mask (per head: W_Q/W_K/W_V rows of heads whose
q/k/v inputs are in the circuit, W_O rows of heads whose outputs are, whole MLPs), and update
*only* those parameters with the task's training loss.

Strategies (`circuitdyn.strategies.STRATEGIES`: circuit, fixed, random, random-matched,
gradient, lora, full) are recorded the same way. For strategies that do not re-search the
circuit, it is still attributed, for the record only, every `record_every` steps.

LoRA (strategy ``lora``, `circuitdyn.lora`): adapters of rank `lora_rank` are put on the model
when the run starts; every model parameter is frozen and only the adapters are in the optimizer
(``n_tunable`` counts them). Attribution, evaluation and the recorded circuits see the adapted
model. Checkpoints hold the adapted model as a plain HookedTransformer state (``model.*``,
weights ``W + B @ A``) and the adapters (``lora.*``); resuming puts the saved adapters on the
model the run started from (`tune` checks that they give the saved weights). When the run ends
the adapters are merged into the weights: the model is a plain HookedTransformer again.

What a snapshot describes. Snapshot t holds the edge scores computed on the batch of step t
with the parameters *before* update t, the circuit used for update t, and the step's metrics
(training loss and batch metric before the update, learning rate, sizes). On steps without
attribution the scores are NaN and ``attributed`` is 0. Dev evaluations made at step t also
use the parameters before update t; the one at step ``steps`` is the final model. The test
split is evaluated twice: at step 0 (the untuned model) and at step ``steps``. Every evaluation
also measures what the task should leave alone: the general-capability loss and, where the task
has them (`circuitdyn.tasks.capability_tasks`), the accuracy on each held-out capability.

Frozen means frozen. Parameters wholly outside the circuit get no gradient, so the optimizer
skips them: no update, no weight decay, no change of optimizer state. Parameters partly inside
(a head's rows of W_Q, ...) are restored after the step outside the mask, and so are their
optimizer moments (AdamW's exp_avg / exp_avg_sq, SGD's momentum buffer). An entry that leaves
the circuit therefore keeps its moments frozen until it re-enters and then resumes from them;
the bias-correction counter of AdamW is per tensor and counts the steps in which any entry of
the tensor was tuned.

Sharing work: with method ``eap`` the attribution and the training step share the clean
forward pass (`attribution.eap_with_loss`); other methods run separately, before the update.

Several processes (``torchrun``; `circuitdyn.distributed`): pass ``dist=DistContext...``. Each
rank tunes its rows of every batch; scores, batch metrics and (through
`DistributedDataParallel`) gradients are summed over the ranks, so every rank selects the same
circuit and takes the same step as one process with the same global batch. Rank 0 alone writes
the store and evaluates. Strategies ``gradient`` (it would rank slots on each rank's own rows)
and ``lora`` are single-process only.

FSDP (``fsdp=True``, ``--fsdp``; `circuitdyn.sharding`): under torchrun the model is sharded
block by block with FSDP2 instead of being wrapped in DDP, so each rank holds 1/N of the
parameters, gradients and optimizer moments. The data are split as above; FSDP's backward
reduce-scatters the gradients, averaged over the ranks as DDP's all-reduce is (so the same loss
scaling holds), at every micro-batch. The masks are laid out like the shards (frozen entries
and their moments stay exact). Attribution runs on the shards: its hooks read a block's
weights while FSDP has gathered that block. Forward passes are collective, so every rank
evaluates (rank 0 alone logs). Checkpoints hold full tensors in the layout of an unsharded run
(rank 0 gathers and writes them), so analyses read them as usual and a run can resume with or
without ``--fsdp`` or with another number of processes; on resume every rank reads the
checkpoint and keeps its shards.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer

from circuitdyn.activations import ABLATIONS, ablated_sources, mean_activations
from circuitdyn.attribution import attribute, eap_with_loss
from circuitdyn.circuit import Circuit
from circuitdyn.config import TuningConfig
from circuitdyn.distributed import SINGLE, DistContext, fail
from circuitdyn.evaluate import faithfulness
from circuitdyn.graph import Graph
from circuitdyn.lora import LoraAdapters, check_rank
from circuitdyn.models import load_model
from circuitdyn.optim import make_optimizer, masked_step, restrict_gradients
from circuitdyn.ownership import parameter_masks
from circuitdyn.scores import Scores
from circuitdyn.selection import SELECTIONS, select
from circuitdyn.sharding import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    shard_blocks,
)
from circuitdyn.store import RunStore, flatten_state, strip_prefix, unflatten_state
from circuitdyn.strategies import STRATEGIES, StrategyInput
from circuitdyn.tasks import capability_tasks, general_task, load_task
from circuitdyn.tasks.base import (
    Batch,
    Task,
    accuracy,
    lm_loss_weights,
    read_positions,
    take_examples,
)


def train_stream(task: Task, batch_size: int, seed: int) -> Iterator[Batch]:
    """The training batches, epoch after epoch, each epoch shuffled by its own seed."""
    for epoch in count():
        yield from task.batches("train", batch_size, seed=seed * 100_003 + epoch)


@dataclass
class RunSummary:
    out: Path
    strategy: str
    steps: int
    final: dict[str, float]

    def line(self) -> str:
        parts = [f"{k}={v:.4g}" for k, v in self.final.items()]
        return f"{self.strategy} run of {self.steps} steps -> {self.out}: " + ", ".join(parts)


class _Run:
    """The state of one run: model, optimizer, current circuit, store."""

    def __init__(
        self,
        config: TuningConfig,
        model: HookedTransformer,
        task: Task,
        general: Task | None,
        store: RunStore | None,
        capabilities: dict[str, Task] | None = None,
        dist: DistContext = SINGLE,
        fsdp: bool = False,
    ) -> None:
        self.config, self.model, self.store, self.dist = config, model, store, dist
        self.fsdp = fsdp
        if fsdp:
            # Before the optimizer is built: it must hold the sharded parameters. FSDP's
            # backward reduce-scatters the gradients (averaged over the ranks, as DDP does).
            shard_blocks(model)
            self.forward = model
        else:
            self.forward = dist.wrap(model)  # DistributedDataParallel under torchrun
        self.task, self.general = task, general
        self.capabilities = capabilities or {}
        self.strategy = STRATEGIES[config.strategy]
        self.graph = Graph.from_model(model, config.mlp_blocks)
        self.device = next(model.parameters()).device
        # LoRA: every model parameter frozen, the adapters (B = 0: the model unchanged) trained.
        self.lora: LoraAdapters | None = None
        if self.strategy.lora:
            self.lora = LoraAdapters(model, config.lora_rank, seed=config.seed)
            self.params = self.lora.parameters()
        else:
            self.params = dict(model.named_parameters())
        self.optimizer = make_optimizer(
            self.params.values(),
            config.optimizer,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            betas=config.betas,
        )
        self.started = False  # the first selection has been made
        self.tuned: Circuit | None = None  # what the updates tune (None: every parameter)
        self.record: Circuit | None = None  # latest circuit selected (for the record)
        self.n_selected = 0  # the n of the latest selection, after clamping
        self.positions = read_positions if config.score_positions == "read" else None
        self.means = None
        if ABLATIONS[config.ablation].needs_means:
            reference = islice(task.batches("train", config.batch_size, seed=config.seed), 8)
            self.means = mean_activations(model, self.graph, reference)
        self._eval_batches: dict[tuple[str, str], list[Batch]] = {}

    def no_sync(self, last: bool) -> AbstractContextManager[Any]:
        """DDP: skip the all-reduce of a micro-batch that is not the step's last. FSDP
        reduce-scatters every micro-batch (skipping it would keep full gradients on each
        rank until the last one)."""
        return nullcontext() if self.fsdp else self.dist.no_sync(self.forward, last)

    def eval_batches(self, which: str, split: str) -> list[Batch]:
        """The first `n_eval` examples of a split of the task (`which`="task"), of the
        general-capability task (`which`="general"; empty when the run has none) or of a held-out
        capability (`which` = its name)."""
        key = (which, split)
        if key not in self._eval_batches:
            named = {"task": self.task, "general": self.general, **self.capabilities}
            task = named[which]
            batches = [] if task is None else task.batches(split, self.config.batch_size, seed=0)
            self._eval_batches[key] = [
                b.to(self.device) for b in take_examples(batches, self.config.n_eval)
            ]
        return self._eval_batches[key]

    # ---- one step ---------------------------------------------------------------------------
    def attributes_at(self, step: int) -> bool:
        if not self.started:
            return True  # every strategy needs the step-0 circuit
        if self.strategy.research:
            return step % self.config.research_every == 0
        return step % self.config.record_every == 0

    def step(self, step: int, micro: list[Batch]) -> dict[str, float]:
        """One optimizer step on the micro-batches `micro`; appends snapshot `step`."""
        c, model, graph = self.config, self.model, self.graph
        lr = c.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        attributed = self.attributes_at(step)
        # The shared pass needs gradients at the embedding, which a frozen (LoRA) model lacks.
        shared = attributed and c.method == "eap" and self.lora is None
        started = time.perf_counter()
        scores: Scores | None = None
        if attributed and not shared:  # before any update: the parameters of this step
            scores = attribute(
                model,
                graph,
                micro,
                self.task.metric,
                method=c.method,
                ablation=c.ablation,
                steps=c.ig_steps,
                means=self.means,
                positions=self.positions,
            )
        summed = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.float64)
        totals = torch.zeros(4, dtype=torch.float64)  # loss, metric, accuracy sums; examples
        scales = self._loss_scales(micro)
        for i, batch in enumerate(micro):
            with self.no_sync(last=i == len(micro) - 1):
                if shared:
                    ablated = ablated_sources(model, graph, batch, c.ablation, self.means)
                    part, logits, loss = eap_with_loss(
                        model,
                        graph,
                        batch,
                        self.task.metric,
                        self.task.loss,
                        ablated,
                        None if self.positions is None else self.positions(batch),
                        forward=self.forward,
                    )
                    summed += part.detach().double().cpu()
                else:
                    logits = self.forward(batch.clean)
                    loss = self.task.loss(logits, batch)
                with self.dist.collective("the gradient all-reduce"):
                    (loss * scales[i] / len(micro)).backward()
            logits = logits.detach()
            # scales: this rank's share of the micro-batch's loss (1 on one process)
            totals[0] += float(loss.detach()) * scales[i] * batch.size
            totals[1] += float(self.task.metric(logits, batch).sum())
            totals[2] += float(accuracy(logits, batch).sum())
            totals[3] += batch.size
        local_examples = float(totals[3])
        self.dist.sum(totals)
        n_examples = float(totals[3])
        if shared or (scores is not None and self.dist.distributed):
            # Every rank divides the same global sum by the same count: the same circuit.
            meta = {"method": c.method, "ablation": c.ablation}
            if not shared:  # attribute() gave this rank's mean: back to its sum
                meta = scores.meta | {"n_examples": n_examples}
                summed = scores.edges.double().cpu() * local_examples
            scores = Scores(graph, self.dist.sum(summed) / n_examples, meta)
        time_forward = time.perf_counter() - started

        tuned = self._choose_circuit(step, scores, micro[0])
        masks = None
        if tuned is not None:
            masks = parameter_masks(model, tuned, c.policy, include_frozen=False)
        restrict_gradients(self.params, masks)
        with_grad = [p for p in self.params.values() if p.grad is not None]
        max_norm = c.grad_clip if c.grad_clip else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm)) if with_grad else 0.0
        masked_step(self.optimizer, self.params, masks)

        shown = tuned if tuned is not None else (self.record or Circuit.empty(graph))
        if masks is None:
            n_tunable = sum(p.numel() for p in self.params.values())
        else:
            n_tunable = sum(int(m.sum()) for m in masks.values())
        sums = dict(zip(("loss", "metric", "accuracy"), totals[:3].tolist(), strict=True))
        metrics = {name: value / n_examples for name, value in sums.items()}
        metrics.update(
            lr=lr,
            grad_norm=grad_norm,
            attributed=float(attributed),
            n_selected=float(self.n_selected),
            n_edges=float(shown.n_edges),
            n_nodes=float(shown.n_nodes),
            n_tunable=float(n_tunable),
            time_s=time.perf_counter() - started,
            time_forward_s=time_forward,
        )
        if self.store is None:  # ranks other than 0 write nothing
            return metrics
        nan_edges = torch.full((graph.n_src, graph.n_dst), math.nan)
        self.store.append(
            step,
            edge_scores=scores.edges if scores is not None else nan_edges,
            edge_mask=shown.mask,
            node_scores=scores.nodes
            if scores is not None
            else nan_edges[0, : len(graph.node_names)],
            metrics=metrics,
        )
        return metrics

    def _loss_scales(self, micro: list[Batch]) -> list[float]:
        """Factor of each micro-batch's loss so that the ranks' gradients, averaged by the
        all-reduce, are the gradient of the loss of the whole (global) micro-batch: a rank's
        loss is a mean over its own weighted tokens, so it counts by its share of the tokens."""
        if not self.dist.distributed:
            return [1.0] * len(micro)
        weigh = getattr(self.task, "loss_weights", lm_loss_weights)
        local = torch.tensor([float(weigh(b).sum()) for b in micro], dtype=torch.float64)
        total = self.dist.sum(local.clone())
        if bool((total <= 0).any()):
            raise ValueError("a training batch has no weighted next-token targets on any rank")
        return (self.dist.world_size * local / total).tolist()

    def _choose_circuit(self, step: int, scores: Scores | None, batch: Batch) -> Circuit | None:
        """The circuit update `step` tunes (None: every parameter), after selecting a new one
        from `scores` when the step attributed."""
        c = self.config
        if scores is not None:
            selection = select(scores, c.n_at(step), c.selection, absolute=c.absolute)
            self.record, self.n_selected = selection.circuit, selection.n
            if self.strategy.research or not self.started:
                given = StrategyInput(
                    self.model, selection.circuit, c.policy, c.seed + step, batch, self.task.loss
                )
                self.tuned = self.strategy.choose(given)
            self.started = True
        if not self.started:
            raise RuntimeError("no circuit yet: the first step must attribute")
        return self.tuned

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def capability_accuracies(self, split: str) -> dict[str, float]:
        """Accuracy on each held-out capability (``{split}_cap_{name}``) and their mean
        (``{split}_cap_mean``): what tuning on the task should leave alone."""
        out = {}
        for name in self.capabilities:
            data = self.eval_batches(name, split)
            if not data:
                continue
            hits = sum(float(accuracy(self.model(b.clean), b).sum()) for b in data)
            out[f"{split}_cap_{name}"] = hits / sum(b.size for b in data)
        if out:
            out[f"{split}_cap_mean"] = sum(out.values()) / len(out)
        return out

    @torch.no_grad()
    def evaluate(self, step: int, split: str = "dev") -> dict[str, float]:
        """Metric and accuracy on `split`, general-capability loss, and faithfulness of the
        current circuit; logged at `step` with keys prefixed by the split (``dev_metric``...).
        Rank 0 alone evaluates under torchrun (the others return an empty dict), except with
        FSDP, whose forward passes need every rank: all evaluate and rank 0 alone logs."""
        if self.store is None and not self.fsdp:
            return {}
        model, task = self.model, self.task
        data = self.eval_batches("task", split)
        metric_sum = acc_sum = 0.0
        for batch in data:
            logits = model(batch.clean)
            metric_sum += float(task.metric(logits, batch).sum())
            acc_sum += float(accuracy(logits, batch).sum())
        n = sum(batch.size for batch in data)
        out = {f"{split}_metric": metric_sum / n, f"{split}_accuracy": acc_sum / n}
        general = self.eval_batches("general", split)
        if general:
            losses = [float(self.general.loss(model(b.clean), b)) * b.size for b in general]
            name = "general_loss" if split == "dev" else f"{split}_general_loss"
            out[name] = sum(losses) / sum(b.size for b in general)
        if self.capabilities:
            out.update(self.capability_accuracies(split))
        circuit = self.tuned if self.tuned is not None else self.record
        if circuit is not None and self.config.eval_faithfulness:
            # Faithfulness is a ratio; near-degenerate denominators are expected early in
            # training (the metric is near 0 when the behaviour flips) and only reported.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                name = "faithfulness" if split == "dev" else f"{split}_faithfulness"
                out[name] = faithfulness(
                    model,
                    self.graph,
                    circuit,
                    data,
                    task.metric,
                    ablation=self.config.ablation,
                    means=self.means,
                ).value
        if self.store is None:  # FSDP: the other ranks evaluated along with rank 0
            return {}
        self.store.log_eval(step, out)
        return out

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, step: int) -> None:
        if self.fsdp:  # collective: every rank gathers, rank 0 gets full tensors ({} elsewhere)
            state = full_state_dict(self.model)
            optimizer_state = full_optimizer_state_dict(self.optimizer)
        if self.store is None:  # rank 0 writes; the ranks' states are identical
            return
        if not self.fsdp:
            state = self.model.state_dict() if self.lora is None else self.lora.model_state_dict()
            optimizer_state = self.optimizer.state_dict()
        optim_tensors, skeleton = flatten_state(optimizer_state, "optimizer")
        tensors = {f"model.{k}": v for k, v in state.items()}
        if self.lora is not None:
            tensors.update({f"lora.{k}": v for k, v in self.lora.state_dict().items()})
        tensors.update(optim_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        meta: dict[str, Any] = {"step": step, "optimizer": skeleton, "n_selected": self.n_selected}
        for key, circuit in (("circuit", self.tuned), ("record", self.record)):
            if circuit is not None:
                tensors[f"{key}.mask"] = circuit.mask
        self.store.save_checkpoint(
            step, tensors=tensors, meta=meta, keep=self.config.keep_checkpoints
        )

    def _load_lora(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put the checkpoint's adapters on the model, after checking that the model's (base)
        weights plus them give the checkpoint's weights, i.e. that the run resumes from the
        model it started from (the model is left as it was otherwise)."""
        assert self.lora is not None
        factors = strip_prefix(tensors, "lora")
        saved = strip_prefix(tensors, "model")
        for name, value in self.lora.model_state_dict(factors).items():
            if name not in saved or not torch.allclose(saved[name], value, rtol=1e-5, atol=1e-6):
                raise ValueError(
                    f"cannot resume the LoRA run in {self.store.directory}: its checkpoint's "
                    f"{name} is not the model's weight plus the saved adapter; resume with the "
                    "model the run started from (its weights before tuning)"
                )
        self.lora.load_state_dict(factors)

    def finish(self) -> None:
        """End of the run (or of its interruption): merge LoRA adapters into the weights."""
        if self.lora is not None and not self.lora.merged:
            self.lora.merge()

    def load(self, step: int, store: RunStore | None = None) -> None:
        """Restore the checkpoint of `step` from the run's store (or `store`, read only). With
        FSDP it is collective: every rank reads the full tensors and keeps its shards."""
        store = store if store is not None else self.store
        assert store is not None
        tensors, meta = store.load_checkpoint(step, device=self.device)
        if self.fsdp:
            load_full_state_dict(self.model, strip_prefix(tensors, "model"), from_rank0=False)
        elif self.lora is None:
            self.model.load_state_dict(strip_prefix(tensors, "model"))
        else:
            self._load_lora(tensors)
        optim = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        optimizer_state = unflatten_state(optim, meta["optimizer"])
        if self.fsdp:
            load_full_optimizer_state_dict(self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(tensors["rng.torch"].cpu())
        self.started = True  # a checkpoint follows at least one update
        self.n_selected = int(meta.get("n_selected", 0))
        for key, attr in (("circuit", "tuned"), ("record", "record")):
            if f"{key}.mask" in tensors:
                setattr(self, attr, Circuit(self.graph, tensors[f"{key}.mask"].cpu().bool()))


def tune(
    config: TuningConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: HookedTransformer | None = None,
    progress: bool = True,
    dist: DistContext = SINGLE,
    fsdp: bool = False,
) -> RunSummary:
    """Run (or resume) a tuning run into the run directory `out` and return its summary.

    `model` defaults to `load_model(config.model)`; pass one to tune a model built in memory
    (its weights at the start of the run are the run's starting point; the manifest then names
    no model, so analyses that compare with the initial weights need them passed explicitly).
    The model is tuned in place; with strategy ``lora`` it ends with the adapters merged into
    its weights, also when the run is interrupted.

    With `resume`, the run continues from the last intact checkpoint in `out` and ends with the
    same weights and snapshots as an uninterrupted run with the same config; every snapshot and
    checkpoint is verified first, and the run restarts after the last step whose snapshots and
    checkpoint are intact (damaged files are reported by a warning and replaced). Without
    `resume`, an existing run in `out` is an error unless `overwrite`.

    Under torchrun pass `dist` (`DistContext.from_environment()`): every rank runs `tune` with
    the same config; the summary's metrics are rank 0's (the others' are empty). With `fsdp`
    (torchrun only) the model is sharded with FSDP2 (`circuitdyn.sharding.shard_blocks`)
    instead of wrapped in DDP; a `model` passed in stays sharded after the run (read its
    weights with `circuitdyn.sharding.full_state_dict` or from the run's checkpoints). `fsdp`
    is a launch setting, not part of the config: a run can resume with or without it."""
    out = Path(out)
    _check_distributed(config, dist, fsdp)
    torch.manual_seed(config.seed)
    given = model
    if model is None:
        model = load_model(config.model, device=dist.device)
    model.train()
    if STRATEGIES[config.strategy].lora:
        check_rank(model, config.lora_rank)  # before anything is built or written
    needs_twins = ABLATIONS[config.ablation].needs_corrupted
    task = load_task(config.task, model, seed=config.seed, twins=needs_twins, **config.task_options)
    general = general_task(config.task, model, seed=config.seed, **config.task_options)
    capabilities = capability_tasks(config.task, model, seed=config.seed, **config.task_options)
    graph = Graph.from_model(model, config.mlp_blocks)
    n_max = SELECTIONS[config.selection].n_max(graph)
    if max(config.top_n, config.top_n_final or 0) > n_max:
        warnings.warn(
            f"the circuit size {config.top_n} exceeds the {n_max} items the {config.selection!r} "
            f"rule can rank on this graph; circuits get {n_max} (recorded as n_selected)",
            stacklevel=2,
        )
    manifest = {
        "kind": "circuitdyn.tuning",
        "config": config.to_dict(),
        "n_selectable": n_max,
        # A model passed in memory may differ from load_model(config.model): name no model then,
        # so that analyses comparing against the initial weights ask for it instead of guessing.
        "model_name": config.model if given is None else None,
        "model_config": json.loads(json.dumps(model.cfg.to_dict(), default=str)),
        "snapshot_semantics": "scores on the step's batch with parameters before the step's update",
        **data_notes(task, config.ablation),
    }

    def open_store() -> RunStore:
        if resume and (out / "manifest.json").exists():
            store = RunStore.open(out)
            saved = {k: v for k, v in store.config.to_dict().items() if k != "steps"}
            if saved != {k: v for k, v in config.to_dict().items() if k != "steps"}:
                raise ValueError(
                    f"cannot resume {out}: its config differs from this one; resume with the "
                    "same settings (only --steps may change)"
                )
            return store
        return RunStore.create(
            out,
            manifest=manifest,
            src_names=graph.src_names,
            dst_names=graph.dst_names,
            edge_valid=graph.edge_valid,
            node_names=graph.node_names,
            score_dtype=getattr(torch, config.score_dtype),
            overwrite=resume or overwrite,
        )

    store = dist.on_main(open_store)  # None on the other ranks: they write nothing
    run = _Run(config, model, task, general, store, capabilities, dist, fsdp)
    try:
        _train(run, out if resume else None, progress and dist.is_main)
        run.finish()
        model.eval()
        final = run.evaluate(config.steps)
        final.update(run.evaluate(config.steps, split="test"))
    finally:  # also after an interruption: LoRA adapters merged, the store's lock released
        run.finish()
        if store is not None:
            store.close()
    return RunSummary(out, config.strategy, config.steps, final)


def _check_distributed(config: TuningConfig, dist: DistContext, fsdp: bool = False) -> None:
    """One-line errors (on rank 0) for settings a multi-process run cannot honour."""
    if fsdp and not dist.distributed:
        raise fail(
            "--fsdp shards the model over the processes of a torchrun job; start it with "
            "torchrun --nproc-per-node N (N > 1) -m circuitdyn tune ..., or drop --fsdp"
        )
    if fsdp and STRATEGIES[config.strategy].lora:
        raise fail("--fsdp does not support --strategy lora (its adapters are single-process)")
    if not dist.distributed:
        return
    dist.check_divides(config.batch_size)
    if config.strategy in ("gradient", "lora"):
        raise fail(
            f"--strategy {config.strategy} runs on one process only (each rank would choose "
            "from its own rows); run it without torchrun"
        )
    dist.check_same({**config.to_dict(), "fsdp": fsdp}, "the tuning options")


def _train(run: _Run, resume_from: Path | None, progress: bool) -> None:
    """The optimizer steps of `run` (from the resume point of the run in `resume_from`, if
    given), with evaluations and checkpoints. Every rank reads the whole stream and keeps its
    rows of each batch."""
    config, model, dist = run.config, run.model, run.dist
    start = 0
    if resume_from is not None:  # rank 0 checks and repairs the files; the others then load
        # With FSDP loading is collective: rank 0 loads along with the others, after the check.
        start = dist.broadcast(dist.on_main(lambda: _resume_point(run, load=not run.fsdp)))
        if start > 0 and (run.fsdp or not dist.is_main):
            run.load(start - 1, None if dist.is_main else RunStore.open(resume_from))
    stream = islice(
        train_stream(run.task, config.batch_size, config.seed), start * config.grad_accum, None
    )
    bar = tqdm(
        range(start, config.steps),
        desc=f"tune ({config.strategy})",
        disable=not progress,
        initial=start,
        total=config.steps,
    )
    for step in bar:
        if step % config.eval_every == 0:
            model.eval()
            run.evaluate(step)
            if step == 0:  # the untuned model on the test split, to compare the final one with
                run.evaluate(step, split="test")
            model.train()
        micro = [dist.shard(next(stream)).to(run.device) for _ in range(config.grad_accum)]
        metrics = run.step(step, micro)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", metric=f"{metrics['metric']:.2f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            run.save(step)


def data_notes(task: Task, ablation: str) -> dict[str, Any]:
    """What a run should record about its data: the rows a file-based task used and skipped,
    and, for corrupted ablation, the fraction of read positions that cannot score (their clean
    and corrupted prefixes are identical); warns when that fraction is large."""
    notes: dict[str, Any] = {}
    report = getattr(task, "report", None)
    if report is not None:
        notes["data_rows"] = report.to_dict()
    if ABLATIONS[ablation].needs_corrupted and hasattr(task, "identical_prefix_fraction"):
        blind = task.identical_prefix_fraction("train")
        notes["identical_prefix_fraction"] = blind
        if blind > BLIND_WARNING:
            warnings.warn(
                f"corrupted ablation: {blind:.0%} of the read positions have identical clean and "
                "corrupted prefixes and score exactly zero; mean ablation sees them all",
                stacklevel=3,
            )
    return notes


BLIND_WARNING = 0.25  # warn when more than this share of read positions cannot score


def _resume_point(run: _Run, load: bool = True) -> int:
    """Verify the run's files, load its last intact checkpoint whose snapshots are all intact
    (unless not `load`: the caller loads step ``start - 1``), forget everything after it, and
    return the step to continue at."""
    store = run.store
    check = store.verify()
    for path, problem in check.damaged:
        warnings.warn(f"resume: {path} is damaged ({problem}); it is recomputed", stacklevel=3)
    usable = [s for s in check.checkpoint_steps if s <= check.intact_through]
    last = usable[-1] if usable else None
    if last is not None and load:
        run.load(last)
    start = 0 if last is None else last + 1
    store.truncate_after(start - 1)
    store.remove_damaged(check)
    return start


__all__ = ["RunSummary", "TuningConfig", "train_stream", "tune"]
