"""The baselines reviewers ask for, in the tuning engine: LoRA (`circuitdyn.lora`, strategy
``lora``), gradient-magnitude selection (``gradient``) and a random circuit matched per component
kind (``random-matched``); each reports its trainable-parameter count per step in ``n_tunable``."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model
from test_tuning import SMALL, small_config
from torch.nn.utils import parametrize

from circuitdyn import tuning
from circuitdyn.circuit import Circuit
from circuitdyn.cli import main
from circuitdyn.cli import tune as tune_cli
from circuitdyn.graph import Graph
from circuitdyn.lora import LoraAdapters, check_rank, lora_targets
from circuitdyn.models import load_model
from circuitdyn.ownership import count_tunable
from circuitdyn.scores import Scores
from circuitdyn.selection import select
from circuitdyn.store import RunStore, strip_prefix
from circuitdyn.strategies import (
    STRATEGIES,
    StrategyInput,
    gradient_circuit,
    matched_random_circuit,
    slot_counts,
)
from circuitdyn.tasks import load_task
from circuitdyn.tuning import train_stream, tune

TARGETS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine torch's thread
    pool turns each small op into milliseconds of waiting (this file: ~11 s instead of ~70 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_loss(logits: torch.Tensor, batch) -> torch.Tensor:
    """Cross-entropy of the target token at the first read position."""
    rows = torch.arange(batch.size)
    return torch.nn.functional.cross_entropy(logits[rows, batch.read_pos[:, 0]], batch.target[:, 0])


def adapter_count(model, rank: int) -> int:
    """Adapter scalars, counted from the config: r * (d_in + d_out) per head or matrix."""
    cfg = model.cfg
    per_head = 3 * (cfg.d_model + cfg.d_head) + (cfg.d_head + cfg.d_model)  # Q, K, V; O
    per_layer = cfg.n_heads * per_head + 2 * (cfg.d_model + cfg.d_mlp)  # W_in, W_out
    return rank * cfg.n_layers * per_layer


# ---- LoRA, the mechanism --------------------------------------------------------------------
def test_lora_merge_is_base_plus_ba_and_only_adapters_train():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraAdapters(model, rank=2, seed=1)
    assert lora.n_params == adapter_count(model, 2)
    assert [t.name for t in lora_targets(model)] == [
        f"blocks.{layer}.{n}"
        for layer in range(2)
        for n in ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out")
    ]
    tokens = tiny_batch().clean
    assert torch.equal(model(tokens), tiny_model()(tokens))  # B = 0: the base model
    # Only the adapters train: a few steps move them and nothing else.
    optimizer = torch.optim.AdamW(lora.parameters().values(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens, return_type="loss").backward()
        optimizer.step()
    trainable = {id(p) for p in lora.parameters().values()}
    assert all(p.requires_grad == (id(p) in trainable) for p in model.parameters())
    factors = lora.state_dict()
    assert all(bool(f.abs().sum() > 0) for f in factors.values())
    adapted = {}
    for name, value in base.items():
        if name.rsplit(".", 1)[-1] in TARGETS:
            b, a = factors[f"{name}.lora_B"], factors[f"{name}.lora_A"]
            assert b.shape[:-1] == value.shape[:-1] and a.shape[-1] == value.shape[-1]
            adapted[name] = value + b @ a  # per head where the weight is per head
        else:
            adapted[name] = value
    # The base weights are unchanged under the adapters, and the adapted model is base + BA.
    for target in lora.targets:
        original = target.module.parametrizations[target.attr].original
        assert torch.equal(original, base[target.name]), target.name
    state = lora.model_state_dict()
    assert set(state) == set(base)
    assert all(torch.equal(state[name], adapted[name]) for name in base)
    plain = tiny_model()
    plain.load_state_dict(adapted)
    expected = plain(tokens)
    assert torch.allclose(model(tokens), expected, rtol=0, atol=1e-12)
    lora.merge()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    merged = model.state_dict()
    assert set(merged) == set(base)
    assert all(torch.equal(merged[name], adapted[name]) for name in base)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(tokens), expected)


def test_lora_rank_must_fit_every_weight():
    model = tiny_model()  # d_head 8
    check_rank(model, 8)
    with pytest.raises(
        ValueError, match=r"lora_rank 9 .*blocks\.0\.attn\.W_Q \(32 x 8.*between 1 and 8"
    ):
        check_rank(model, 9)
    with pytest.raises(ValueError, match="between 1 and 8"):
        LoraAdapters(model, rank=0)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_lora_on_grouped_query_attention_adapts_the_stored_key_value_heads():
    model = tiny_model(n_key_value_heads=2, ungroup_grouped_query_attention=True)
    tokens = tiny_batch().clean
    before = model(tokens)
    lora = LoraAdapters(model, rank=2)
    names = [t.name for t in lora.targets]
    assert "blocks.0.attn._W_K" in names and "blocks.0.attn.W_K" not in names
    assert lora.deltas["blocks.0.attn._W_K"].B.shape == (2, 32, 2)  # one adapter per kv head
    assert torch.equal(model(tokens), before)
    with torch.no_grad():
        lora.deltas["blocks.0.attn._W_K"].B.normal_()
    expected = model.blocks[0].attn._W_K.detach().repeat_interleave(2, dim=0)
    assert torch.equal(model.blocks[0].attn.W_K, expected)  # the per-query-head view follows
    lora.merge()
    assert not torch.equal(model(tokens), before)


# ---- LoRA in the engine: CLI run, interrupted + resumed run -----------------------------------
def test_lora_runs_through_the_cli_and_resumes_to_the_same_weights(tmp_path, capsys, monkeypatch):
    args = ["tune", "--strategy", "lora", "--lora-rank", "4", "--top-n", "20", "--steps", "2"]
    args += ["--batch-size", "8", "--n-eval", "8", "--eval-every", "100", "--checkpoint-every", "1"]
    # The CLI has no options for the synthetic task's split sizes: small splits keep this fast.
    monkeypatch.setattr(tune_cli, "task_options", lambda parsed: dict(SMALL))
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert "lora run of 2 steps" in capsys.readouterr().out
    whole = RunStore.open(tmp_path / "whole")
    base_model = load_model("default")
    base = base_model.state_dict()
    frame = whole.metrics_frame()
    assert (frame["n_tunable"] == adapter_count(base_model, 4)).all()
    assert (frame["attributed"] == 1).all() and (frame["n_edges"] == 20).all()  # recorded
    for step in whole.steps:  # every checkpoint: a plain state, base + BA, base frozen
        tensors, _ = whole.load_checkpoint(step)
        state, factors = strip_prefix(tensors, "model"), strip_prefix(tensors, "lora")
        assert set(state) == set(base)
        for name, value in base.items():
            if name.rsplit(".", 1)[-1] in TARGETS:
                delta = factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"]
                assert torch.equal(state[name], value + delta), name
                assert bool(delta.abs().sum() > 0), name
            else:
                assert torch.equal(state[name], value), name

    # The same run, interrupted after step 0's checkpoint, then resumed.
    config = whole.config
    original_step = tuning._Run.step

    def interrupted(self, step, micro):
        if step == 1:
            raise KeyboardInterrupt
        return original_step(self, step, micro)

    monkeypatch.setattr(tuning._Run, "step", interrupted)
    model = load_model("default")
    with pytest.raises(KeyboardInterrupt):
        tune(config, tmp_path / "resumed", model=model, progress=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # merged anyway
    monkeypatch.setattr(tuning._Run, "step", original_step)
    assert RunStore.open(tmp_path / "resumed").steps == [0]
    model = load_model("default")
    tune(config, tmp_path / "resumed", resume=True, model=model, progress=False)
    resumed = RunStore.open(tmp_path / "resumed")
    assert resumed.steps == whole.steps == [0, 1]
    assert np.array_equal(whole.scores(), resumed.scores(), equal_nan=True)
    assert np.array_equal(whole.masks(), resumed.masks())
    fa, fb = whole.metrics_frame(), resumed.metrics_frame()
    for column in ["loss", "metric", "n_tunable", "grad_norm"]:
        assert fa[column].tolist() == fb[column].tolist(), column
    wa, _ = whole.load_checkpoint(1)
    wb, _ = resumed.load_checkpoint(1)
    assert set(wa) == set(wb)
    assert all(torch.equal(wa[name], wb[name]) for name in wa if not name.startswith("rng"))
    # The model passed in ends as a plain HookedTransformer holding the final weights.
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in strip_prefix(wb, "model").items())
    # Resuming needs the model the run started from (here: the tuned one), and leaves a wrong
    # model as it was; with it, a finished run continues (--steps may grow).
    with pytest.raises(ValueError, match="resume with the model the run started from"):
        tune(config, tmp_path / "resumed", resume=True, model=model, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())
    longer = dataclasses.replace(config, steps=3)
    tune(longer, tmp_path / "resumed", resume=True, progress=False)
    assert RunStore.open(tmp_path / "resumed").steps == [0, 1, 2]


def test_lora_rank_too_large_is_a_one_line_cli_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["tune", "--strategy", "lora", "--lora-rank", "17", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert "--lora-rank between 1 and 16" in err, err
    assert not (out / "manifest.json").exists()


# ---- gradient -------------------------------------------------------------------------------
def test_gradient_picks_the_largest_gradient_slots_within_the_budget():
    model = tiny_model()
    batch = tiny_batch(4, pad_first=0)
    graph = Graph.from_model(model)
    selected = Circuit.from_edges(graph, ["a0.h1->a1.h2<q>", "a1.h2->logits", "input->m0"])
    budget = count_tunable(model, selected)
    # Leave a mark on the .grad state and the RNG: the strategy must not touch either.
    params = dict(model.named_parameters())
    params["blocks.0.attn.W_Q"].grad = torch.full_like(params["blocks.0.attn.W_Q"], 7.0)
    rng = torch.get_rng_state()
    given = StrategyInput(model, selected, None, 0, batch, read_loss)
    assert STRATEGIES["gradient"].research is False
    circuit = STRATEGIES["gradient"].choose(given)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for n, p in params.items() if n != "blocks.0.attn.W_Q")
    assert bool((params["blocks.0.attn.W_Q"].grad == 7.0).all())

    # Independently: gradients by backward on a copy, slices by hand, greedy by hand.
    twin = copy.deepcopy(model)
    read_loss(twin(batch.clean), batch).backward()
    g = {name: p.grad for name, p in twin.named_parameters()}
    units = {}  # (kind, layer, head) -> the gradient entries the slot owns
    for layer in range(2):
        for head in range(4):
            for kind in ("q", "k", "v"):
                letter = kind.upper()
                units[kind, layer, head] = [
                    g[f"blocks.{layer}.attn.W_{letter}"][head],
                    g[f"blocks.{layer}.attn.b_{letter}"][head],
                ]
            units["o", layer, head] = [g[f"blocks.{layer}.attn.W_O"][head]]
        units["mlp", layer, None] = [
            p for n, p in g.items() if n.startswith(f"blocks.{layer}.mlp.")
        ]
    size = {u: sum(p.numel() for p in parts) for u, parts in units.items()}
    density = {
        u: sum(float(p.square().sum()) for p in parts) / size[u] for u, parts in units.items()
    }
    order = sorted(units, key=lambda u: -density[u])  # no ties here
    total, chosen = 0, set()
    for unit in order:
        if total + size[unit] <= budget:
            total += size[unit]
            chosen.add(unit)
    own = circuit.components()
    got = {
        (kind, layer, head)
        for kind in ("q", "k", "v", "o")
        for layer, head in getattr(own, kind).nonzero().tolist()
    }
    got |= {
        ("mlp", layer, None) for layer in own.mlp.reshape(2, -1).any(dim=1).nonzero()[:, 0].tolist()
    }
    assert got == chosen
    assert 0 < count_tunable(model, circuit) == total <= budget
    skipped = [unit for unit in order[: len(chosen)] if unit not in chosen]
    assert skipped, "the case should exercise the budget: a better slot that does not fit"


def test_gradient_strategy_in_the_engine(tmp_path):
    config = small_config(
        strategy="gradient", steps=2, eval_every=100, n_eval=8, score_dtype="float32"
    )
    initial = load_model("default")
    store = RunStore.open(tune(config, tmp_path / "run", progress=False).out)
    graph = Graph.from_model(initial)
    masks = store.masks()
    assert np.array_equal(masks[0], masks[1])  # not re-searched
    circuit = Circuit(graph, store.snapshot(0).edge_mask)
    frame = store.metrics_frame()
    assert (frame["n_tunable"] == count_tunable(initial, circuit)).all()
    # The step-0 circuit (from the stored scores) sets the budget; the batch is step 0's.
    selected = select(Scores(graph, store.snapshot(0).edge_scores), 30).circuit
    budget = count_tunable(initial, selected)
    assert 0.5 * budget <= frame["n_tunable"].iloc[0] <= budget
    task = load_task(config.task, initial, seed=config.seed, twins=True, **SMALL)
    batch = next(train_stream(task, config.batch_size, config.seed))
    assert gradient_circuit(initial, graph, batch, task.loss, budget) == circuit


# ---- random-matched ---------------------------------------------------------------------------
@pytest.mark.parametrize("mlp_blocks", [1, 2])
def test_random_matched_has_the_counts_of_each_kind(mlp_blocks):
    model = tiny_model(n_layers=3)
    graph = Graph.from_model(model, mlp_blocks)
    generator = torch.Generator().manual_seed(0)
    for seed in range(5):
        scores = Scores(graph, torch.randn(graph.n_src, graph.n_dst, generator=generator))
        selected = Circuit.top_edges(scores, 12)
        given = StrategyInput(model, selected, None, seed, tiny_batch(), read_loss)
        circuit = STRATEGIES["random-matched"].choose(given)
        assert slot_counts(circuit) == slot_counts(selected)
        assert circuit == matched_random_circuit(graph, slot_counts(selected), seed)
        assert circuit != matched_random_circuit(graph, slot_counts(selected), seed + 100)
        if mlp_blocks == 1:  # per-head map: the same counts own the same number of parameters
            assert count_tunable(model, circuit) == count_tunable(model, selected)
    assert STRATEGIES["random-matched"].research is True


def test_random_matched_in_the_engine_matches_every_step(tmp_path):
    config = small_config(
        strategy="random-matched", steps=2, eval_every=100, n_eval=8, score_dtype="float32"
    )
    initial = load_model("default")
    store = RunStore.open(tune(config, tmp_path / "run", progress=False).out)
    graph = Graph.from_model(initial)
    frame = store.metrics_frame()
    circuits = []
    for step in store.steps:
        snapshot = store.snapshot(step)
        selected = select(Scores(graph, snapshot.edge_scores), config.top_n).circuit
        tuned = Circuit(graph, snapshot.edge_mask)
        circuits.append(tuned)
        assert slot_counts(tuned) == slot_counts(selected), step
        assert (
            frame["n_tunable"][step]
            == count_tunable(initial, tuned)
            == count_tunable(initial, selected)
        )
    assert circuits[0] != circuits[1]  # redrawn at every selection
