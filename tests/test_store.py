"""Tests of circuitdyn.store: round trips, reading APIs, resume, checkpoints, crash safety
(a real writer process killed with SIGKILL) and clear errors for damaged or foreign directories."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import IO

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitdyn.store import (
    RunStore,
    StoreCheck,
    StoreError,
    StoreLockedError,
    flatten_state,
    unflatten_state,
)

WRITER = Path(__file__).with_name("store_kill_writer.py")


def _load_writer_module() -> ModuleType:
    # By path, so the test works whether or not tests/ is a package.
    spec = importlib.util.spec_from_file_location("store_kill_writer", WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


writer = _load_writer_module()
SRC, DST, VALID, NODES = writer.gpt2_small_layout()


@pytest.fixture(autouse=True)
def _isolated_torch_state():
    # One thread: the tensors here are small, and on a shared 2-core machine torch's intra-op
    # threads only wait for each other (an op on 70k elements took 10-25 ms with 2 threads under
    # load, 0.04 ms with 1). The checkpoint test seeds and restores the global RNG. Both are put
    # back afterwards, so other test modules keep their settings.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def small_layout() -> tuple[list[str], list[str], torch.Tensor, list[str]]:
    """A 2-layer, 2-head graph: 7 sources, 15 destinations."""
    src = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    dst = [f"a{layer}.h{head}<{kind}>" for layer in (0, 1) for head in (0, 1) for kind in "qkv"]
    dst = [*dst[:6], "m0", *dst[6:], "m1", "logits"]
    src_layer = torch.tensor([-1, 0, 0, 1, 2, 2, 3])
    dst_layer = torch.tensor([0] * 6 + [1] + [2] * 6 + [3, 4])
    valid = src_layer[:, None] < dst_layer[None, :]
    return src, dst, valid, [*src, "logits"]


VALID_SMALL = small_layout()[2]


def make_step(step: int, valid: torch.Tensor, n_nodes: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    scores = torch.randn(valid.shape, generator=generator)
    return {
        "edge_scores": scores,
        "edge_mask": (scores.abs() > 1.0) & valid,
        "node_scores": torch.randn(n_nodes, generator=generator),
        "metrics": {"loss": 1.0 / (step + 1), "accuracy": step / 10},
    }


def create_small(directory: Path, **kwargs) -> RunStore:
    src, dst, valid, nodes = small_layout()
    return RunStore.create(
        directory,
        manifest={"seed": 7, "model": {"name": "tiny", "n_layers": 2}},
        src_names=src,
        dst_names=dst,
        edge_valid=valid,
        node_names=nodes,
        **kwargs,
    )


def fill(store: RunStore, steps) -> dict[int, dict]:
    written = {}
    for step in steps:
        written[step] = make_step(step, store.edge_valid, len(store.node_names))
        store.append(step, **written[step])
    return written


# ---------------------------------------------------------------------- round trips


def test_fp16_round_trip_and_reopen(tmp_path: Path) -> None:
    store = create_small(tmp_path / "run")
    written = fill(store, range(5))
    store.close()

    reopened = RunStore.open(tmp_path / "run")
    src, dst, valid, nodes = small_layout()
    assert reopened.manifest == {"seed": 7, "model": {"name": "tiny", "n_layers": 2}}
    assert list(reopened.src_names) == src and list(reopened.dst_names) == dst
    assert list(reopened.node_names) == nodes
    assert torch.equal(reopened.edge_valid, valid)
    assert reopened.versions["torch"] == importlib.metadata.version("torch")
    assert reopened.steps == [0, 1, 2, 3, 4]
    assert reopened.edge_names[0] == "input->a0.h0<q>"
    assert len(reopened.edge_names) == int(valid.sum())

    for step, values in written.items():
        snap = reopened.snapshot(step)
        expected = torch.where(valid, values["edge_scores"], 0.0)
        assert snap.edge_scores.dtype == torch.float32
        # fp16 storage: the stored value is exactly the fp16 rounding of what was written.
        assert torch.equal(snap.edge_scores, expected.half().float())
        assert torch.allclose(snap.edge_scores, expected, rtol=1e-3, atol=1e-4)
        assert torch.equal(snap.edge_mask, values["edge_mask"])
        assert torch.equal(snap.node_scores, values["node_scores"])
        assert snap.metrics == values["metrics"]
        assert not snap.edge_scores[~valid].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_score_dtypes_store_their_rounding(tmp_path: Path, dtype: torch.dtype) -> None:
    store = create_small(tmp_path / "run", score_dtype=dtype)
    values = make_step(0, VALID_SMALL, 8)
    store.append(0, **{**values, "edge_scores": values["edge_scores"].to(dtype)})
    expected = torch.where(VALID_SMALL, values["edge_scores"], 0.0).to(dtype).float()
    assert torch.equal(RunStore.open(tmp_path / "run").snapshot(0).edge_scores, expected)


def test_float32_scores_are_exact(tmp_path: Path) -> None:
    store = create_small(tmp_path / "run", score_dtype=torch.float32)
    written = fill(store, [3, 10, 11])
    reopened = RunStore.open(tmp_path / "run")
    assert reopened.score_dtype == torch.float32
    for step, values in written.items():
        expected = torch.where(reopened.edge_valid, values["edge_scores"], 0.0)
        assert torch.equal(reopened.snapshot(step).edge_scores, expected)
    dense = reopened.scores()
    assert dense.dtype == np.float32 and dense.shape == (3, 7, 15)
    assert np.array_equal(dense[1], torch.where(VALID_SMALL, written[10]["edge_scores"], 0).numpy())


def test_trajectories_and_subsets_agree_with_snapshots(tmp_path: Path) -> None:
    store = create_small(tmp_path / "run")
    written = fill(store, range(0, 12, 2))
    steps = store.steps
    snaps = {snap.step: snap for snap in store.iter_snapshots()}
    assert list(snaps) == steps

    def cell(edge: str) -> tuple[int, int]:
        src, dst = edge.split("->")
        return store.src_names.index(src), store.dst_names.index(dst)

    for edge in ["input->a0.h0<q>", "a0.h1->a1.h0<v>", "m0->m1", "m1->logits"]:
        trajectory = store.edge_trajectory(edge)
        assert trajectory.dtype == np.float32 and trajectory.shape == (len(steps),)
        expected = [float(written[s]["edge_scores"][cell(edge)].half()) for s in steps]
        assert np.array_equal(trajectory, expected)
        assert np.array_equal(trajectory, [float(snaps[s].edge_scores[cell(edge)]) for s in steps])
    some = store.edge_trajectory("m0->m1", steps=[8, 4])
    assert np.array_equal(some, [float(snaps[s].edge_scores[cell("m0->m1")]) for s in (8, 4)])

    dense = store.scores()
    assert dense.shape == (6, 7, 15)
    assert np.array_equal(dense[2], snaps[4].edge_scores.numpy())
    picked = store.scores(steps=[10, 0])
    assert np.array_equal(picked[0], snaps[10].edge_scores.numpy())
    assert np.array_equal(picked[1], snaps[0].edge_scores.numpy())

    edges = ["m1->logits", "a0.h0->m0", "input->a1.h1<k>"]
    flat = store.scores(steps=[2, 6], edges=edges)
    assert flat.shape == (2, 3)
    for row, step in enumerate([2, 6]):
        for col, edge in enumerate(edges):
            assert flat[row, col] == store.edge_trajectory(edge, steps=[step])[0]
    every_edge = store.scores(edges=store.edge_names)
    assert np.array_equal(every_edge, dense.reshape(6, -1)[:, VALID_SMALL.reshape(-1).numpy()])

    masks = store.masks()
    assert masks.dtype == np.bool_ and masks.shape == (6, 7, 15)
    for row, step in enumerate(steps):
        assert np.array_equal(masks[row], written[step]["edge_mask"].numpy())
    mask_subset = store.masks(steps=[4], edges=edges)
    assert mask_subset.tolist() == [[bool(written[4]["edge_mask"][cell(e)]) for e in edges]]
    nodes = store.node_scores()
    assert nodes.shape == (6, 8)
    assert np.array_equal(nodes[3], written[6]["node_scores"].numpy())

    frame = store.metrics_frame()
    assert frame["step"].tolist() == steps
    assert np.allclose(frame["loss"], [1.0 / (s + 1) for s in steps])

    with pytest.raises(KeyError, match="no snapshot for step 3"):
        store.snapshot(3)
    with pytest.raises(KeyError, match="not an edge of this graph"):
        store.edge_trajectory("m1->m0")
    with pytest.raises(KeyError, match="did you mean 'm0->m1'"):
        store.edge_trajectory("m0->m1 ")


def test_empty_store_reads_as_empty(tmp_path: Path) -> None:
    store = create_small(tmp_path / "run")
    assert store.steps == [] and store.latest_checkpoint() is None
    assert store.scores().shape == (0, 7, 15)
    assert store.metrics_frame().columns.tolist() == ["step"]
    assert len(store.evals_frame()) == 0


# ---------------------------------------------------------------------- writing rules and resume


def test_append_rejects_bad_input(tmp_path: Path, no_typecheck: None) -> None:
    store = create_small(tmp_path / "run")
    good = make_step(0, store.edge_valid, 8)
    store.append(5, **good)
    with pytest.raises(ValueError, match="not after the last recorded step 5"):
        store.append(5, **good)
    with pytest.raises(ValueError, match="not after the last recorded step 5"):
        store.append(2, **good)
    with pytest.raises(ValueError, match=r"edge_scores must be a tensor of shape \(7, 15\)"):
        store.append(6, **{**good, "edge_scores": torch.zeros(15, 7)})
    with pytest.raises(ValueError, match="edge_mask must be bool"):
        store.append(6, **{**good, "edge_mask": good["edge_mask"].float()})
    stray = good["edge_mask"].clone()
    stray[~store.edge_valid] = True
    with pytest.raises(ValueError, match="pairs that are not edges"):
        store.append(6, **{**good, "edge_mask": stray})
    with pytest.raises(ValueError, match=r"node_scores must have shape \(8,\)"):
        store.append(6, **{**good, "node_scores": torch.zeros(3)})
    with pytest.raises(ValueError, match="overflow"):
        store.append(6, **{**good, "edge_scores": good["edge_scores"] * 1e6})
    with pytest.raises(ValueError, match="'loss' is not a number"):
        store.append(6, **{**good, "metrics": {"loss": "low"}})
    with pytest.raises(ValueError, match="non-negative int"):
        store.append(-1, **good)
    # Nothing half-written by the refused calls.
    assert store.steps == [5]
    assert RunStore.open(tmp_path / "run").steps == [5]
    # Scalars of any kind are accepted as metrics.
    store.append(6, **{**good, "metrics": {"loss": torch.tensor(0.5), "n": np.int64(3)}})
    assert store.snapshot(6).metrics == {"loss": 0.5, "n": 3.0}


def test_truncate_after_then_reappend(tmp_path: Path) -> None:
    store = create_small(tmp_path / "run")
    fill(store, range(10))
    for step in (0, 3, 6, 9):
        store.log_eval(step, {"dev_loss": step / 2})
        store.save_checkpoint(step, tensors={"w": torch.full((3,), float(step))}, meta={"at": step})
    store.truncate_after(5)
    assert store.steps == list(range(6))
    assert store.checkpoint_steps() == [0, 3]
    assert store.evals_frame()["step"].tolist() == [0, 3]
    assert store.metrics_frame()["step"].tolist() == list(range(6))
    with pytest.raises(ValueError, match="not after the last recorded step 5"):
        store.append(5, **make_step(5, store.edge_valid, 8))
    # Re-append different values for the dropped steps; readers see the new ones only.
    rewritten = {}
    for step in range(6, 9):
        rewritten[step] = make_step(100 + step, store.edge_valid, 8)
        store.append(step, **rewritten[step])
    store.log_eval(6, {"dev_loss": -1.0})
    store.close()

    reopened = RunStore.open(tmp_path / "run")
    assert reopened.steps == list(range(9))
    for step, values in rewritten.items():
        assert torch.equal(reopened.snapshot(step).node_scores, values["node_scores"])
    frame = reopened.metrics_frame()
    assert frame["step"].tolist() == list(range(9))
    assert frame["loss"].iloc[7] == rewritten[7]["metrics"]["loss"]
    assert reopened.evals_frame().to_dict("list") == {"step": [0, 3, 6], "dev_loss": [0, 1.5, -1]}
    reopened.truncate_after(-1)
    assert reopened.steps == [] and reopened.checkpoint_steps() == []
    assert len(reopened.metrics_frame()) == 0


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    store = create_small(tmp_path / "run")
    fill(store, range(2))
    other = RunStore.open(tmp_path / "run")
    assert other.steps == [0, 1]  # reading needs no lock
    with pytest.raises(StoreLockedError, match="being written by another"):
        other.append(2, **make_step(2, other.edge_valid, 8))
    store.close()
    other.append(2, **make_step(2, other.edge_valid, 8))
    store.refresh()
    assert store.steps == [0, 1, 2]


# ---------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_with_adamw_state(tmp_path: Path) -> None:
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))

    def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        x = torch.randn(4, 6)  # drawn from the global RNG, which the checkpoint restores
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()

    model, optimizer = build()
    for _ in range(3):
        train_step(model, optimizer)
    optimizer_tensors, optimizer_skeleton = flatten_state(optimizer.state_dict(), "optimizer")
    assert "optimizer.state.0.exp_avg" in optimizer_tensors
    numpy_rng = np.random.RandomState(3)
    rng_tensors, rng_skeleton = flatten_state(
        {"torch": torch.get_rng_state(), "numpy": numpy_rng.get_state(), "python": (3, [1, 2])},
        "rng",
    )
    store = create_small(tmp_path / "run")
    store.save_checkpoint(
        3,
        tensors={
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            **optimizer_tensors,
            **rng_tensors,
        },
        meta={"optimizer": optimizer_skeleton, "rng": rng_skeleton, "data_position": 12},
    )
    assert store.checkpoint_steps() == [3] and store.latest_checkpoint() == 3
    train_step(model, optimizer)  # the original run goes on

    tensors, meta = RunStore.open(tmp_path / "run").load_checkpoint(3)
    assert meta["data_position"] == 12
    fresh_model, fresh_optimizer = build()
    fresh_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    )
    restored = unflatten_state(tensors, meta["optimizer"])
    fresh_optimizer.load_state_dict(restored)
    assert restored["param_groups"][0]["betas"] == (0.8, 0.95)
    assert sorted(restored["state"]) == [0, 1, 2, 3]  # int parameter ids survive JSON
    rng = unflatten_state(tensors, meta["rng"])
    assert rng["python"] == (3, [1, 2])
    assert rng["numpy"][1].dtype == np.uint32
    restored_numpy = np.random.RandomState()
    restored_numpy.set_state(rng["numpy"])
    assert restored_numpy.randint(1 << 30) == numpy_rng.randint(1 << 30)
    torch.set_rng_state(rng["torch"])
    train_step(fresh_model, fresh_optimizer)  # the resumed run takes the same step

    for (name, a), b in zip(
        model.state_dict().items(), fresh_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    original, resumed = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert original["param_groups"] == resumed["param_groups"]
    for pid, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["state"][pid][key]), (pid, key)


def test_checkpoints_keep_and_shared_tensors(tmp_path: Path) -> None:
    store = create_small(tmp_path / "run")
    weight = torch.arange(6.0)
    for step in (1, 2, 3):
        # Tied weights: two names for one storage, which safetensors alone refuses.
        store.save_checkpoint(
            step,
            tensors={"embed": weight, "unembed": weight, "head": weight[:2]},
            meta=None,
            keep=2,
        )
    assert store.checkpoint_steps() == [2, 3]
    tensors, meta = store.load_checkpoint(3)
    assert meta is None and torch.equal(tensors["unembed"], weight)
    assert torch.equal(tensors["head"], weight[:2])
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 1.*\[2, 3\]"):
        store.load_checkpoint(1)
    with pytest.raises(ValueError, match="not plain JSON"):
        store.save_checkpoint(4, tensors={}, meta={"bad": object()})


# ---------------------------------------------------------------------- crash safety


def test_crash_leftovers_are_read_around_and_repaired(tmp_path: Path) -> None:
    """Each state a killed writer can leave, made by hand: a stale temporary file, a committed
    snapshot whose index line was never written, and torn last lines in both JSONL files."""
    run = tmp_path / "run"
    store = create_small(run)
    written = fill(store, range(4))
    store.log_eval(0, {"dev_loss": 1.0})
    store.close()
    (run / "snapshots" / ".tmp-999-step_00000004.safetensors").write_bytes(b"half a file")
    metrics_path = run / "metrics.jsonl"
    lines = metrics_path.read_bytes().splitlines(keepends=True)
    metrics_path.write_bytes(b"".join(lines[:3]) + b'{"step": 3, "lo')  # step 3's line torn
    with open(run / "evals.jsonl", "ab") as handle:
        handle.write(b'{"step": 5, "dev_')

    reader = RunStore.open(run)
    assert reader.steps == [0, 1, 2, 3]
    frame = reader.metrics_frame()
    assert frame["step"].tolist() == [0, 1, 2, 3]
    assert frame["loss"].iloc[3] == written[3]["metrics"]["loss"]  # from the snapshot itself
    assert reader.evals_frame().to_dict("list") == {"step": [0], "dev_loss": [1.0]}

    reader.append(4, **make_step(4, reader.edge_valid, 8))  # becomes the writer: repairs first
    reader.log_eval(4, {"dev_loss": 0.5})
    assert not list((run / "snapshots").glob(".tmp-*"))
    for path in (metrics_path, run / "evals.jsonl"):
        text = path.read_text()
        assert text.endswith("\n")
        assert all(json.loads(line) for line in text.splitlines())
    assert [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert RunStore.open(run).evals_frame()["step"].tolist() == [0, 4]


def test_append_with_evaluation_makes_it_durable_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_typecheck: None
) -> None:
    """append(..., evaluation=...) logs the evaluation as log_eval would, writes its line before
    the snapshot, and fsyncs both files before the rename that commits the step, then the
    directory: one wait for the disk fewer than log_eval then append, nothing less durable."""
    run = tmp_path / "run"
    store = create_small(run)
    fill(store, [0])
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.fstat(fd).st_ino))

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("rename", os.stat(dst).st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    step = make_step(1, store.edge_valid, len(store.node_names))
    store.append(1, **step, evaluation={"dev_loss": 0.25, "faithfulness": np.float32(0.5)})
    monkeypatch.undo()

    evals = (run / "evals.jsonl").stat().st_ino
    snapshot = (run / "snapshots" / "step_00000001.safetensors").stat().st_ino
    directory = (run / "snapshots").stat().st_ino
    assert sorted(events[:2]) == sorted([("fsync", evals), ("fsync", snapshot)])
    assert events[2:] == [("rename", snapshot), ("fsync", directory)]
    assert store.evals_frame().to_dict("list") == {
        "step": [1],
        "dev_loss": [0.25],
        "faithfulness": [0.5],
    }
    reader = RunStore.open(run)
    assert reader.steps == [0, 1] and reader.evals_frame()["step"].tolist() == [1]
    assert reader.snapshot(1).metrics == step["metrics"]

    # A step that fails validation logs no evaluation either.
    bad = {**make_step(2, store.edge_valid, 8), "edge_mask": torch.ones_like(store.edge_valid)}
    with pytest.raises(ValueError, match="not edges"):
        store.append(2, **bad, evaluation={"dev_loss": 0.1})
    with pytest.raises(ValueError, match="evaluation"):
        store.append(2, **make_step(2, store.edge_valid, 8), evaluation={"dev_loss": "high"})
    assert store.evals_frame()["step"].tolist() == [1] and store.steps == [0, 1]


def test_append_commits_nothing_when_the_evaluation_cannot_be_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    store = create_small(run)
    fill(store, [0])
    evals = (run / "evals.jsonl").stat().st_ino
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == evals:
            time.sleep(0.05)  # still running when the snapshot's fsync is done
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        store.append(1, **make_step(1, store.edge_valid, 8), evaluation={"dev_loss": 0.5})
    monkeypatch.undo()
    assert store.steps == [0] and RunStore.open(run).steps == [0]
    assert not list((run / "snapshots").glob(".tmp-*"))
    store.truncate_after(0)  # as a resuming trainer would: the stray evaluation line goes
    store.append(1, **make_step(1, store.edge_valid, 8), evaluation={"dev_loss": 0.4})
    assert store.evals_frame().to_dict("list") == {"step": [1], "dev_loss": [0.4]}


def test_truncation_interrupted_after_its_commit_is_seen_and_finished(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = create_small(run)
    fill(store, range(6))
    for step in (1, 4):
        store.log_eval(step, {"dev_loss": 1.0})
        store.save_checkpoint(step, tensors={"w": torch.zeros(2)}, meta={})
    store.close()
    # What truncate_after(2) leaves if killed right after writing its commit marker.
    (run / "truncation.json").write_text('{"after": 2}')

    reader = RunStore.open(run)
    assert reader.steps == [0, 1, 2]
    assert reader.checkpoint_steps() == [1]
    assert reader.evals_frame()["step"].tolist() == [1]
    assert reader.metrics_frame()["step"].tolist() == [0, 1, 2]
    with pytest.raises(KeyError, match="no snapshot for step 4"):
        reader.snapshot(4)

    reader.append(3, **make_step(3, reader.edge_valid, 8))  # the writer finishes the truncation
    assert not (run / "truncation.json").exists()
    assert sorted(p.name for p in (run / "snapshots").iterdir())[-1] == "step_00000003.safetensors"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.safetensors"]
    assert RunStore.open(run).metrics_frame()["step"].tolist() == [0, 1, 2, 3]

    (run / "truncation.json").write_text("{")
    with pytest.raises(StoreError, match=r"truncation.json: not valid JSON"):
        RunStore.open(run)


def test_damaged_metrics_index_is_rebuilt_from_the_snapshots(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = create_small(run)
    written = fill(store, range(3))
    store.close()
    metrics_path = run / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines(keepends=True)
    metrics_path.write_text(lines[0] + "#garbage\n" + lines[2])  # step 1's line overwritten

    reader = RunStore.open(run)
    assert reader.metrics_frame()["loss"].tolist() == [
        written[s]["metrics"]["loss"] for s in range(3)
    ]
    assert reader.last_step == 2
    reader.append(3, **make_step(3, reader.edge_valid, 8))
    steps = [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_interrupted_creation_is_reported_and_can_be_overwritten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    create_small(run).close()
    (run / "manifest.json").unlink()  # killed before the manifest, the last file, was written
    with pytest.raises(StoreError, match=r"manifest.json: missing.*creation was interrupted"):
        RunStore.open(run)
    with pytest.raises(FileExistsError, match="not empty"):
        create_small(run)
    create_small(run, overwrite=True).close()
    assert RunStore.open(run).steps == []


def _check_run(store: RunStore) -> None:
    """Everything readable in the kill test's run equals what its writer computes for the step."""
    steps = store.steps
    assert steps == list(range(len(steps))), "steps are not contiguous from 0"
    valid = store.edge_valid
    dense = store.scores()
    masks = store.masks()
    frame = store.metrics_frame()
    assert frame["step"].tolist() == steps
    for row, step in enumerate(steps):
        expected = writer.expected_snapshot(step, valid, len(store.node_names))
        scores = torch.where(valid, expected["edge_scores"], 0.0).half().float()
        assert np.array_equal(dense[row], scores.numpy()), step
        assert np.array_equal(masks[row], expected["edge_mask"].numpy()), step
        snap = store.snapshot(step)
        assert torch.equal(snap.node_scores, expected["node_scores"]), step
        assert snap.metrics == expected["metrics"]
        assert frame["loss"].iloc[row] == expected["metrics"]["loss"]
    if steps:
        edge = "a3.h7->a9.h2<k>"
        i, j = store.src_names.index("a3.h7"), store.dst_names.index("a9.h2<k>")
        assert np.array_equal(store.edge_trajectory(edge), dense[:, i, j])

    # One evaluation per eval step; only the last step may have lost its evaluation.
    eval_steps = store.evals_frame()["step"].tolist()
    wanted = [s for s in steps if s % writer.EVAL_EVERY == 0]
    assert eval_steps in (wanted, wanted[:-1] if wanted and wanted[-1] == steps[-1] else wanted)
    evals = store.evals_frame()
    for _, row in evals.iterrows():
        assert row["dev_loss"] == writer.expected_eval(int(row["step"]))["dev_loss"]

    checkpoints = store.checkpoint_steps()
    # A killed writer leaves nothing damaged: every file under its final name is complete.
    assert store.verify() == StoreCheck(
        damaged=(),
        snapshot_steps=tuple(steps),
        checkpoint_steps=tuple(checkpoints),
        intact_through=steps[-1] if steps else -1,
    )
    assert len(checkpoints) <= writer.CHECKPOINTS_KEPT + 1
    for step in checkpoints:
        assert step % writer.CHECKPOINT_EVERY == 0 and step <= steps[-1]
        tensors, meta = store.load_checkpoint(step)
        expected_tensors, expected_meta = writer.expected_checkpoint(step)
        assert meta == expected_meta
        assert tensors.keys() == expected_tensors.keys()
        for name, value in expected_tensors.items():
            assert torch.equal(tensors[name], value)


def _next_line(process: subprocess.Popen, stderr: IO[str]) -> str:
    line = process.stdout.readline()
    if not line:
        stderr.seek(0)
        pytest.fail(f"writer exited early: {stderr.read()}")
    return line.strip()


def test_sigkill_loses_at_most_the_step_in_flight(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see _isolated_torch_state
    timing = random.Random(0)
    # Each round starts a writer and kills it after it reports this many steps. With 0 the kill
    # lands in start-up: inside create() (first round) or inside open() and truncate_after().
    for round_number, steps_before_kill in enumerate([0, 9, 0, 17]):
        with open(tmp_path / "stderr.txt", "w+") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(WRITER), str(run), "100000"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
            )
            assert _next_line(process, stderr) == "ready"
            reported = -1
            for _ in range(steps_before_kill):
                reported = int(_next_line(process, stderr))
            # Anywhere in the next step, or in creation / resumption (each some 20-40 ms).
            time.sleep(timing.uniform(0.0, 0.004 if steps_before_kill else 0.03))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            # Steps printed after our last read were finished too.
            reported = max([reported, *map(int, process.stdout.read().split())])
            process.stdout.close()
        assert process.returncode == -signal.SIGKILL

        if not (run / "manifest.json").exists():
            assert reported == -1  # killed before creation finished; the next writer recreates
            continue
        store = RunStore.open(run)
        last = store.last_step
        assert last is None or last >= reported, (round_number, reported, last)
        if steps_before_kill:
            assert last in (reported, reported + 1), (round_number, reported, last)
        _check_run(store)


EVAL_WRITER = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import store_kill_writer as helper

RunStore = helper.load_store_module().RunStore
src, dst, valid, nodes = helper.gpt2_small_layout()
run = Path(sys.argv[2])
store = RunStore.create(
    run, manifest={}, src_names=src, dst_names=dst, edge_valid=valid, node_names=nodes
)
print("ready", flush=True)
for step in range(100000):
    snapshot = helper.expected_snapshot(step, valid, len(nodes))
    store.append(step, **snapshot, evaluation=helper.expected_eval(step))
    print(step, flush=True)
"""


def test_sigkill_leaves_every_committed_step_with_its_evaluation(tmp_path: Path) -> None:
    """A writer logging each step's evaluation with append(..., evaluation=...), killed
    anywhere: the run keeps every reported step, and each committed step has its evaluation
    (at most one evaluation line, of the step in flight, has no snapshot)."""
    script = tmp_path / "writer.py"
    script.write_text(EVAL_WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    timing = random.Random(1)
    for round_number, steps_before_kill in enumerate([3, 11]):
        run = tmp_path / f"run{round_number}"
        with open(tmp_path / "stderr.txt", "w+") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(script), str(WRITER.parent), str(run)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
            )
            assert _next_line(process, stderr) == "ready"
            for _ in range(steps_before_kill):
                reported = int(_next_line(process, stderr))
            time.sleep(timing.uniform(0.0, 0.004))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            reported = max([reported, *map(int, process.stdout.read().split())])
            process.stdout.close()
        store = RunStore.open(run)
        steps = store.steps
        assert steps == list(range(len(steps))) and steps[-1] in (reported, reported + 1)
        evals = store.evals_frame()
        assert evals["step"].tolist()[: len(steps)] == steps
        assert len(evals) - len(steps) in (0, 1)
        for row, step in enumerate(steps):
            assert evals.iloc[row, 1:].to_dict() == writer.expected_eval(step)


# ---------------------------------------------------------------------- damage and foreign directories


def test_open_reports_missing_foreign_and_damaged_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no run directory"):
        RunStore.open(tmp_path / "absent")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match=r"manifest.json: missing; .* is not a RunStore"):
        RunStore.open(tmp_path / "foreign")

    run = tmp_path / "run"
    create_small(run).close()
    manifest_path = run / "manifest.json"
    good = manifest_path.read_text()

    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(StoreError, match=r"manifest.json: not valid JSON"):
        RunStore.open(run)
    manifest_path.write_text(json.dumps({**json.loads(good), "format": "something-else"}))
    with pytest.raises(StoreError, match="format marker is 'something-else'"):
        RunStore.open(run)
    manifest_path.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(StoreError, match="format_version 99"):
        RunStore.open(run)
    header = json.loads(good)
    header["graph"]["dst_names"] = header["graph"]["dst_names"][:-1]
    manifest_path.write_text(json.dumps(header))
    with pytest.raises(StoreError, match=r"graph.safetensors: edge_valid is torch.bool \(7, 15\)"):
        RunStore.open(run)
    manifest_path.write_text(good)
    (run / "graph.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(StoreError, match=r"graph.safetensors: damaged"):
        RunStore.open(run)


def test_damaged_snapshot_files_are_errors_not_partial_reads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = create_small(run)
    fill(store, range(4))
    store.close()
    path = run / "snapshots" / "step_00000002.safetensors"
    data = path.read_bytes()

    path.write_bytes(data[:-10])  # cut short
    store = RunStore.open(run)
    for read in (
        lambda: store.snapshot(2),
        lambda: store.scores(),
        lambda: store.edge_trajectory("m0->m1"),
        lambda: list(store.iter_snapshots()),
    ):
        with pytest.raises(StoreError, match=r"step_00000002.safetensors: damaged snapshot file"):
            read()
    assert store.snapshot(3).step == 3  # the other steps still read

    # A well-formed file whose shapes disagree with the manifest.
    save_file(
        {
            "edge_scores": torch.zeros(10, dtype=torch.float16),
            "edge_mask": torch.zeros(2, dtype=torch.uint8),
            "node_scores": torch.zeros(8),
        },
        path,
        metadata={"format": "circuitdyn.RunStore.snapshot", "step": "2", "metrics": "{}"},
    )
    with pytest.raises(StoreError, match=r"step_00000002.safetensors: edge_scores is F16 \[10\]"):
        store.snapshot(2)
    # Another step's file under this step's name.
    path.write_bytes((run / "snapshots" / "step_00000001.safetensors").read_bytes())
    with pytest.raises(StoreError, match="not the snapshot of step 2"):
        store.scores(edges=["m0->m1"])

    (run / "evals.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(StoreError, match=r"evals.jsonl: line 2 is not a JSON record"):
        store.evals_frame()


# ---------------------------------------------------------------------- verify and remove_damaged


def _resave(path: Path, **metadata: str) -> None:
    """Rewrite a safetensors file with the same tensors and some metadata entries replaced."""
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        old = handle.metadata() or {}
    save_file(tensors, path, metadata={**old, **metadata})


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_shape(path: Path) -> None:
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    save_file({**tensors, "node_scores": torch.zeros(3)}, path, metadata=metadata)


def store_with_checkpoints(run: Path, steps: range, checkpoints: tuple[int, ...]) -> RunStore:
    store = create_small(run)
    fill(store, steps)
    for step in checkpoints:
        store.log_eval(step, {"dev_loss": step / 2})
        store.save_checkpoint(step, tensors={"w": torch.full((4,), float(step))}, meta={"at": step})
    return store


def test_verify_intact_store(tmp_path: Path) -> None:
    store_with_checkpoints(tmp_path / "run", range(6), (2, 5)).close()
    check = RunStore.open(tmp_path / "run").verify()
    assert check == StoreCheck(
        damaged=(), snapshot_steps=(0, 1, 2, 3, 4, 5), checkpoint_steps=(2, 5), intact_through=5
    )
    assert check.ok

    empty = create_small(tmp_path / "empty").verify()
    assert empty.intact_through == -1 and empty.snapshot_steps == () and empty.ok
    gappy = create_small(tmp_path / "gappy")
    fill(gappy, [0, 1, 3])
    check = gappy.verify()
    assert check.damaged == () and check.intact_through == 1 and not check.ok


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_half, "damaged snapshot file"),
        (lambda path: path.write_bytes(b""), "damaged snapshot file"),
        (lambda path: _resave(path, step="4"), "not the snapshot of step 3"),
        (lambda path: _resave(path, format="other"), "not the snapshot of step 3"),
        (lambda path: _resave(path, metrics="{"), "unreadable metrics"),
        (_wrong_shape, r"node_scores is F32 \[3\], but the manifest says F32 \[8\]"),
    ],
    ids=["half", "empty", "wrong-step", "wrong-format", "bad-metrics", "wrong-shape"],
)
def test_verify_finds_a_damaged_snapshot(tmp_path: Path, damage, reason: str) -> None:
    run = tmp_path / "run"
    store_with_checkpoints(run, range(6), (2, 4)).close()
    path = run / "snapshots" / "step_00000003.safetensors"
    damage(path)

    store = RunStore.open(run)  # opening reads no snapshot, so it still succeeds
    assert store.steps == [0, 1, 2, 3, 4, 5]
    check = store.verify()
    assert [damaged for damaged, _ in check.damaged] == [path]
    assert re.search(reason, check.damaged[0][1])
    assert "\n" not in check.damaged[0][1] and str(path) not in check.damaged[0][1]
    assert check.snapshot_steps == (0, 1, 2, 4, 5)
    assert check.checkpoint_steps == (2, 4)
    assert check.intact_through == 2 and not check.ok
    # What a resume does with it: the last checkpoint at or before step 2.
    assert [s for s in check.checkpoint_steps if s <= check.intact_through] == [2]


def _garbage(path: Path) -> None:
    path.write_bytes(b"garbage!" * 100)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda path: path.write_bytes(b""), "damaged checkpoint file"),
        (_garbage, "damaged checkpoint file"),
        (_half, "damaged checkpoint file"),
        (lambda path: _resave(path, meta="{"), "unreadable checkpoint meta"),
        (lambda path: _resave(path, step="2"), "not the checkpoint of step 4"),
    ],
    ids=["empty", "garbage", "half", "bad-meta", "wrong-step"],
)
def test_verify_finds_a_damaged_checkpoint(tmp_path: Path, damage, reason: str) -> None:
    run = tmp_path / "run"
    store_with_checkpoints(run, range(6), (2, 4)).close()
    path = run / "checkpoints" / "step_00000004.safetensors"
    damage(path)
    check = RunStore.open(run).verify()
    assert [damaged for damaged, _ in check.damaged] == [path]
    assert reason in check.damaged[0][1]
    assert check.checkpoint_steps == (2,)
    assert check.snapshot_steps == tuple(range(6)) and check.intact_through == 5


def test_remove_damaged_deletes_them_and_the_store_reads_cleanly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store_with_checkpoints(run, range(6), (1, 2, 4)).close()
    snapshot = run / "snapshots" / "step_00000003.safetensors"
    _half(snapshot)
    (run / "checkpoints" / "step_00000002.safetensors").write_bytes(b"")
    _garbage(run / "checkpoints" / "step_00000004.safetensors")

    store = RunStore.open(run)
    check = store.verify()
    assert len(check.damaged) == 3 and check.checkpoint_steps == (1,)
    with pytest.raises(StoreError, match="damaged snapshot file"):
        store.scores()
    other = RunStore.open(run)
    other.truncate_after(5)  # a write that changes nothing, to take the lock
    with pytest.raises(StoreLockedError):
        store.remove_damaged(check)
    assert snapshot.exists()
    other.close()

    store.remove_damaged(check)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.safetensors"]
    assert not snapshot.exists()
    assert store.steps == [0, 1, 2, 4, 5]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 4, 5]
    store.remove_damaged(check)  # idempotent
    # The append handle follows the rewritten index.
    store.append(6, **make_step(6, store.edge_valid, 8))
    store.close()

    reader = RunStore.open(run)
    after = reader.verify()
    assert after.damaged == () and after.intact_through == 2
    assert after.snapshot_steps == (0, 1, 2, 4, 5, 6) and after.checkpoint_steps == (1,)
    assert reader.metrics_frame()["step"].tolist() == [0, 1, 2, 4, 5, 6]
    assert reader.scores().shape == (6, 7, 15)
    assert reader.evals_frame()["step"].tolist() == [1, 2, 4]
    assert reader.load_checkpoint(1)[1] == {"at": 1}

    with pytest.raises(ValueError, match="not a snapshot or checkpoint file"):
        reader.remove_damaged(StoreCheck(((run / "manifest.json", "x"),), (), (), -1))
    foreign = tmp_path / "other" / "snapshots" / "step_00000000.safetensors"
    with pytest.raises(ValueError, match="not a snapshot or checkpoint file"):
        reader.remove_damaged(StoreCheck(((foreign, "x"),), (), (), -1))


def test_resume_flow_keeps_files_rewritten_after_the_check(tmp_path: Path) -> None:
    """What tuning's resume does: verify, truncate to the last usable checkpoint, re-record,
    then remove_damaged with the old check must not delete the fresh files."""
    run = tmp_path / "run"
    store_with_checkpoints(run, range(6), (1, 4)).close()
    _half(run / "snapshots" / "step_00000003.safetensors")
    _half(run / "snapshots" / "step_00000000.safetensors")
    store = RunStore.open(run)
    check = store.verify()
    assert check.intact_through == -1 and check.snapshot_steps == (1, 2, 4, 5)
    usable = [s for s in check.checkpoint_steps if s <= check.intact_through]
    assert usable == []
    store.truncate_after(-1)
    fill(store, range(4))
    store.remove_damaged(check)
    assert store.steps == [0, 1, 2, 3]
    assert store.verify() == StoreCheck((), (0, 1, 2, 3), (), 3)


def test_create_refuses_to_clobber(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = create_small(run)
    fill(store, range(3))
    store.close()
    with pytest.raises(FileExistsError, match=r"is not empty.*overwrite=True"):
        create_small(run)
    fresh = create_small(run, overwrite=True)
    assert fresh.steps == [] and RunStore.open(run).steps == []
    fresh.close()

    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match=r"not part of a run \(thesis.tex\)"):
        create_small(other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"

    layout = {"src_names": ["a"], "dst_names": ["b"], "node_names": ["a", "b"]}
    with pytest.raises(ValueError, match="edge_valid has shape"):
        RunStore.create(
            tmp_path / "bad", manifest={}, edge_valid=torch.ones(2, 1, dtype=torch.bool), **layout
        )
    with pytest.raises(ValueError, match="manifest is not plain JSON"):
        RunStore.create(
            tmp_path / "bad",
            manifest={"x": {1}},
            edge_valid=torch.ones(1, 1, dtype=torch.bool),
            **layout,
        )
    assert not (tmp_path / "bad").exists()  # refused before touching the disk


# ---------------------------------------------------------------------- cost at GPT-2-small size


def test_gpt2_small_snapshot_costs_under_150_kb(tmp_path: Path) -> None:
    assert (len(SRC), len(DST), int(VALID.sum())) == (157, 445, 32491)
    store = RunStore.create(
        tmp_path / "run",
        manifest={"model": "gpt2"},
        src_names=SRC,
        dst_names=DST,
        edge_valid=VALID,
        node_names=NODES,
    )
    values = writer.expected_snapshot(0, VALID, len(NODES))
    durations = []
    for step in range(20):
        start = time.perf_counter()
        store.append(step, **values)
        durations.append(time.perf_counter() - start)
    snapshot_bytes = (tmp_path / "run" / "snapshots" / "step_00000007.safetensors").stat().st_size
    index_bytes = (tmp_path / "run" / "metrics.jsonl").stat().st_size / 20
    assert snapshot_bytes + index_bytes <= 150_000
    # Generous: about 1.5 ms here; only a pathological slowdown (e.g. rereading the run) fails.
    assert float(np.median(durations)) < 0.05
    print(f"append {1e3 * np.median(durations):.2f} ms, {snapshot_bytes + index_bytes:.0f} B/step")
