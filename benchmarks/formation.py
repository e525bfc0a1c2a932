"""Cost of recording circuit formation.

1. Pretraining the embedded model (`circuitdyn.pretrain`, batch 64) without recording and with
   the agreement circuit recorded every K = 10 and every K = 1 steps (top-40 edges, EAP,
   corrupted ablation, the default 32 probe examples, and 16 at K = 1): wall time of the
   training (``wall_time_s``: model construction, recorder setup, the loop and the final
   record; not the held-out evaluation) and its ratio to the run without recording. Targets:
   K = 10 adds <= 25%, K = 1 <= 2x.
   The variants run interleaved, ``--repeats`` times each; the fastest of each is reported.
2. Tracking a series of 20 checkpoints of the default model with ``circuitdyn track`` (a fresh
   process, imports included) and in process (`track_checkpoints`). Target: <= 1 minute.

Run: ``python benchmarks/formation.py [--steps 600] [--repeats 2]`` (one torch thread, as the
shipped model was trained; ``--threads`` changes it).

Results (``--steps 600 --repeats 2``, 2 CPU cores; wall times drift by 10-20% between runs on
this shared machine, so the ratios carry several hundredths of noise):

* now, with records that run the probe only through its last read position (11 of its 27 token
  columns), two runs on an otherwise idle machine: K = 10 1.19x and 1.05x, K = 1 1.80x and
  1.60x, K = 1 with 16 probe examples 1.61x and 1.35x (no recording 23.1 s / 24.6 s, K = 10
  27.4 s / 25.8 s, K = 1 41.5 s / 39.3 s); 20 checkpoints tracked in 8.2 s / 6.4 s (command)
  and 1.9 s / 1.6 s (in process);
* before the cut, with the recorder's other shortcuts: K = 10 1.09x-1.15x, K = 1 2.03x and
  2.07x (no recording 26.1 s, K = 1 54.1 s), 16 probe examples 1.55x; tracking 8.1 s / 2.2 s;
* the original record pass: K = 10 1.15x, K = 1 2.03x and 2.12x.

Per record (quiet machine, default model, 32 probe examples, medians over 60-80 records
interleaved with training steps): 24 ms with the cut, 42 ms without, against 35-37 ms for a
training step. Where a cut record's time goes: the corrupted forward pass with the source
hooks 5 ms, the clean forward and the backward pass with the attribution hooks 14 ms, the
circuit's patched run every tenth record, the snapshot and evaluation written and fsynced
1.5 ms (several ms on a busy disk), the rest (mode and RNG bookkeeping, metrics, selection)
about 1.5 ms.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from circuitdyn.models import load_model, save_model
from circuitdyn.pretrain import pretrain
from circuitdyn.recorder import track_checkpoints

# label: (record every K steps, probe examples); None: no recording
VARIANTS: dict[str, tuple[int | None, int]] = {
    "no recording": (None, 32),
    "K=10": (10, 32),
    "K=1": (1, 32),
    "K=1, probe 16": (1, 16),
}


def time_pretraining(steps: int, repeats: int, tmp: Path) -> dict[str, float]:
    """Fastest training wall time (s) of each variant."""
    best: dict[str, float] = {}
    for repeat in range(repeats):
        for i, (label, (every, n_probe)) in enumerate(VARIANTS.items()):
            metrics = pretrain(
                tmp / f"pretrain_{repeat}_{i}",
                steps=steps,
                n_eval=20,
                progress=False,
                record_every=every,
                record={"n_eval": n_probe},
                checkpoint_every=max(steps // 5, 1),
            )
            best[label] = min(best.get(label, float("inf")), metrics["wall_time_s"])
            print(f"  {label:>14}: {metrics['wall_time_s']:7.1f} s", flush=True)
    return best


def time_tracking(n: int, tmp: Path, threads: int) -> tuple[float, float]:
    """Seconds to track `n` saved copies of the default model: the command, in process."""
    model = load_model("default", device="cpu")
    for i in range(n):
        save_model(model, tmp / "series" / f"step_{100 * i:08d}")
    pattern = str(tmp / "series" / "step_*")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "circuitdyn", "track", pattern, "--out", str(tmp / "cli")]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    cli = time.perf_counter() - start
    start = time.perf_counter()
    track_checkpoints([pattern], tmp / "library", device="cpu")
    return cli, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps per variant")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints to track")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} steps={args.steps} repeats={args.repeats} cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="circuitdyn-bench-") as tmp:
        best = time_pretraining(args.steps, args.repeats, Path(tmp))
        base = best["no recording"]
        for label, seconds in best.items():
            print(f"pretraining {label:>14}: {seconds:7.1f} s ({seconds / base:4.2f}x)")
        cli, library = time_tracking(args.checkpoints, Path(tmp), args.threads)
        print(
            f"tracking {args.checkpoints} checkpoints: {cli:.1f} s (circuitdyn track, imports "
            f"included), {library:.1f} s in process"
        )


if __name__ == "__main__":
    main()
