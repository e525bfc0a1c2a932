"""Tests of circuitdyn.evaluate: circuit runs against independent computations, batch-split
invariance, faithfulness, curves, CPR / CMD and the CLI."""

from __future__ import annotations

import json
import warnings

import einops
import numpy as np
import pandas as pd
import pytest
import tl_reference as ref
import torch
from transformer_lens import HookedTransformer

from circuitdyn.activations import mean_activations
from circuitdyn.attribution import attribute
from circuitdyn.circuit import Circuit
from circuitdyn.evaluate import (
    MIB_GRID,
    DegenerateFaithfulnessWarning,
    cmd,
    cpr,
    evaluate_circuits,
    faithfulness,
    faithfulness_curve,
    run_with_circuit,
)
from circuitdyn.graph import Graph
from circuitdyn.tasks.base import Batch, logit_diff


def independent_metrics(model, batch, circuit: Circuit) -> tuple[float, float, float]:
    """m(full), m(empty) and m(circuit) (means of the logit difference, corrupted ablation)
    without circuitdyn: the clean run, the corrupted run, and the circuit run rebuilt with
    TransformerLens's split inputs (tests/tl_reference.py)."""
    corrupted = ref.source_activations(model, batch.corrupted)
    logits = ref.circuit_logits(model, batch.clean, corrupted, circuit.edges, batch.attention_mask)
    with torch.no_grad():
        full = logit_diff(model(batch.clean), batch)
        empty = logit_diff(model(batch.corrupted), batch)
    return float(full.mean()), float(empty.mean()), float(logit_diff(logits, batch).mean())


@pytest.fixture(scope="module")
def setup(make_tiny_model, make_tiny_batch):
    """The default tiny model and an unpadded batch of 6 (every example read at position 7)."""
    model = make_tiny_model()
    return model, Graph.from_model(model), make_tiny_batch(6, pad_first=0)


def source_activations(model: HookedTransformer, cache) -> torch.Tensor:
    """Every source activation from a TransformerLens cache, independently of circuitdyn:
    [n_src, batch, pos, d_model] in the graph's source order."""
    sources = [cache["blocks.0.hook_resid_pre"]]
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        W_O = model.blocks[layer].attn.W_O
        sources += list(einops.einsum(z, W_O, "b p h e, h e m -> h b p m"))
        sources.append(cache[f"blocks.{layer}.hook_mlp_out"])
    return torch.stack(sources)


# ---- run_with_circuit ------------------------------------------------------------------------
def test_full_circuit_is_the_clean_run(setup):
    model, graph, batch = setup
    logits = run_with_circuit(model, graph, Circuit.full(graph), batch)
    assert torch.equal(logits, model(batch.clean))


def test_empty_circuit_corrupted_is_the_corrupted_run(setup):
    model, graph, batch = setup
    logits = run_with_circuit(model, graph, Circuit.empty(graph), batch, "corrupted")
    torch.testing.assert_close(logits, model(batch.corrupted), rtol=0, atol=1e-10)


def test_empty_circuit_zero_ablation_reads_only_the_output_biases(setup):
    # With every edge zero-ablated, logits read residual - (all sources) = the sum of the
    # attention output biases b_O (which belong to no node), at every position.
    model, graph, batch = setup
    logits = run_with_circuit(model, graph, Circuit.empty(graph), batch, "zero")
    residual = sum(block.attn.b_O for block in model.blocks)
    expected = model.unembed(model.ln_final(residual.expand(*batch.clean.shape, -1)))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def test_empty_circuit_mean_ablation_reads_the_means(setup, make_tiny_batch):
    model, graph, batch = setup
    reference = [make_tiny_batch(5, seed=3, pad_first=0)]
    means = mean_activations(model, graph, reference)  # [n_src, 1, d_model]
    logits = run_with_circuit(model, graph, Circuit.empty(graph), batch, "mean", means)
    residual = sum(block.attn.b_O for block in model.blocks) + means[:, 0].sum(0)
    expected = model.unembed(model.ln_final(residual.expand(*batch.clean.shape, -1)))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def test_removed_logit_and_mlp_edges_match_an_independent_computation(setup):
    model, graph, batch = setup
    removed_logits = ["input->logits", "a0.h1->logits", "m0->logits", "a1.h2->logits"]
    removed_mlp = ["input->m1", "a1.h0->m1", "a0.h3->m1"]
    circuit = Circuit.full(graph) - Circuit.from_edges(graph, removed_logits + removed_mlp)
    logits = run_with_circuit(model, graph, circuit, batch)

    _, clean_cache = model.run_with_cache(batch.clean)
    _, corrupted_cache = model.run_with_cache(batch.corrupted)
    diff = source_activations(model, corrupted_cache) - source_activations(model, clean_cache)

    def delta(names: list[str]) -> torch.Tensor:
        return sum(diff[graph.src_index(name.split("->")[0])] for name in names)

    block = model.blocks[1]
    mlp_out = block.mlp(block.ln2(clean_cache["blocks.1.hook_resid_mid"] + delta(removed_mlp)))
    final = clean_cache["blocks.1.hook_resid_post"] - clean_cache["blocks.1.hook_mlp_out"] + mlp_out
    # Logit edges carry the clean-run source values except m1, whose output changed.
    final_in = final + delta(removed_logits)
    expected = model.unembed(model.ln_final(final_in))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def test_batch_split_invariance(setup, make_tiny_batch):
    model, graph, _ = setup
    batch = make_tiny_batch(6, seed=1)  # example 0 has 6 real tokens, read at position 5
    scores = attribute(model, graph, [batch], method="eap")
    circuit = Circuit.top_edges(scores, 30)
    whole = faithfulness(model, graph, circuit, [batch])
    halves = faithfulness(
        model, graph, circuit, [batch.select(slice(0, 2)), batch.select(slice(2, 6))]
    )
    torch.testing.assert_close(halves.metric_circuit, whole.metric_circuit, rtol=0, atol=1e-10)
    torch.testing.assert_close(halves.metric_empty, whole.metric_empty, rtol=0, atol=1e-10)
    assert halves.value == pytest.approx(whole.value, abs=1e-10)
    m_full, m_empty, m_circuit = independent_metrics(model, batch, circuit)
    assert whole.m_full == pytest.approx(m_full, abs=1e-10)
    assert whole.m_empty == pytest.approx(m_empty, abs=1e-10)
    assert halves.m_circuit == pytest.approx(m_circuit, abs=1e-10)


# ---- faithfulness ----------------------------------------------------------------------------
def test_faithfulness_of_full_and_empty(setup):
    model, graph, batch = setup
    full = faithfulness(model, graph, Circuit.full(graph), [batch])
    empty = faithfulness(model, graph, Circuit.empty(graph), [batch])
    assert full.value == 1.0 and empty.value == 0.0
    assert full.mean_of_ratios == 1.0 and empty.mean_of_ratios == 0.0
    assert full.n_examples == batch.size
    corrupted_metric = logit_diff(model(batch.corrupted), batch)
    torch.testing.assert_close(empty.metric_empty, corrupted_metric, rtol=0, atol=1e-10)


def test_faithfulness_headline_is_the_ratio_of_means(setup):
    model, graph, batch = setup
    circuit = Circuit.top_edges(attribute(model, graph, [batch]), 20)
    result = faithfulness(model, graph, circuit, [batch])
    m_full, m_empty, m_circuit = independent_metrics(model, batch, circuit)
    assert abs(m_full - m_empty) > 1e-4  # a well-defined ratio (float64 numbers)
    assert result.value == pytest.approx((m_circuit - m_empty) / (m_full - m_empty), rel=1e-9)
    assert 0.05 < abs(result.value - 1) and 0.05 < abs(result.value)  # neither extreme
    # Per example: the clean run, the corrupted run and the independent circuit run.
    corrupted = ref.source_activations(model, batch.corrupted)
    with torch.no_grad():
        full = logit_diff(model(batch.clean), batch)
        empty = logit_diff(model(batch.corrupted), batch)
    kept = logit_diff(ref.circuit_logits(model, batch.clean, corrupted, circuit.edges), batch)
    ratios = (kept - empty) / (full - empty)
    assert result.mean_of_ratios == pytest.approx(float(ratios.mean()), rel=1e-9)


def test_degenerate_denominator_warns_with_the_numbers(setup):
    model, graph, batch = setup

    def constant(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return logits.new_full((batch.size,), 2.5)

    with pytest.warns(
        DegenerateFaithfulnessWarning, match=r"m\(full\) = 2\.5 and m\(empty\) = 2\.5"
    ):
        result = faithfulness(model, graph, Circuit.full(graph), [batch], constant)
    assert np.isnan(result.value) and np.isnan(result.mean_of_ratios)

    def nearly_constant(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return 1000.0 + 1e-6 * logit_diff(logits, batch)

    with pytest.warns(DegenerateFaithfulnessWarning):
        faithfulness(model, graph, Circuit.empty(graph), [batch], nearly_constant)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateFaithfulnessWarning)
        faithfulness(model, graph, Circuit.empty(graph), [batch])


def test_evaluate_circuits_counts_forward_passes(setup):
    # Per batch: corrupted sources, clean run, empty run, and one run per non-trivial circuit;
    # full and empty circuits reuse the clean / empty values.
    model, graph, batch = setup
    scores = attribute(model, graph, [batch])
    circuits = [Circuit.top_edges(scores, n) for n in (0, 5, 50, graph.n_edges)]
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: calls.append(1))]):
        values = evaluate_circuits(model, graph, circuits, [batch, batch])
    assert len(calls) == 2 * (3 + 2)
    assert torch.equal(values.circuits[0], values.empty)
    assert torch.equal(values.circuits[3], values.full)


# ---- curves ----------------------------------------------------------------------------------
def test_faithfulness_curve(setup):
    model, graph, batch = setup
    scores = attribute(model, graph, [batch])
    curve = faithfulness_curve(model, graph, scores, [batch])
    assert list(curve["fraction"]) == list(MIB_GRID)
    # 2 layers x 4 heads: 3*4*1 + 3*4*6 q/k/v edges, 5 + 10 into the MLPs, 11 into logits.
    n = graph.n_edges
    assert n == 110
    # MIB's sizes: floor(fraction * n) = 0, 0, 0, 1, 2, 5, 11, 22, 55, 110 edges.
    assert list(curve["n_selected"]) == [0, 0, 0, 1, 2, 5, 11, 22, 55, 110]
    assert curve["faithfulness"].iloc[-1] == 1.0
    assert curve["faithfulness"].iloc[0] == 0.0  # 0 edges selected
    assert (curve["n_edges"] <= curve["n_selected"]).all()  # pruning only removes edges
    # Each point against the independent circuit run of the same circuit: the top 22 edges
    # by |score|, pruned.
    top = scores.flat().abs().argsort(descending=True, stable=True)[:22].tolist()
    circuit = Circuit.from_edges(graph, [graph.edge_names[i] for i in top]).prune()
    assert int(curve["n_edges"].iloc[7]) == circuit.n_edges
    m_full, m_empty, m_circuit = independent_metrics(model, batch, circuit)
    assert curve.attrs["m_full"] == pytest.approx(m_full, abs=1e-10)
    assert curve.attrs["m_empty"] == pytest.approx(m_empty, abs=1e-10)
    expected = (m_circuit - m_empty) / (m_full - m_empty)
    assert curve["faithfulness"].iloc[7] == pytest.approx(expected, abs=1e-9)
    greedy = faithfulness_curve(
        model, graph, scores, [batch], fractions=(0.1, 0.5, 1.0), selection="greedy"
    )
    assert greedy["faithfulness"].iloc[-1] == 1.0
    with pytest.raises(ValueError, match="increasing"):
        faithfulness_curve(model, graph, scores, [batch], fractions=(0.5, 0.1))


def test_cpr_and_cmd_of_known_curves():
    ones = pd.DataFrame({"fraction": [0.0, 0.5, 1.0], "faithfulness": [1.0, 1.0, 1.0]})
    assert cpr(ones) == pytest.approx(1.0) and cmd(ones) == 0.0
    # MIB integrates over the grid as given, from 0.001: a constant 1 gives 0.999.
    mib_ones = pd.DataFrame({"fraction": MIB_GRID, "faithfulness": np.ones(len(MIB_GRID))})
    assert cpr(mib_ones) == pytest.approx(0.999)
    linear = pd.DataFrame({"fraction": MIB_GRID, "faithfulness": MIB_GRID})
    assert cpr(linear) == pytest.approx((1 - 0.001**2) / 2)  # trapezoid is exact on a line
    assert cmd(linear) == pytest.approx(0.999 - (1 - 0.001**2) / 2)
    # Overshooting 1 counts in CMD (|1 - f| at the grid points, as MIB).
    overshoot = pd.DataFrame({"fraction": [0.0, 0.5, 1.0], "faithfulness": [0.0, 1.5, 1.0]})
    assert cpr(overshoot) == pytest.approx(0.25 * 1.5 + 0.25 * 2.5)
    assert cmd(overshoot) == pytest.approx(0.25 * 1.5 + 0.25 * 0.5)
    log_ones = pd.DataFrame({"fraction": [0.01, 0.1, 1.0], "faithfulness": [1.0, 1.0, 1.0]})
    assert cpr(log_ones, log_scale=True) == pytest.approx(np.log(100))
    with pytest.raises(ValueError, match="increasing"):
        cpr(pd.DataFrame({"fraction": [0.5, 0.1], "faithfulness": [1.0, 1.0]}))
    with pytest.raises(ValueError, match="NaN"):
        cmd(pd.DataFrame({"fraction": [0.1, 0.5], "faithfulness": [np.nan, 1.0]}))


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_writes_curve_json(setup, make_tiny_batch, tmp_path, monkeypatch, capsys):
    import circuitdyn.cli.common
    from circuitdyn.cli import main

    model, graph, batch = setup
    scores_path = tmp_path / "scores.json"
    attribute(model, graph, [batch]).to_json(scores_path)
    data = make_tiny_batch(12, seed=5)

    class FakeTask:
        name = "fake"

        def batches(self, split, batch_size, *, seed=0):
            for start in range(0, 12, batch_size):
                yield data.select(slice(start, start + batch_size))

        def metric(self, logits, batch):
            return logit_diff(logits, batch)

        def loss(self, logits, batch):
            raise AssertionError("evaluate never trains")

    monkeypatch.setattr(circuitdyn.cli.common, "load_model", lambda name, **kw: model)
    monkeypatch.setattr(circuitdyn.cli.common, "load_task", lambda name, model, **kw: FakeTask())
    out = tmp_path / "curve.json"
    argv = ["evaluate", "--scores", str(scores_path), "--task", "agreement"]
    argv += ["--n-examples", "10", "--batch-size", "4", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["n_examples"] == 10
    assert len(payload["curve"]) == len(MIB_GRID)
    assert payload["curve"][-1]["faithfulness"] == 1.0
    # The numbers of the first 10 examples (3 batches of 4, 4, 2), computed directly.
    first = data.select(slice(0, 10))
    with torch.no_grad():
        assert payload["m_full"] == pytest.approx(
            float(logit_diff(model(first.clean), first).mean())
        )
        assert payload["m_empty"] == pytest.approx(
            float(logit_diff(model(first.corrupted), first).mean())
        )
    curve = pd.DataFrame(payload["curve"])
    assert payload["cpr"] == pytest.approx(np.trapezoid(curve["faithfulness"], curve["fraction"]))
    assert "CPR" in capsys.readouterr().out
