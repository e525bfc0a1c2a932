"""Circuit-tuning with ``--fsdp`` (FSDP2-sharded model) under ``torchrun`` with 2 CPU processes
(gloo), against one unsharded process.

The sharded run sees the same global batches as the single process, so it must select the same
circuit at every step and end with the same weights up to float rounding, with entries no
circuit ever owned bit-identical to the starting model. It runs 6 steps, then resumes to 12
(only ``--steps`` changes), which exercises the full checkpoints (gathered on rank 0, in the
layout of an unsharded run) and their loading into the shards.
"""

from __future__ import annotations

from pathlib import Path

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
)

from circuitdyn.cli import main
from circuitdyn.config import TuningConfig
from circuitdyn.distributed import SINGLE, DistContext
from circuitdyn.store import RunStore
from circuitdyn.tuning import _check_distributed

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch without gloo")

FIRST = STEPS // 2  # the sharded run stops here, then resumes to STEPS


def with_steps(argv: list[str], steps: int) -> list[str]:
    at = argv.index("--steps")
    return [*argv[: at + 1], str(steps), *argv[at + 2 :]]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """2 processes with --fsdp: FIRST steps, then --resume to STEPS."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    first = torchrun("-m", "circuitdyn", *with_steps(TUNE, FIRST), "--fsdp", "--out", str(out))
    done = run_torchrun(first)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("circuit run of") == 1  # rank 0 alone prints the summary
    assert RunStore.open(out).steps == list(range(FIRST))
    rest = torchrun("-m", "circuitdyn", *TUNE, "--fsdp", "--resume", "--out", str(out))
    done = run_torchrun(rest)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_fsdp_run_matches_one_process(one_process_run, sharded):
    """Same circuit at every step, same metrics and final weights (b_K excluded: see
    `assert_same_run`), the same evaluation steps (every rank evaluated, rank 0 logged)."""
    assert_same_run(one_process_run, sharded)


def test_fsdp_checkpoints_have_the_unsharded_layout(one_process_run, sharded):
    """The checkpoints written before (step FIRST - 1) and after the resume (the last) hold the
    same tensors (names, shapes, dtypes, optimizer skeleton) as an unsharded run's, with values
    equal up to rounding and AdamW's step counters equal exactly."""
    plain, fsdp = RunStore.open(one_process_run), RunStore.open(sharded)
    for step in (FIRST - 1, STEPS - 1):
        a, meta_a = plain.load_checkpoint(step)
        b, meta_b = fsdp.load_checkpoint(step)
        assert a.keys() == b.keys(), step
        assert meta_a["optimizer"] == meta_b["optimizer"]
        assert meta_a["step"] == meta_b["step"] == step
        for name in a:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
            if name.endswith(".step") or name.endswith(".mask") or name == "rng.torch":
                assert torch.equal(a[name], b[name]), name
            elif name.startswith("optimizer."):
                torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
    n_moments = sum(name.endswith(".exp_avg") for name in a)
    assert n_moments > 10  # the optimizer state is in the checkpoint, not only the weights


def test_fsdp_frozen_entries_never_move(sharded):
    """Masked steps on sharded parameters and moments leave entries outside every circuit
    bit-identical to the starting model."""
    assert_frozen_entries_never_moved(sharded)


def test_fsdp_without_torchrun_fails_in_one_line(tmp_path, capsys):
    assert main([*TUNE, "--fsdp", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("circuitdyn tune: error: --fsdp shards"), err
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_fsdp_refuses_lora_and_single_process():
    lora = TuningConfig(strategy="lora")
    with pytest.raises(ValueError, match="--fsdp does not support --strategy lora"):
        _check_distributed(lora, DistContext(rank=0, world_size=2), fsdp=True)
    with pytest.raises(ValueError, match="start it with torchrun"):
        _check_distributed(TuningConfig(), SINGLE, fsdp=True)
