"""The README's formation result: the figure ``figures/circuit_formation`` and its numbers.

Reads the run of ``circuitdyn pretrain --out runs/formation --seed 0 --record-every 25
--save-every 500`` and writes the formation figure of its first ``--until`` steps (the jump in
accuracy happens early; the whole run is in ``circuitdyn report runs/formation``), then prints
what the README's "Result on the embedded model" quotes: the phase transition, the faithfulness
onset, the emergence summary, the final circuit's edges that emerge near the transition, and
the head roles at the checkpoint after ``--roles-at`` updates.

Run: ``python scripts/formation_figure.py [runs/formation] [--until 1500] [--out figures]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circuitdyn import analysis as A
from circuitdyn.plots import formation_figure, save_figure
from circuitdyn.store import RunStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=Path("runs/formation"))
    parser.add_argument("--until", type=int, default=1500, help="last step the figure shows")
    parser.add_argument("--near", type=int, default=125, help="steps either side of the jump")
    parser.add_argument("--roles-at", type=int, default=500, help="updates of the head roles")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="figure directory")
    args = parser.parse_args()

    store = RunStore.open(args.run)
    config = store.config
    tables = A.formation_tables(store)
    summary = A.formation_summary(tables, near=args.near)
    print(json.dumps(summary, indent=1, default=str))
    emergence = tables.emergence
    print(A.changes_near(emergence, tables.transition.step, args.near).to_string())
    changepoint = A.phase_transition(tables.curve, method="changepoint")
    metric_rise = A.phase_transition(tables.curve, "dev_metric")
    print(f"change-point step {changepoint.step}; steepest rise of dev_metric {metric_rise.step}")
    evals = tables.curve.set_index("step")
    below = evals.index[evals["dev_accuracy"] < 1.0]  # accuracy is 1.0 after the last of these
    perfect = int(evals.index[evals.index > below.max()].min()) if len(below) else store.steps[0]
    print(f"accuracy 1.0 from step {perfect} on")
    rows = [perfect, tables.onset, store.steps[-1]]
    print(evals.loc[rows, ["dev_accuracy", "dev_metric", "faithfulness"]])
    roles = A.head_roles(store, [args.roles_at - 1])  # the checkpoint after `roles_at` updates
    print(roles[["updates", "node", "attention_ratio", "dla"]].to_string())

    shown = [int(s) for s in tables.raster.columns if int(s) <= args.until]
    raster = tables.raster[shown]
    raster = raster[raster.sum(axis=1) > 0]  # edges in the circuit at some shown step
    emerged = emergence[emergence["emergence_step"].astype(float) <= args.until]
    fig = formation_figure(
        tables.curve[tables.curve["step"] <= args.until],
        raster,
        emergence=emerged,
        transition=tables.transition.step,
        near=args.near,
        onset=tables.onset,
        title=(
            f"Circuit formation while pretraining the default model (steps 0\u2013{args.until} "
            f"of {store.steps[-1]:,}; top-{config.top_n} edges, snapshot every "
            f"{config.record_every} steps)"
        ),
    )
    for path in save_figure(fig, args.out / "circuit_formation", plotlyjs="directory"):
        print("wrote", path)


if __name__ == "__main__":
    main()
