"""Run by tests/test_distributed.py under torchrun: every rank tunes with its own --top-n, a
mismatch that `circuitdyn tune` must report (once, on rank 0) instead of running."""

import os
import sys

from circuitdyn.cli import main

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    argv = ["tune", "--top-n", str(20 + rank), "--steps", "2", "--batch-size", "8"]
    sys.exit(main([*argv, "--out", sys.argv[1]]))
