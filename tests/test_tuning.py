import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from circuitdyn.circuit import Circuit
from circuitdyn.config import TuningConfig
from circuitdyn.graph import Graph
from circuitdyn.models import load_model
from circuitdyn.optim import masked_step, restrict_gradients
from circuitdyn.ownership import count_tunable, parameter_masks
from circuitdyn.store import RunStore
from circuitdyn.strategies import random_circuit
from circuitdyn.tuning import tune

SMALL = {"n_train": 96, "n_dev": 32, "n_test": 32}


def small_config(**overrides) -> TuningConfig:
    settings = dict(
        task_options=SMALL,
        top_n=30,
        steps=6,
        batch_size=8,
        lr=3e-3,
        eval_every=3,
        n_eval=16,
        checkpoint_every=2,
        seed=0,
    )
    settings.update(overrides)
    return TuningConfig(**settings)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_parameters_do_not_move_with_momentum_and_weight_decay(optimizer):
    model = tiny_model(dtype=torch.float32)
    graph = Graph.from_model(model)
    circuit = Circuit.from_edges(graph, ["a0.h1->a1.h2<q>", "a1.h2->logits", "input->m0"])
    masks = parameter_masks(model, circuit, include_frozen=False)
    params = dict(model.named_parameters())
    opt = (
        torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    )
    tokens = torch.randint(0, 20, (2, 6))

    def train_step(step_masks):
        opt.zero_grad()
        model(tokens, return_type="loss").backward()
        restrict_gradients(params, step_masks)
        masked_step(opt, params, step_masks)

    train_step(None)  # every parameter gets optimizer state (momentum) first
    before = {n: p.detach().clone() for n, p in params.items()}
    state_before = {
        n: {
            k: v.clone()
            for k, v in opt.state[p].items()
            if torch.is_tensor(v) and v.shape == p.shape
        }
        for n, p in params.items()
    }
    train_step(masks)
    moved = 0
    for name, param in params.items():
        mask = masks.get(name, torch.zeros_like(param, dtype=torch.bool))
        assert torch.equal(param[~mask], before[name][~mask]), name
        for key, old in state_before[name].items():
            assert torch.equal(opt.state[param][key][~mask], old[~mask]), (name, key)
        moved += int((param[mask] != before[name][mask]).sum())
    assert moved == sum(int(m.sum()) for m in masks.values())  # every tunable entry moved
    assert moved == count_tunable(model, circuit)


def test_random_circuit_matches_parameter_budget_from_below():
    model = tiny_model(n_layers=3)
    graph = Graph.from_model(model)
    head = count_tunable(model, Circuit.from_nodes(graph, ["a0.h0"]))
    target = 5 * head + 7
    circuit = random_circuit(model, graph, target, None, seed=3)
    tunable = count_tunable(model, circuit)
    assert target - head <= tunable <= target
    assert circuit == random_circuit(model, graph, target, None, seed=3)
    assert circuit != random_circuit(model, graph, target, None, seed=4)


def test_circuit_tuning_records_every_step_and_tunes_only_the_circuit(tmp_path):
    config = small_config(steps=4)
    initial = load_model("default")
    summary = tune(config, tmp_path / "run", progress=False)
    store = RunStore.open(tmp_path / "run")
    assert store.steps == [0, 1, 2, 3]
    frame = store.metrics_frame()
    assert (frame["n_edges"] == 30).all() and (frame["attributed"] == 1).all()
    graph = Graph.from_model(initial)
    for step in store.steps:
        circuit = Circuit(graph, store.snapshot(step).edge_mask)
        assert frame["n_tunable"][step] == count_tunable(initial, circuit)
    assert (frame["n_tunable"] < sum(p.numel() for p in initial.parameters())).all()
    evals = store.evals_frame()
    assert evals["step"].tolist() == [0, 0, 3, 4, 4]  # dev and test at 0, dev, dev and test
    assert {"dev_metric", "dev_accuracy", "general_loss", "faithfulness"} <= set(evals.columns)
    assert {"test_metric", "test_accuracy", "test_general_loss"} <= set(summary.final)
    dev = evals.dropna(subset=["dev_metric"])
    assert summary.final["dev_metric"] == pytest.approx(dev["dev_metric"].iloc[-1])
    # The disagreement metric goes up while circuit-tuning.
    assert dev["dev_metric"].iloc[-1] > dev["dev_metric"].iloc[0]
    # Snapshot 0 holds the scores of the first batch with the initial parameters.
    snapshot = store.snapshot(0)
    assert torch.isfinite(snapshot.edge_scores[store.edge_valid]).all()
    assert snapshot.edge_mask.sum() == 30


def test_fixed_random_full_strategies_and_k(tmp_path):
    fixed = tune(
        small_config(strategy="fixed", steps=3, record_every=2), tmp_path / "fixed", progress=False
    )
    store = RunStore.open(fixed.out)
    masks = store.masks()
    assert all(np.array_equal(masks[0], m) for m in masks)  # never re-searched
    assert store.metrics_frame()["attributed"].tolist() == [1.0, 0.0, 1.0]
    assert torch.isnan(store.snapshot(1).edge_scores[store.edge_valid]).all()

    k2 = RunStore.open(
        tune(small_config(research_every=2, steps=4), tmp_path / "k2", progress=False).out
    )
    assert k2.metrics_frame()["attributed"].tolist() == [1.0, 0.0, 1.0, 0.0]
    m = k2.masks()
    assert np.array_equal(m[0], m[1]) and np.array_equal(m[2], m[3])

    full = RunStore.open(
        tune(small_config(strategy="full", steps=2), tmp_path / "full", progress=False).out
    )
    n_params = sum(p.numel() for p in load_model("default").parameters())
    assert (full.metrics_frame()["n_tunable"] == n_params).all()

    rnd = RunStore.open(
        tune(small_config(strategy="random", steps=2), tmp_path / "rnd", progress=False).out
    )
    circuit_run = RunStore.open(tune(small_config(steps=1), tmp_path / "c", progress=False).out)
    target = circuit_run.metrics_frame()["n_tunable"].iloc[0]
    assert 0.5 * target <= rnd.metrics_frame()["n_tunable"].iloc[0] <= target


def _run_in_subprocess(out: Path, steps: int) -> subprocess.Popen:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_tuning import small_config\n"
        "from circuitdyn.tuning import tune\n"
        f"tune(small_config(steps={steps}), {str(out)!r}, progress=False)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def test_killed_run_resumes_to_the_same_weights_and_snapshots(tmp_path):
    steps = 8
    whole = tune(small_config(steps=steps), tmp_path / "whole", progress=False)
    process = _run_in_subprocess(tmp_path / "killed", steps)
    deadline = time.time() + 240
    store_dir = tmp_path / "killed"
    while time.time() < deadline:
        checkpoints = (
            list((store_dir / "checkpoints").glob("*.safetensors")) if store_dir.exists() else []
        )
        if checkpoints and len(list((store_dir / "snapshots").glob("*.safetensors"))) >= 5:
            break
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = RunStore.open(store_dir)
    assert killed.latest_checkpoint() is not None
    assert 0 < len(killed.steps) < steps, "the run was not killed mid-way; make it longer"
    tune(small_config(steps=steps), store_dir, resume=True, progress=False)
    a, b = RunStore.open(whole.out), RunStore.open(store_dir)
    assert a.steps == b.steps == list(range(steps))
    assert np.array_equal(a.scores(), b.scores(), equal_nan=True)
    assert np.array_equal(a.masks(), b.masks())
    fa, fb = a.metrics_frame(), b.metrics_frame()
    for column in ["loss", "metric", "n_tunable", "grad_norm"]:
        assert fa[column].tolist() == fb[column].tolist(), column
    wa, _ = a.load_checkpoint(steps - 1)
    wb, _ = b.load_checkpoint(steps - 1)
    for name in wa:
        if name.startswith("model."):
            assert torch.equal(wa[name], wb[name]), name
    ea, eb = a.evals_frame(), b.evals_frame()
    assert ea.equals(eb)


def test_resume_refuses_a_different_config(tmp_path):
    tune(small_config(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="config differs"):
        tune(small_config(steps=2, lr=1.0), tmp_path / "r", resume=True, progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="top_n"):
        TuningConfig(top_n=0)
    with pytest.raises(ValueError):
        TuningConfig(strategy="magic")
    config = TuningConfig(top_n=100, top_n_final=20, steps=5, warmup_steps=2, schedule="linear")
    assert [config.n_at(s) for s in range(5)] == [100, 80, 60, 40, 20]
    assert config.lr_at(0) == pytest.approx(config.lr / 2)
    assert TuningConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown tuning strategy 'magic'.*circuit, fixed"):
        TuningConfig(strategy="magic")
    with pytest.raises(ValueError, match="selection rule"):
        TuningConfig(selection="best")
    # Runs saved before policies had names keep loading.
    old = {
        **config.to_dict(),
        "policy": {
            "include_layernorm": True,
            "include_embed": False,
            "include_unembed": False,
            "include_attn_bias_out": False,
        },
    }
    assert TuningConfig.from_dict(old).policy == "nodes+norms"


def test_circuit_size_is_clamped_and_recorded(tmp_path):
    with pytest.warns(UserWarning, match="exceeds the 262 items"):
        tune(small_config(steps=1, top_n=10_000), tmp_path / "r", progress=False)
    store = RunStore.open(tmp_path / "r")
    assert store.metrics_frame()["n_selected"].tolist() == [262.0]
    assert store.metrics_frame()["n_edges"].tolist() == [262.0]
    assert store.manifest["n_selectable"] == 262
    assert store.config.top_n == 10_000  # what was asked, beside what was used
