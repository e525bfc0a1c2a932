"""Circuit-tuning on N processes (``torchrun``, gloo on CPU / NCCL on CUDA) against one process
with the same global batch.

For each process count: ``circuitdyn tune`` (K = 1, EAP, top-40 edges) on the embedded model
with one torch thread per process, and the median of the steps' ``time_s`` after the first
`--warmup` steps (rank 0's wall time of a step: attribution, backward with the gradient
all-reduce, selection, masked update, snapshot write). Prints seconds per step and the ratio to
one process. On a machine with C cores, N <= C processes can at best divide the time by N; the
all-reduces (scores, batch metrics, gradients) and rank 0's snapshot write do not shrink.

Run: ``python benchmarks/distributed.py [--batch-size 32] [--steps 30] [--nproc 1 2]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from circuitdyn.store import RunStore


def seconds_per_step(nproc: int, args: argparse.Namespace, out: Path) -> float:
    tune = ["tune", "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    tune += ["--top-n", "40", "--eval-every", str(args.steps), "--n-eval", "32"]
    tune += ["--checkpoint-every", str(args.steps), "--no-eval-faithfulness", "--out", str(out)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "circuitdyn", *tune]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd = [*launcher, "-m", "circuitdyn", *tune]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    times = RunStore.open(out).metrics_frame()["time_s"].iloc[args.warmup :]
    return float(times.median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        print(f"global batch {args.batch_size}, {args.steps} steps, median after {args.warmup}")
        for nproc in args.nproc:
            seconds = seconds_per_step(nproc, args, Path(tmp) / f"n{nproc}")
            base = base or seconds
            print(f"  {nproc} process(es): {seconds * 1000:7.1f} ms/step  ({seconds / base:.2f}x)")


if __name__ == "__main__":
    main()
