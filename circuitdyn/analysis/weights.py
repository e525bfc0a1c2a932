"""Weight change: where the parameters moved during a run, per head and per MLP.

A run's checkpoint at step t holds the weights *after* update t (``circuitdyn.tuning``), so the
reference W_0 is the model before any update: ``load_model(manifest["model_name"])`` (pass
``initial=`` when the run started from a model built in memory). Relative change of a block of
parameters: ||W_t - W_0||_F / ||W_0||_F (dimensionless; NaN when ||W_0|| = 0).

Blocks. Per head h of layer L: its rows of ``W_Q``, ``W_K``, ``W_V`` (``[d_model, d_head]``
slices) and ``W_O`` (``[d_head, d_model]``), and ``all``: those four with ``b_Q[h]``, ``b_K[h]``,
``b_V[h]``: everything the head owns in `circuitdyn.ownership.parameter_masks`. Per MLP: ``W_in``,
``W_out`` and ``all`` (every parameter under ``blocks.L.mlp``). Grouped-query attention with
shared keys/values (``_W_K``/``_W_V``) gives each head its group's change.

The x-axis convention of these tables: ``step`` is the checkpoint's step and ``updates`` =
step + 1 the number of updates applied (the initial model is updates = 0; a dev evaluation
logged at step s saw s updates).

Memory: one checkpoint's tensors at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitdyn.analysis.runs import model_name as run_model_name
from circuitdyn.store import RunStore, StoreError, strip_prefix

if TYPE_CHECKING:  # transformer_lens is imported (slowly) only where a model is loaded
    from transformer_lens import HookedTransformer

_HEAD_MATRICES = ("W_Q", "W_K", "W_V", "W_O")
_HEAD_BIASES = ("b_Q", "b_K", "b_V")


def model_at(
    store: RunStore,
    step: int | None = None,
    *,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
) -> HookedTransformer:
    """The run's model with the weights of checkpoint ``step`` (after update ``step``), or the
    initial weights for ``step=None``. ``model_name`` overrides ``manifest["model_name"]``.

    Raises `StoreError` when the manifest names no model (a run tuned from a model built in
    memory) and `ModelUnavailableError` when the named model cannot be loaded (a moved model
    directory, an unknown or offline hub name)."""
    from circuitdyn.models import ModelUnavailableError, load_model

    name = model_name or run_model_name(store)
    if not name:
        raise StoreError(f"{store.directory}: the manifest names no model (model_name)")
    try:
        model = load_model(name, device=device)
    except ValueError as error:  # load_model: "no model circuitdyn knows"
        raise ModelUnavailableError(
            f"the run's model {name!r} cannot be loaded: {error}"
        ) from error
    if step is not None:
        load_checkpoint_weights(model, store, step)
    return model


def load_checkpoint_weights(model: HookedTransformer, store: RunStore, step: int) -> None:
    """Load the model weights of checkpoint ``step`` into ``model`` (in place). Raises
    ValueError if the checkpoint lacks some of the model's parameters."""
    state = checkpoint_parameters(store, step)
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - set(state))
    if missing:
        raise ValueError(
            f"checkpoint {step} of {store.directory} lacks parameters {missing[:5]} of the model "
            "(is model_name the model the run tuned?)"
        )
    own = model.state_dict()
    device = next(model.parameters()).device
    loadable = {k: v.to(device=device, dtype=own[k].dtype) for k, v in state.items() if k in own}
    model.load_state_dict(loadable, strict=False)


def initial_parameters(store: RunStore, model_name: str | None = None) -> dict[str, Tensor]:
    """The parameters of the run's initial model (``load_model(manifest['model_name'])``), CPU."""
    model = model_at(store, None, model_name=model_name)
    return {name: p.detach().cpu() for name, p in model.named_parameters()}


def checkpoint_parameters(store: RunStore, step: int) -> dict[str, Tensor]:
    """The model state saved in checkpoint ``step`` (TransformerLens names), on the CPU."""
    tensors, _ = store.load_checkpoint(step)
    return strip_prefix(tensors, "model")


def _n_layers(params: Mapping[str, Tensor]) -> int:
    layers = {int(k.split(".")[1]) for k in params if k.startswith("blocks.")}
    return 1 + max(layers, default=-1)


def _head_tensor(
    params: Mapping[str, Tensor], layer: int, name: str, n_heads: int
) -> Tensor | None:
    """[n_heads, ...] per-head slices of ``blocks.L.attn.<name>`` (ungrouping shared K/V)."""
    key = f"blocks.{layer}.attn.{name}"
    if key in params:
        return params[key]
    shared = params.get(f"blocks.{layer}.attn._{name}")
    if shared is None:
        return None
    return shared.repeat_interleave(n_heads // shared.shape[0], dim=0)


def block_changes(current: Mapping[str, Tensor], initial: Mapping[str, Tensor]) -> pd.DataFrame:
    """Per-head and per-MLP change between two parameter dicts (TransformerLens names).

    Columns: ``layer``, ``component`` (``"head"``/``"mlp"``), ``head`` (Int64, NA for MLPs),
    ``node`` (``aL.hH`` / ``mL``), ``matrix`` (see the module docstring), ``norm_initial``
    (||W_0||_F), ``norm_change`` (||W_t - W_0||_F), ``rel_change`` (their ratio).
    """
    rows: list[tuple] = []
    for layer in range(_n_layers(initial)):
        w_q = initial.get(f"blocks.{layer}.attn.W_Q")
        if w_q is not None:
            n_heads = w_q.shape[0]
            blocks: dict[str, tuple[Tensor, Tensor]] = {}
            for name in (*_HEAD_MATRICES, *_HEAD_BIASES):
                before = _head_tensor(initial, layer, name, n_heads)
                after = _head_tensor(current, layer, name, n_heads)
                if before is not None and after is not None:
                    blocks[name] = (before.double().cpu(), after.double().cpu())
            sq_init = {k: b.reshape(n_heads, -1).pow(2).sum(1) for k, (b, _) in blocks.items()}
            sq_diff = {
                k: (a - b).reshape(n_heads, -1).pow(2).sum(1) for k, (b, a) in blocks.items()
            }
            for head in range(n_heads):
                for name in _HEAD_MATRICES:
                    if name in blocks:
                        rows.append(
                            _row(
                                layer, "head", head, name, sq_init[name][head], sq_diff[name][head]
                            )
                        )
                total_init = sum(v[head] for v in sq_init.values())
                total_diff = sum(v[head] for v in sq_diff.values())
                rows.append(_row(layer, "head", head, "all", total_init, total_diff))
        prefix = f"blocks.{layer}.mlp."
        mlp_keys = sorted(k for k in initial if k.startswith(prefix) and k in current)
        if mlp_keys:
            total_init = total_diff = 0.0
            for key in mlp_keys:
                before, after = initial[key].double().cpu(), current[key].double().cpu()
                sq_i, sq_d = before.pow(2).sum(), (after - before).pow(2).sum()
                total_init, total_diff = total_init + sq_i, total_diff + sq_d
                short = key[len(prefix) :]
                if short in ("W_in", "W_out"):
                    rows.append(_row(layer, "mlp", None, short, sq_i, sq_d))
            rows.append(_row(layer, "mlp", None, "all", total_init, total_diff))
    frame = pd.DataFrame(
        rows,
        columns=["layer", "component", "head", "node", "matrix", "norm_initial", "norm_change"],
    )
    frame["head"] = frame["head"].astype("Int64")
    with np.errstate(invalid="ignore", divide="ignore"):
        frame["rel_change"] = np.where(
            frame["norm_initial"] > 0, frame["norm_change"] / frame["norm_initial"], np.nan
        )
    return frame


def _row(layer: int, component: str, head: int | None, matrix: str, sq_init, sq_diff) -> tuple:
    node = f"a{layer}.h{head}" if component == "head" else f"m{layer}"
    return (layer, component, head, node, matrix, float(sq_init) ** 0.5, float(sq_diff) ** 0.5)


def weight_changes(
    store: RunStore,
    steps: Sequence[int] | None = None,
    *,
    initial: Mapping[str, Tensor] | None = None,
    model_name: str | None = None,
) -> pd.DataFrame:
    """`block_changes` of every checkpoint (default: all of `store.checkpoint_steps`) against
    the initial weights, with ``step`` and ``updates`` (= step + 1) columns in front.
    ``initial``: the initial parameters (default: `initial_parameters`)."""
    selected = store.checkpoint_steps() if steps is None else [int(s) for s in steps]
    if initial is None:
        initial = initial_parameters(store, model_name)
    frames = []
    for step in selected:
        frame = block_changes(checkpoint_parameters(store, step), initial)
        frame.insert(0, "updates", step + 1)
        frame.insert(0, "step", step)
        frames.append(frame)
    if not frames:
        empty = block_changes(initial, initial).iloc[:0]
        empty.insert(0, "updates", pd.Series([], dtype="int64"))
        empty.insert(0, "step", pd.Series([], dtype="int64"))
        return empty
    return pd.concat(frames, ignore_index=True)


def where_weights_moved(changes: pd.DataFrame, *, moved_above: float = 1e-6) -> pd.DataFrame:
    """Summary of a `weight_changes` table (``matrix == "all"`` rows) per checkpoint step, per
    component type (and per ``run`` when the table has that column).

    Columns: [``run``], ``step``, ``updates``, ``component``, ``n_components``, ``n_moved``
    (relative change > ``moved_above``), ``mean_rel_change``, ``max_rel_change``,
    ``sq_change`` (sum of squared change norms) and ``share_sq_change`` (its share of the
    step's total over heads and MLPs, 0..1).
    """
    rows = changes[changes["matrix"] == "all"].copy()
    keys = [k for k in ("run", "step", "updates") if k in rows.columns]
    rows["sq"] = rows["norm_change"] ** 2
    rows["moved"] = rows["rel_change"] > moved_above
    grouped = rows.groupby([*keys, "component"], sort=True)
    out = grouped.agg(
        n_components=("node", "size"),
        n_moved=("moved", "sum"),
        mean_rel_change=("rel_change", "mean"),
        max_rel_change=("rel_change", "max"),
        sq_change=("sq", "sum"),
    ).reset_index()
    totals = out.groupby(keys)["sq_change"].transform("sum")
    out["share_sq_change"] = np.where(
        totals > 0, out["sq_change"] / totals.where(totals > 0, 1), 0.0
    )
    out["n_moved"] = out["n_moved"].astype(np.int64)
    return out


def final_weight_changes(
    stores: Mapping[str, RunStore],
    *,
    matrix: str = "all",
    initial: Mapping[str, Tensor] | None = None,
) -> pd.DataFrame:
    """The `weight_changes` rows of each run's last checkpoint, with a ``run`` column (the
    mapping's keys), for comparing strategies (circuit-tuning vs full fine-tuning). ``matrix``
    picks the block (``"all"`` by default; None keeps every row). Runs without a checkpoint are
    skipped. The initial weights are loaded once per distinct model name."""
    frames = []
    cache: dict[str, Mapping[str, Tensor]] = {}
    for label, store in stores.items():
        last = store.latest_checkpoint()
        if last is None:
            continue
        name = str(run_model_name(store))
        base = initial if initial is not None else cache.get(name)
        if base is None:
            base = cache[name] = initial_parameters(store)
        frame = weight_changes(store, [last], initial=base)
        if matrix is not None:
            frame = frame[frame["matrix"] == matrix]
        frame.insert(0, "run", label)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(
            columns=[
                "run",
                "step",
                "updates",
                "layer",
                "component",
                "head",
                "node",
                "matrix",
                "norm_initial",
                "norm_change",
                "rel_change",
            ]
        )
    return pd.concat(frames, ignore_index=True)
