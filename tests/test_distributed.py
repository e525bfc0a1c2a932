"""Circuit-tuning under ``torchrun`` with 2 CPU processes (gloo), against one process.

A 2-process run sees the same global batches as a 1-process run (each rank keeps half the rows
of each micro-batch), so it must select the same circuit at every step and end with the same
weights up to float rounding (sums in another order); entries that no circuit ever owned stay
bit-identical to the starting model. A run killed mid-way (one rank SIGKILLed) ends instead of
hanging and resumes to the same result. Bad setups end with one line from rank 0.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from torchrun_runs import (
    STEPS,
    TUNE,
    assert_frozen_entries_never_moved,
    assert_same_run,
    run_torchrun,
    torchrun,
    torchrun_env,
)

from circuitdyn.cli import main
from circuitdyn.config import TuningConfig
from circuitdyn.distributed import SINGLE, DistContext
from circuitdyn.models import load_model
from circuitdyn.scores import Scores
from circuitdyn.store import RunStore
from circuitdyn.tasks import load_task
from circuitdyn.tuning import _check_distributed

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch without gloo")

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    done = run_torchrun(torchrun("-m", "circuitdyn", *TUNE, "--out", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("circuit run of") == 1  # rank 0 alone prints the summary
    return out


def test_two_processes_match_one_process(one_process_run, two_processes):
    assert_same_run(one_process_run, two_processes)


def test_frozen_entries_never_move(two_processes):
    """Entries outside every step's circuit got exactly zero gradient after the all-reduce:
    they are bit-identical to the starting model."""
    assert_frozen_entries_never_moved(two_processes)


def test_killed_two_process_run_resumes(one_process_run, tmp_path):
    """SIGKILL one rank mid-run: the job ends (no hang) with torchrun naming the failed rank;
    resuming with 2 processes ends as the uninterrupted run does."""
    out = tmp_path / "run"
    # torchrun looks every 3 s: rank 0 meets the dead peer in its next collective (tens of ms)
    # and reports it before torchrun would stop it.
    cmd = torchrun(
        "-m", "circuitdyn", *TUNE, "--dist-timeout", "60", "--out", str(out), monitor_s=3
    )
    job = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env()
    )
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
    assert_same_run(one_process_run, out)


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
