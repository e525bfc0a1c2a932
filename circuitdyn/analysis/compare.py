"""Comparing circuits and runs.

* Two circuits (`CircuitSets`: edge and node name sets): overlap tables (`compare_circuits`),
  e.g. the agreement circuit of the pretrained model (`circuit_from_checkpoint`) against the
  disagreement circuit after tuning (`CircuitSets.from_store`).
* One run before / during / after: `phase_membership`, `membership_flows` (for a Sankey
  diagram) and `compare_steps` (pairwise overlaps).
* Several runs: `final_evals` (the final evaluation of each run), `strategy_curves`
  (evaluations over steps, per run) and `intrinsic_dimension` (final metric versus circuit size
  top_n, and where it saturates).

Jaccard indices (`circuitdyn.analysis.dynamics.jaccard`) of two empty sets are 1.0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from circuitdyn.analysis.dynamics import jaccard, node_membership_array, nodes_of_masks
from circuitdyn.analysis.runs import config_fields, evals_by_step, run_labels, run_progress
from circuitdyn.store import RunStore

RUN_COLUMNS = ("strategy", "top_n", "task")
"""The config fields that describe a run in the several-run tables."""


# ---------------------------------------------------------------------------------------------
# circuits as name sets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CircuitSets:
    """A circuit as sets of names: ``edges`` (``"a0.h1->a2.h3<q>"``) and ``nodes`` (``"a0.h1"``),
    with a ``label`` for tables and figures."""

    edges: frozenset[str]
    nodes: frozenset[str]
    label: str = ""

    @classmethod
    def from_store(
        cls, store: RunStore, step: int | None = None, label: str | None = None
    ) -> CircuitSets:
        """The circuit recorded at ``step`` (default: the last recorded step)."""
        if step is None:
            if store.last_step is None:
                raise ValueError(f"{store.directory}: the run has no recorded steps")
            step = store.last_step
        names = store.edge_names
        member = store.masks([step], edges=names)[0]
        nodes = nodes_of_masks(store, store.masks([step]))[0]
        return cls(
            frozenset(names[i] for i in np.flatnonzero(member)),
            frozenset(store.node_names[i] for i in np.flatnonzero(nodes)),
            label if label is not None else f"{Path(store.directory).name}@{step}",
        )

    @classmethod
    def from_circuit(cls, circuit: Any, label: str = "") -> CircuitSets:
        """From a `circuitdyn.circuit.Circuit`."""
        return cls(frozenset(circuit.edges), frozenset(circuit.nodes), label)


def compare_circuits(a: CircuitSets, b: CircuitSets) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Overlap of two circuits, as (summary, membership).

    summary: one row per level (``"nodes"``, ``"edges"``): ``level``, ``label_a``, ``label_b``,
    ``n_a``, ``n_b``, ``n_both``, ``n_only_a``, ``n_only_b``, ``n_union``, ``jaccard`` (0..1).
    membership: one row per node / edge in either circuit: ``level``, ``name``, ``in_a``,
    ``in_b``, ``status`` (``"both"``, ``"only_a"``, ``"only_b"``); the only-in-A / only-in-B
    lists are its rows with those statuses. Sorted by level, status, name.
    """
    summary_rows = []
    members = []
    for level, set_a, set_b in (("nodes", a.nodes, b.nodes), ("edges", a.edges, b.edges)):
        names = np.array(sorted(set_a | set_b), dtype=object)
        in_a = np.array([n in set_a for n in names], dtype=bool)
        in_b = np.array([n in set_b for n in names], dtype=bool)
        summary_rows.append(
            {
                "level": level,
                "label_a": a.label,
                "label_b": b.label,
                "n_a": int(in_a.sum()),
                "n_b": int(in_b.sum()),
                "n_both": int((in_a & in_b).sum()),
                "n_only_a": int((in_a & ~in_b).sum()),
                "n_only_b": int((~in_a & in_b).sum()),
                "n_union": len(names),
                "jaccard": float(jaccard(in_a, in_b)),
            }
        )
        status = np.where(in_a & in_b, "both", np.where(in_a, "only_a", "only_b"))
        rows = {"level": level, "name": names, "in_a": in_a, "in_b": in_b, "status": status}
        members.append(pd.DataFrame(rows).sort_values("status", kind="stable"))  # names sorted
    return pd.DataFrame(summary_rows), pd.concat(members, ignore_index=True)


def compare_steps(store: RunStore, steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Pairwise overlaps of the circuits of one run at ``steps`` (default: `phase_steps`).
    Columns: ``step_a``, ``step_b`` and those of `compare_circuits`'s summary."""
    selected = list(phase_steps(store).values()) if steps is None else list(steps)
    sets = {s: CircuitSets.from_store(store, s, label=str(s)) for s in selected}
    rows = []
    for i, sa in enumerate(selected):
        for sb in selected[i + 1 :]:
            summary, _ = compare_circuits(sets[sa], sets[sb])
            summary.insert(0, "step_b", sb)
            summary.insert(0, "step_a", sa)
            rows.append(summary)
    if not rows:
        return pd.DataFrame(columns=["step_a", "step_b", "level", "jaccard"])
    return pd.concat(rows, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# before / during / after
# ---------------------------------------------------------------------------------------------
def phase_steps(store: RunStore) -> dict[str, int]:
    """``{"before": first step, "during": middle step, "after": last step}`` of a run."""
    steps = store.steps
    if not steps:
        raise ValueError(f"{store.directory}: the run has no recorded steps")
    return {"before": steps[0], "during": steps[len(steps) // 2], "after": steps[-1]}


def phase_membership(store: RunStore, phases: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Node membership at a few named steps (default `phase_steps`): ``node``, then one bool
    column per phase name, in the given order. One row per graph node."""
    phases = dict(phase_steps(store) if phases is None else phases)
    _, member = node_membership_array(store, list(phases.values()))
    frame = pd.DataFrame({"node": store.node_names})
    for i, name in enumerate(phases):
        frame[name] = member[i]
    return frame


def membership_flows(membership: pd.DataFrame, *, drop_never: bool = True) -> pd.DataFrame:
    """Flows of nodes between consecutive phases of a `phase_membership` table, for a Sankey
    diagram: ``source_phase``, ``source_state``, ``target_phase``, ``target_state`` (states
    ``"in"`` / ``"out"`` of the circuit), ``count`` (nodes), ``nodes`` (their names, ``;``-
    separated). With ``drop_never``, nodes out of the circuit in every phase are left out.
    Flows with count 0 are omitted."""
    phases = [c for c in membership.columns if c != "node"]
    table = membership
    if drop_never:
        table = membership[membership[phases].any(axis=1)]
    rows = []
    for source, target in itertools.pairwise(phases):
        for s_state in ("in", "out"):
            for t_state in ("in", "out"):
                picked = table[
                    (table[source] == (s_state == "in")) & (table[target] == (t_state == "in"))
                ]
                if len(picked):
                    rows.append(
                        {
                            "source_phase": source,
                            "source_state": s_state,
                            "target_phase": target,
                            "target_state": t_state,
                            "count": len(picked),
                            "nodes": ";".join(picked["node"]),
                        }
                    )
    columns = ["source_phase", "source_state", "target_phase", "target_state", "count", "nodes"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# several runs
# ---------------------------------------------------------------------------------------------
def _as_mapping(stores: Mapping[str, RunStore] | Iterable[RunStore]) -> dict[str, RunStore]:
    if isinstance(stores, Mapping):
        return dict(stores)
    stores = list(stores)
    return dict(zip(run_labels(stores), stores, strict=True))


def final_evals(stores: Mapping[str, RunStore] | Iterable[RunStore]) -> pd.DataFrame:
    """One row per run: ``run`` (label), ``directory``, ``strategy``, ``top_n``, ``task``,
    ``steps`` (configured; None without a tuning config), ``status`` (`RunProgress.status`:
    ``finished``, ``partial``, ``unknown``), ``final_step`` (step of the final evaluation:
    ``steps`` if logged, else the last evaluated step), the final evaluation's metrics
    (``dev_metric``, ``dev_accuracy``, ``general_loss``, ``faithfulness``, ``test_metric``, ...
    as logged; the records of one step merged, `evals_by_step`), and ``initial_<m>`` for each
    metric of the evaluation at step 0 (the model before tuning), if logged."""
    rows = []
    for label, store in _as_mapping(stores).items():
        progress = run_progress(store)
        evals = evals_by_step(store).set_index("step")
        row: dict[str, Any] = {
            "run": label,
            "directory": str(store.directory),
            **config_fields(store, RUN_COLUMNS),
            "steps": progress.planned_steps,
            "status": progress.status,
        }
        if len(evals):
            final_step = progress.planned_steps if progress.final_eval else int(evals.index[-1])
            row["final_step"] = final_step
            row.update(evals.loc[final_step].astype(float).to_dict())
            if 0 in evals.index:
                row.update({f"initial_{k}": float(v) for k, v in evals.loc[0].items()})
        rows.append(row)
    return pd.DataFrame(rows)


def strategy_curves(stores: Mapping[str, RunStore] | Iterable[RunStore]) -> pd.DataFrame:
    """Evaluations of several runs over steps, long format: ``run``, ``strategy``, ``top_n``,
    ``task``, ``step`` (updates seen by the evaluated weights), then the logged metrics (one row
    per run and evaluated step, `evals_by_step`)."""
    frames = [
        evals_by_step(store).assign(run=label, **config_fields(store, RUN_COLUMNS))
        for label, store in _as_mapping(stores).items()
    ]
    columns = ["run", *RUN_COLUMNS, "step"]
    if not frames:
        return pd.DataFrame(columns=columns)
    curves = pd.concat(frames, ignore_index=True)
    return curves[columns + [c for c in curves.columns if c not in columns]]


@dataclass(frozen=True)
class IntrinsicDimension:
    """Result of `intrinsic_dimension`: ``curve`` (one row per top_n: ``top_n``, ``n_runs``,
    the mean final ``metric`` and ``general_loss`` when logged), ``metric`` (its name),
    ``best`` (the largest mean metric), ``baseline`` (the reference of the fraction),
    ``threshold`` = baseline + fraction * (best - baseline), and ``saturation_n`` (the
    smallest top_n whose mean metric reaches the threshold; None if the curve is empty)."""

    curve: pd.DataFrame
    metric: str
    fraction: float
    best: float
    baseline: float
    threshold: float
    saturation_n: int | None

    def summary(self) -> dict[str, Any]:
        """The scalars, as a JSON-friendly dict."""
        return {
            "metric": self.metric,
            "fraction": self.fraction,
            "best": self.best,
            "baseline": self.baseline,
            "threshold": self.threshold,
            "saturation_n": self.saturation_n,
        }


def intrinsic_dimension(
    finals: pd.DataFrame,
    *,
    metric: str = "dev_metric",
    fraction: float = 0.9,
    baseline: float | str | None = "initial",
) -> IntrinsicDimension:
    """The final ``metric`` versus circuit size ``top_n`` across runs (a `final_evals` table;
    pass the rows of one strategy), averaged over runs with the same top_n, and where it
    saturates: the smallest top_n reaching ``fraction`` of the way from ``baseline`` to the best
    mean metric. ``baseline``: ``"initial"`` (mean of ``initial_<metric>``, the metric before
    tuning; 0 if not logged), a number, or None (= 0, i.e. plain fraction * best)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if metric not in finals.columns:
        raise ValueError(f"the table has no {metric!r} column (columns: {list(finals.columns)})")
    rows = finals.dropna(subset=["top_n", metric])
    agg: dict[str, tuple[str, str]] = {"n_runs": (metric, "size"), metric: (metric, "mean")}
    if "general_loss" in rows.columns:
        agg["general_loss"] = ("general_loss", "mean")
    curve = rows.groupby("top_n").agg(**agg).reset_index().sort_values("top_n")
    curve["top_n"] = curve["top_n"].astype(np.int64)
    curve = curve.reset_index(drop=True)
    if baseline == "initial":
        column = f"initial_{metric}"
        base = float(rows[column].mean()) if column in rows.columns and len(rows) else 0.0
        base = 0.0 if np.isnan(base) else base
    elif baseline is None:
        base = 0.0
    else:
        base = float(baseline)
    if curve.empty:
        return IntrinsicDimension(curve, metric, fraction, np.nan, base, np.nan, None)
    best = float(curve[metric].max())
    threshold = base + fraction * (best - base)
    reached = curve[curve[metric] >= threshold - 1e-12]
    saturation = int(reached["top_n"].iloc[0]) if len(reached) else None
    return IntrinsicDimension(curve, metric, fraction, best, base, threshold, saturation)


# ---------------------------------------------------------------------------------------------
# a circuit found afresh at a checkpoint (needs the model)
# ---------------------------------------------------------------------------------------------
def circuit_from_checkpoint(
    store: RunStore,
    step: int | None = None,
    *,
    task: str | None = None,
    top_n: int | None = None,
    n_examples: int = 64,
    batch_size: int = 32,
    split: str = "dev",
    label: str | None = None,
    device: str = "cpu",
) -> CircuitSets:
    """Attribute ``task`` (default: the run's task) on the first ``n_examples`` of ``split`` with
    the weights of checkpoint ``step`` (None: the initial model) with the run's attribution
    method and ablation, and select a circuit of size ``top_n`` (default: the run's) with the
    run's selection rule (`circuitdyn.selection.select`, which clamps n to the graph). E.g. the
    agreement circuit of the pretrained model: ``circuit_from_checkpoint(run, None,
    task="agreement")``."""
    from circuitdyn.analysis.heads import run_task, task_examples
    from circuitdyn.analysis.weights import model_at
    from circuitdyn.attribution import attribute
    from circuitdyn.selection import select

    config = store.config
    model = model_at(store, step, device=device)
    the_task = run_task(store, model, task)
    batches = [b for b, _ in task_examples(the_task, split, n_examples, batch_size)]
    scores = attribute(
        model,
        store.graph,
        batches,
        the_task.metric,
        method=config.method,
        ablation=config.ablation,
        steps=config.ig_steps,
    )
    n = config.top_n if top_n is None else top_n
    circuit = select(scores, n, config.selection, absolute=config.absolute).circuit
    name = the_task.name if hasattr(the_task, "name") else str(task)
    when = "initial" if step is None else f"step {step}"
    return CircuitSets.from_circuit(circuit, label if label is not None else f"{name} @ {when}")
