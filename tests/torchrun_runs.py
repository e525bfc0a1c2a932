"""What the torchrun tests share (tests/test_distributed.py, tests/test_fsdp_tuning.py): the
small tuning command both compare, the launcher, and the checks that two runs are the same run
and that entries outside every circuit never moved. The 1-process reference run is the
session fixture `one_process_run` (conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitdyn.circuit import Circuit
from circuitdyn.models import load_model
from circuitdyn.ownership import parameter_masks
from circuitdyn.store import RunStore, strip_prefix

STEPS = 12
TUNE = ["tune", "--top-n", "20", "--steps", str(STEPS), "--batch-size", "8", "--grad-accum", "2"]
TUNE += ["--eval-every", "6", "--n-eval", "16", "--checkpoint-every", "2", "--lr", "3e-3"]
TUNE += ["--no-eval-faithfulness"]


def torchrun(*args: str, nproc: int = 2, monitor_s: float = 0.2) -> list[str]:
    """The torchrun command line; torchrun checks its processes every `monitor_s` seconds."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--monitor-interval",
        str(monitor_s),
        *args,
    ]


def torchrun_env() -> dict[str, str]:
    """One torch thread per process (2 processes share 2 cores); no warnings in the output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_torchrun(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=torchrun_env())


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    store = RunStore.open(out)
    tensors, _ = store.load_checkpoint(store.latest_checkpoint())
    return strip_prefix(tensors, "model")


def assert_same_run(a: Path, b: Path, atol: float = 2e-5) -> None:
    sa, sb = RunStore.open(a), RunStore.open(b)
    assert sa.steps == sb.steps == list(range(STEPS))
    for step in sa.steps:
        x, y = sa.snapshot(step), sb.snapshot(step)
        assert torch.equal(x.edge_mask, y.edge_mask), f"circuits differ at step {step}"
        torch.testing.assert_close(x.edge_scores, y.edge_scores, atol=1e-4, rtol=1e-4)
        assert x.metrics["loss"] == pytest.approx(y.metrics["loss"], abs=1e-5)
        assert x.metrics["accuracy"] == pytest.approx(y.metrics["accuracy"], abs=1e-6)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if name.endswith("attn.b_K"):
            # Softmax ignores a key bias: its gradient is rounding noise (~1e-9), which Adam's
            # normalisation turns into steps of size lr whose sign depends on summation order.
            continue
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-4, msg=name)
    ea, eb = sa.evals_frame(), sb.evals_frame()
    assert list(ea["step"]) == list(eb["step"])


def assert_frozen_entries_never_moved(out: Path) -> None:
    """Entries outside every step's circuit got exactly zero gradient after the all-reduce:
    they are bit-identical to the starting model."""
    store = RunStore.open(out)
    model = load_model("default", device="cpu")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    touched = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    for step in store.steps:
        circuit = Circuit(store.graph, store.snapshot(step).edge_mask)
        for name, mask in parameter_masks(model, circuit, store.config.policy).items():
            touched[name] |= mask.bool()
    final = final_weights(out)
    frozen = 0
    for name, mask in touched.items():
        outside = ~mask
        assert torch.equal(final[name][outside], start[name][outside]), name
        frozen += int(outside.sum())
    assert frozen > 1000  # the check is not vacuous
