"""Circuit-tuning under ``torchrun`` with 2 CPU processes (gloo), against one process.

A 2-process run sees the same global batches as a 1-process run (each rank keeps half the rows
of each micro-batch), so it must select the same circuit at every step and end with the same
weights up to float rounding (sums in another order); entries that no circuit ever owned stay
bit-identical to the starting model. A run killed mid-way (one rank SIGKILLed) ends instead of
hanging and resumes to the same result. Bad setups end with one line from rank 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from circuitdyn.circuit import Circuit
from circuitdyn.cli import main
from circuitdyn.config import TuningConfig
from circuitdyn.distributed import SINGLE, DistContext
from circuitdyn.models import load_model
from circuitdyn.ownership import parameter_masks
from circuitdyn.scores import Scores
from circuitdyn.store import RunStore, strip_prefix
from circuitdyn.tasks import load_task
from circuitdyn.tuning import _check_distributed

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch without gloo")

STEPS = 12
TUNE = ["tune", "--top-n", "20", "--steps", str(STEPS), "--batch-size", "8", "--grad-accum", "2"]
TUNE += ["--eval-every", "6", "--n-eval", "16", "--checkpoint-every", "2", "--lr", "3e-3"]
TUNE += ["--no-eval-faithfulness"]
WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--monitor-interval",
        "0.2",
        *args,
    ]


def run_torchrun(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main([*TUNE, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    done = run_torchrun(torchrun("-m", "circuitdyn", *TUNE, "--out", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("circuit run of") == 1  # rank 0 alone prints the summary
    return out


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


def test_two_processes_match_one_process(one_process, two_processes):
    assert_same_run(one_process, two_processes)


def test_frozen_entries_never_move(two_processes):
    """Entries outside every step's circuit got exactly zero gradient after the all-reduce:
    they are bit-identical to the starting model."""
    store = RunStore.open(two_processes)
    model = load_model("default", device="cpu")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    touched = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    for step in store.steps:
        circuit = Circuit(store.graph, store.snapshot(step).edge_mask)
        for name, mask in parameter_masks(model, circuit, store.config.policy).items():
            touched[name] |= mask.bool()
    final = final_weights(two_processes)
    frozen = 0
    for name, mask in touched.items():
        outside = ~mask
        assert torch.equal(final[name][outside], start[name][outside]), name
        frozen += int(outside.sum())
    assert frozen > 1000  # the check is not vacuous


def test_killed_two_process_run_resumes(one_process, tmp_path):
    """SIGKILL one rank mid-run: the job ends (no hang) with torchrun naming the failed rank;
    resuming with 2 processes ends as the uninterrupted run does."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = torchrun("-m", "circuitdyn", *TUNE, "--dist-timeout", "60", "--out", str(out))
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    snapshots = out / "snapshots"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if snapshots.is_dir() and len(list(snapshots.iterdir())) >= 4:
            break
        time.sleep(0.02)
    assert job.poll() is None, "the run ended before it could be killed"
    workers = [
        p
        for p in psutil.Process(job.pid).children(recursive=True)
        if "circuitdyn" in " ".join(p.cmdline())
    ]
    victim = next(p for p in workers if p.environ().get("RANK") == "1")
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 30  # ended, did not wait for a timeout
    assert "rank      : 1" in err and "Signal 9" in err, err[-2000:]  # torchrun's root cause
    assert "circuitdyn tune: error: rank 0 lost another process" in err, err[-2000:]
    written = RunStore.open(out).steps
    assert 0 < len(written) < STEPS

    done = run_torchrun(torchrun("-m", "circuitdyn", *TUNE, "--resume", "--out", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(one_process, out)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--batch-size", "7"], "--batch-size 7 does not split over 2 processes"),
        (["--backend", "nccl"], "--backend nccl is not available"),
    ],
)
def test_bad_setups_fail_on_rank_0_in_one_line(tmp_path, argv, fragment):
    cmd = torchrun("-m", "circuitdyn", *TUNE, *argv, "--out", str(tmp_path / "run"))
    done = run_torchrun(cmd, timeout=120)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("circuitdyn tune:")]
    assert len(ours) == 1 and fragment in ours[0], done.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["gradient", "lora"])
def test_single_process_strategies_refuse_torchrun(strategy):
    config = TuningConfig(strategy=strategy)
    with pytest.raises(ValueError, match=f"--strategy {strategy} runs on one process only"):
        _check_distributed(config, DistContext(rank=0, world_size=2))


def test_options_that_differ_across_ranks(tmp_path):
    """Each rank gets its own --top-n (by a worker script): rank 0 names the disagreement."""
    done = run_torchrun(torchrun(str(WORKER), str(tmp_path / "run")), timeout=120)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("circuitdyn tune:")]
    assert len(ours) == 1 and "the tuning options differ across processes" in ours[0], ours


def test_single_process_context_is_the_identity():
    task = load_task("agreement", load_model("default", device="cpu"), seed=0)
    batch = next(task.batches("train", 6, seed=0))
    assert SINGLE.shard(batch) is batch and not SINGLE.distributed and SINGLE.is_main
    x = torch.arange(3.0)
    assert SINGLE.sum(x) is x and torch.equal(x, torch.arange(3.0))
    assert SINGLE.on_main(lambda: 5) == 5 and SINGLE.broadcast("a") == "a"
    half = DistContext(rank=1, world_size=2)
    assert torch.equal(half.shard(batch).clean, batch.clean[3:])
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        DistContext(rank=0, world_size=4).check_divides(6)


def test_attribute_on_two_processes_equals_one(tmp_path):
    """Each rank scores every other batch; the all-reduced mean is one process's scores."""
    args = ["attribute", "--n-examples", "48", "--batch-size", "16"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert main([*args, "--out", str(one)]) == 0
    done = run_torchrun(torchrun("-m", "circuitdyn", *args, "--out", str(two)), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("scored 262 edges on 48 examples") == 1  # rank 0 alone writes
    a, b = Scores.load(one), Scores.load(two)
    torch.testing.assert_close(a.edges, b.edges, atol=1e-5, rtol=1e-5)
    assert b.meta["n_examples"] == 48
