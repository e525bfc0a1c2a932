"""Runs that differ only in their seed, summarised together: mean and spread over seeds.

A run's *group* is its directory name without a trailing ``_s<seed>`` (the layout
`circuitdyn.replicate` writes: ``circuit_s0``, ``circuit_s1`` -> ``circuit``); a run whose name
has no such suffix is a group of its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from circuitdyn.store import RunStore

_SEED_SUFFIX = re.compile(r"_s\d+$")


def seed_group(name: str) -> str:
    """``"circuit_s2"`` -> ``"circuit"``; a name without ``_s<seed>`` is returned as it is."""
    return _SEED_SUFFIX.sub("", name)


def run_group(store: RunStore) -> str:
    """The seed group of a run (`seed_group` of its directory name)."""
    return seed_group(Path(store.directory).name)


def group_stores(stores: Sequence[RunStore]) -> dict[str, list[RunStore]]:
    """Runs by seed group, groups and runs in the given order."""
    groups: dict[str, list[RunStore]] = {}
    for store in stores:
        groups.setdefault(run_group(store), []).append(store)
    return groups


def over_seeds(
    table: pd.DataFrame,
    values: Sequence[str],
    *,
    group: str = "group",
    x: str = "step",
) -> pd.DataFrame:
    """Mean and standard deviation over seeds of ``values`` columns of a long table with one
    row per (run, ``x``) and a ``group`` column, long format: ``group``, ``x``, ``quantity``
    (the column name), ``mean``, ``std`` (population std over the seeds, 0 for one seed),
    ``lo`` / ``hi`` (mean -/+ std), ``n`` (seeds with a finite value). Groups keep their order
    of appearance; rows with no finite value are dropped."""
    frames = []
    present = [v for v in values if v in table.columns]
    for quantity in present:
        rows = table[[group, x, quantity]].dropna(subset=[quantity])
        if rows.empty:
            continue
        agg = (
            rows.groupby([group, x], sort=False)[quantity]
            .agg(mean="mean", std=lambda s: float(np.std(s.to_numpy(dtype=float))), n="size")
            .reset_index()
        )
        agg.insert(2, "quantity", quantity)
        frames.append(agg)
    columns = [group, x, "quantity", "mean", "std", "lo", "hi", "n"]
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat(frames, ignore_index=True)
    order = {g: i for i, g in enumerate(dict.fromkeys(table[group]))}
    out = out.sort_values(
        [group, "quantity", x], key=lambda s: s.map(order) if s.name == group else s, kind="stable"
    )
    out["lo"] = out["mean"] - out["std"]
    out["hi"] = out["mean"] + out["std"]
    return out[columns].reset_index(drop=True)


def tables_over_seeds(
    tables: Mapping[str, pd.DataFrame], values: Sequence[str], *, x: str = "step"
) -> pd.DataFrame:
    """`over_seeds` of one table per run (run directory name -> table with an ``x`` column),
    grouped by `seed_group` of the names."""
    frames = [t.assign(group=seed_group(name), run=name) for name, t in tables.items() if len(t)]
    if not frames:
        return over_seeds(pd.DataFrame(columns=["group", x]), values, x=x)
    return over_seeds(pd.concat(frames, ignore_index=True), values, x=x)


__all__ = ["group_stores", "over_seeds", "run_group", "seed_group", "tables_over_seeds"]
