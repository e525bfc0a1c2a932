"""Analyses on small stores with known answers (hand-made masks and scores), and the
model-based analyses (head roles, weight change) on a tiny model of the agreement language."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn import analysis as A
from circuitdyn.analysis import dynamics, heads, trajectories, weights
from circuitdyn.graph import Graph
from circuitdyn.store import RunStore, StoreError

GRAPH = Graph(n_layers=2, n_heads=2)

# The circuit at each step (step 3 repeats step 2 but is not attributed: its scores are NaN).
CIRCUITS = {
    0: ["input->a0.h0<q>", "a0.h0->logits"],
    1: ["input->a0.h0<q>", "a0.h0->logits", "input->m0", "m0->logits"],
    2: ["input->m0", "m0->logits"],
    3: ["input->m0", "m0->logits"],
}
# Scores of three edges at the attributed steps 0, 1, 2 (every other edge scores 0).
RISING = "input->a0.h0<q>"  # 1, 3, 5: |score| grows
SHRINKING = "a0.h0->logits"  # -6, -4, -2: slope > 0 but |score| shrinks
NOISY = "input->m0"  # 1, 3, 2: r = 0.5, p = 2/3 with 1 df
TRUE_SCORES = {RISING: [1.0, 3.0, 5.0], SHRINKING: [-6.0, -4.0, -2.0], NOISY: [1.0, 3.0, 2.0]}


def _mask(edges: list[str]) -> torch.Tensor:
    mask = torch.zeros(GRAPH.n_src, GRAPH.n_dst, dtype=torch.bool)
    for name in edges:
        mask[GRAPH.edge_index(name)] = True
    return mask


def _scores(step: int) -> torch.Tensor:
    scores = torch.zeros(GRAPH.n_src, GRAPH.n_dst)
    if step >= 3:
        return torch.full((GRAPH.n_src, GRAPH.n_dst), math.nan)
    for name, values in TRUE_SCORES.items():
        scores[GRAPH.edge_index(name)] = values[step]
    return scores


def make_store(path, circuits=CIRCUITS, manifest=None) -> RunStore:
    store = RunStore.create(
        path,
        manifest=manifest or {"kind": "test", "config": {"strategy": "circuit", "top_n": 4}},
        src_names=GRAPH.src_names,
        dst_names=GRAPH.dst_names,
        edge_valid=GRAPH.edge_valid,
        node_names=GRAPH.node_names,
        score_dtype=torch.float32,
    )
    for step, edges in circuits.items():
        scores = _scores(step)
        store.append(
            step,
            edge_scores=scores,
            edge_mask=_mask(edges),
            node_scores=GRAPH.node_scores(scores),
            metrics={"loss": 1.0, "attributed": float(step < 3), "n_tunable": 10.0 * step},
        )
    return store


@pytest.fixture
def store(tmp_path) -> RunStore:
    return make_store(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# dynamics
# ---------------------------------------------------------------------------------------------
def test_sizes(store):
    sizes = A.circuit_sizes(store)
    assert sizes["step"].tolist() == [0, 1, 2, 3]
    assert sizes["n_edges"].tolist() == [2, 4, 2, 2]
    assert sizes["n_nodes"].tolist() == [3, 4, 3, 3]
    assert sizes["n_heads"].tolist() == [1, 1, 0, 0]
    assert sizes["n_mlps"].tolist() == [0, 1, 1, 1]
    assert sizes["n_tunable"].tolist() == [0.0, 10.0, 20.0, 30.0]
    assert sizes["attributed"].tolist() == [True, True, True, False]


@pytest.mark.parametrize("chunk", [64, 1, 3])
def test_churn_known_answers(store, monkeypatch, chunk):
    monkeypatch.setattr(dynamics, "CHUNK_STEPS", chunk)  # results must not depend on chunking
    c = A.churn(store)
    np.testing.assert_allclose(c["jaccard_edges_prev"], [np.nan, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(c["jaccard_nodes_prev"], [np.nan, 0.75, 0.75, 1.0])
    np.testing.assert_allclose(c["jaccard_edges_first"], [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(c["jaccard_nodes_first"], [1.0, 0.75, 0.5, 0.5])
    np.testing.assert_allclose(c["jaccard_edges_last"], [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(c["jaccard_nodes_last"], [0.5, 0.75, 1.0, 1.0])
    assert c["edges_added"].tolist() == [0, 2, 0, 0]
    assert c["edges_removed"].tolist() == [0, 0, 2, 0]
    assert c["nodes_added"].tolist() == [0, 1, 0, 0]
    assert c["nodes_removed"].tolist() == [0, 0, 1, 0]


def test_empty_circuits_have_jaccard_one(tmp_path):
    s = make_store(tmp_path / "empty", {0: [], 1: []})
    c = A.churn(s)
    assert c["jaccard_edges_prev"].iloc[1] == 1.0 and c["jaccard_nodes_first"].iloc[1] == 1.0


def test_node_events_presence_core(store):
    events = A.node_events(store)
    assert events.values.tolist() == [[1, "m0", "enter"], [2, "a0.h0", "exit"]]
    initial = A.node_events(store, include_initial=True)
    assert initial[initial["step"] == 0]["node"].tolist() == ["input", "a0.h0", "logits"]

    presence = A.node_presence(store).set_index("node")
    assert presence.loc["input", "fraction"] == 1.0
    assert presence.loc["a0.h0", "n_present"] == 2
    assert presence.loc["a0.h0", "last_step"] == 1
    assert presence.loc["m0", "first_step"] == 1 and presence.loc["m0", "fraction"] == 0.75
    assert presence.loc["a1.h1", "n_present"] == 0 and pd.isna(presence.loc["a1.h1", "first_step"])
    assert presence.loc["m0", "n_entries"] == 1 and presence.loc["a0.h0", "n_exits"] == 1

    core = A.stable_core(store, 0.75)
    assert core["node"].tolist() == ["input", "logits", "m0"]
    assert A.stable_core(store, 1.0)["node"].tolist() == ["input", "logits"]


def test_layer_composition_and_membership(store):
    comp = A.layer_composition(store)
    step1 = comp[comp["step"] == 1].set_index("layer")
    assert (
        step1.loc[0, "n_heads"] == 1 and step1.loc[0, "mlp"] == 1 and step1.loc[0, "n_nodes"] == 2
    )
    assert step1.loc[1, "n_nodes"] == 0
    assert len(comp) == 4 * 2

    member = A.node_membership(store)
    assert list(member.columns) == [0, 1, 2, 3]
    assert member.loc["m0"].tolist() == [False, True, True, True]
    assert member.loc["a1.h0"].sum() == 0

    node_scores = A.node_score_matrix(store)
    assert list(node_scores.columns) == [0, 1, 2]  # the unattributed step is dropped
    expected = GRAPH.node_scores(_scores(1)).numpy()
    np.testing.assert_allclose(node_scores[1].to_numpy(), expected)


def test_edge_presence(store):
    presence = A.edge_presence(store).set_index("edge")
    assert presence.loc["input->m0", "n_present"] == 3
    assert presence.loc[RISING, "fraction"] == 0.5
    assert len(presence) == 4


def test_circuit_tables_fall_back_to_last_scores(store):
    nodes, edges = A.circuit_tables(store, 3)
    assert edges["edge"].tolist() == ["input->m0", "m0->logits"]
    assert (edges["score_step"] == 2).all()  # step 3 is unattributed: scores of step 2
    assert edges.set_index("edge").loc["input->m0", "score"] == 2.0
    assert nodes.set_index("node").loc["m0", "in_circuit"]
    assert edges.set_index("edge").loc["input->m0", "input"] == ""
    _, first = A.circuit_tables(store, 0)
    assert first.set_index("edge").loc[RISING, "input"] == "q"
    all_nodes, all_edges = A.circuit_evolution(store)
    assert sorted(all_nodes["step"].unique()) == [0, 1, 2, 3]
    assert len(all_edges) == sum(len(e) for e in CIRCUITS.values())
    assert A.attributed_steps(store) == [0, 1, 2]


def test_node_and_edge_info(store):
    info = A.node_info(store).set_index("node")
    assert info.index.tolist() == list(GRAPH.node_names)
    assert info.loc["a1.h0", ["kind", "layer", "head"]].tolist() == ["head", 1, 0]
    assert info.loc["m1", "kind"] == "mlp" and pd.isna(info.loc["m1", "head"])
    assert pd.isna(info.loc["logits", "layer"])
    edges = A.edge_info(["a0.h1->a1.h0<k>", "m0->logits"])
    assert edges.values.tolist() == [
        ["a0.h1->a1.h0<k>", "a0.h1", "a1.h0<k>", "a1.h0", "k"],
        ["m0->logits", "m0", "logits", "logits", ""],
    ]


def test_jaccard_and_spread():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_allclose(A.jaccard(a, b), [1 / 3, 1.0])  # empty vs empty: 1
    assert A.jaccard(a, b, axis=(0, 1)) == pytest.approx(1 / 3)
    assert A.spread(range(10), 4) == [0, 3, 6, 9] and A.spread([5, 7], 4) == [5, 7]


# ---------------------------------------------------------------------------------------------
# trajectories
# ---------------------------------------------------------------------------------------------
def test_student_t_p_values_match_closed_forms():
    # 1 df is Cauchy: P(|T| >= t) = 1 - 2 atan(t) / pi; 2 df: 1 - t / sqrt(t^2 + 2).
    for t in (0.1, 1.0, 3.0, 25.0):
        assert A.t_test_p_value(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
        assert A.t_test_p_value(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-10)
    assert A.t_test_p_value(2.228138851986, 10) == pytest.approx(0.05, rel=1e-9)  # t table
    assert A.t_test_p_value(1.959963984540054, 1e7) == pytest.approx(0.05, rel=1e-5)  # normal
    assert A.t_test_p_value(0.0, 5) == pytest.approx(1.0)
    assert A.t_test_p_value(math.inf, 5) == 0.0
    assert np.isnan(A.t_test_p_value(1.0, 0))


def test_linear_trend():
    fit = A.linear_trend([0, 1, 2], [1, 3, 2])
    assert fit["slope"] == pytest.approx(0.5)
    assert fit["intercept"] == pytest.approx(1.5)
    assert fit["r"] == pytest.approx(0.5)
    assert fit["p_value"] == pytest.approx(2 / 3)  # t = 1/sqrt(3), 1 df
    # Shifted x and y give the same fit (the sums are computed relative to the first point).
    shifted = A.linear_trend([1000, 1001, 1002], [1e4 + 1, 1e4 + 3, 1e4 + 2])
    assert shifted["slope"] == pytest.approx(0.5) and shifted["r"] == pytest.approx(0.5)


@pytest.mark.parametrize("chunk", [64, 2])
def test_edge_trends_known_answers(store, monkeypatch, chunk):
    monkeypatch.setattr(dynamics, "CHUNK_STEPS", chunk)
    trends = A.edge_trends(store).set_index("edge")
    rising, shrinking, noisy = trends.loc[RISING], trends.loc[SHRINKING], trends.loc[NOISY]
    assert rising["n_points"] == 3  # the NaN step is skipped
    assert rising["slope"] == pytest.approx(2.0) and rising["r"] == pytest.approx(1.0)
    assert rising["intercept"] == pytest.approx(1.0)
    assert rising["p_value"] == pytest.approx(0.0, abs=1e-12)
    assert rising["direction"] == "strengthens"
    assert shrinking["slope"] == pytest.approx(2.0) and shrinking["direction"] == "weakens"
    assert noisy["p_value"] == pytest.approx(2 / 3) and noisy["direction"] == "n.s."
    assert noisy["mean_score"] == pytest.approx(2.0) and noisy["mean_abs_score"] == pytest.approx(
        2.0
    )
    assert noisy["first_score"] == 1.0 and noisy["last_score"] == 2.0
    assert noisy["last_step"] == 2
    constant = trends.loc["m0->logits"]
    assert constant["slope"] == 0.0 and np.isnan(constant["r"]) and constant["direction"] == "n.s."
    # Benjamini-Hochberg over the 3 edges with a p-value: q of the noisy edge = 2/3 * 3/3.
    assert noisy["q_value"] == pytest.approx(2 / 3)
    strong = A.changing_edges(trends.reset_index(), "strengthens")
    assert strong["edge"].tolist() == [RISING]
    assert A.top_edges(trends.reset_index(), 2) == [SHRINKING, RISING]


def test_benjamini_hochberg():
    q = trajectories.benjamini_hochberg(np.array([0.01, 0.04, np.nan, 0.03, 0.5]))
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, np.nan, 0.16 / 3, 0.5])


def test_edge_trajectories_and_rank_changes(store):
    traj = A.edge_trajectories(store, [NOISY, RISING])
    assert traj[traj["edge"] == NOISY]["score"].tolist() == TRUE_SCORES[NOISY]
    assert traj[traj["edge"] == RISING]["step"].tolist() == [0, 1, 2]
    default = A.edge_trajectories(store, top_k=1)
    assert default["edge"].unique().tolist() == [SHRINKING]

    ranks = A.rank_changes(store, top_k=1).set_index("edge")
    # step 0: |-6| > |1| = |1|; step 2: |5| > |-2| = |2| (ties: earlier edge first).
    assert set(ranks.index) == {SHRINKING, RISING}
    assert ranks.loc[SHRINKING, "rank_first"] == 1 and ranks.loc[RISING, "rank_last"] == 1
    assert ranks.loc[RISING, "rank_change"] == ranks.loc[RISING, "rank_first"] - 1
    assert ranks.loc[SHRINKING, "step_last"] == 2


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------
def test_compare_circuits():
    a = A.CircuitSets(frozenset({"e1", "e2", "e3"}), frozenset({"x", "y"}), "A")
    b = A.CircuitSets(frozenset({"e2", "e3", "e4", "e5"}), frozenset({"y"}), "B")
    summary, membership = A.compare_circuits(a, b)
    edges = summary.set_index("level").loc["edges"]
    assert (edges["n_a"], edges["n_b"], edges["n_both"], edges["n_union"]) == (3, 4, 2, 5)
    assert edges["jaccard"] == pytest.approx(0.4)
    assert summary.set_index("level").loc["nodes", "jaccard"] == pytest.approx(0.5)
    only_a = membership[(membership["level"] == "edges") & (membership["status"] == "only_a")]
    only_b = membership[(membership["level"] == "edges") & (membership["status"] == "only_b")]
    assert only_a["name"].tolist() == ["e1"] and only_b["name"].tolist() == ["e4", "e5"]


def test_phases_and_flows(store):
    assert A.phase_steps(store) == {"before": 0, "during": 2, "after": 3}
    membership = A.phase_membership(store, {"before": 0, "during": 1, "after": 2})
    flows = A.membership_flows(membership).set_index(
        ["source_phase", "source_state", "target_phase", "target_state"]
    )
    assert flows.loc[("before", "in", "during", "in"), "count"] == 3
    assert flows.loc[("before", "out", "during", "in"), "nodes"] == "m0"
    assert flows.loc[("during", "in", "after", "out"), "nodes"] == "a0.h0"
    assert flows["count"].sum() == 2 * 4  # 4 nodes ever in, 2 transitions
    pairs = A.compare_steps(store, [0, 1]).set_index("level")
    assert pairs.loc["edges", "jaccard"] == 0.5
    sets = A.CircuitSets.from_store(store, 1)
    assert sets.nodes == {"input", "a0.h0", "m0", "logits"} and len(sets.edges) == 4


def test_final_evals_and_intrinsic_dimension(tmp_path):
    stores = []
    for n, final in ((2, 1.0), (4, 2.6), (8, 2.9), (16, 3.0)):
        s = make_store(
            tmp_path / f"run{n}",
            manifest={"config": {"strategy": "circuit", "top_n": n, "steps": 4}},
        )
        # As circuitdyn.tuning logs them: dev and test as separate records at 0 and at steps.
        s.log_eval(0, {"dev_metric": -1.0, "general_loss": 5.0})
        s.log_eval(0, {"test_metric": -2.0})
        s.log_eval(2, {"dev_metric": 0.0, "general_loss": 5.0})
        s.log_eval(4, {"dev_metric": final, "general_loss": 4.0 + n / 100})
        s.log_eval(4, {"test_metric": final / 2})
        stores.append(s)
    merged = A.evals_by_step(stores[0])
    assert merged["step"].tolist() == [0, 2, 4]
    np.testing.assert_allclose(
        merged[["dev_metric", "general_loss", "test_metric"]],
        [[-1.0, 5.0, -2.0], [0.0, 5.0, np.nan], [1.0, 4.02, 0.5]],
    )
    finals = A.final_evals(stores)
    assert finals["dev_metric"].tolist() == [1.0, 2.6, 2.9, 3.0]
    assert finals["test_metric"].tolist() == [0.5, 1.3, 1.45, 1.5]
    assert finals["final_step"].tolist() == [4, 4, 4, 4]
    assert finals["initial_dev_metric"].tolist() == [-1.0] * 4
    assert finals["initial_test_metric"].tolist() == [-2.0] * 4
    assert finals["run"].iloc[0] == "run2 (circuit, n=2)"
    idim = A.intrinsic_dimension(finals)
    # threshold = -1 + 0.9 * (3 - (-1)) = 2.6: first reached at n = 4.
    assert idim.threshold == pytest.approx(2.6) and idim.saturation_n == 4
    assert idim.curve["top_n"].tolist() == [2, 4, 8, 16]
    assert A.intrinsic_dimension(finals, baseline=None).saturation_n == 8  # 0.9 * 3 = 2.7
    curves = A.strategy_curves(stores)
    assert len(curves) == 12 and set(curves["top_n"]) == {2, 4, 8, 16}


def test_run_progress(tmp_path):
    config = {"strategy": "circuit", "top_n": 4, "steps": 4}
    finished = make_store(tmp_path / "finished", manifest={"config": config})
    finished.log_eval(4, {"dev_metric": 1.0})
    assert A.run_progress(finished) == A.RunProgress(0, 3, 4, True)
    assert A.run_progress(finished).status == "finished" and A.run_progress(finished).note() is None
    killed = make_store(tmp_path / "killed", {0: CIRCUITS[0], 1: CIRCUITS[1]}, {"config": config})
    killed.log_eval(0, {"dev_metric": 0.0})
    progress = A.run_progress(killed)
    assert (progress.status, progress.last_step, progress.planned_steps) == ("partial", 1, 4)
    assert progress.note().startswith("partial run: steps 0..1 of 4 recorded")
    assert A.final_evals([killed])["final_step"].tolist() == [0]


def test_run_without_tuning_config(tmp_path):
    """A store made by hand: analysable, labelled by its directory, its progress unknown."""
    from circuitdyn.analysis.pipeline import analyze_run

    bare = make_store(tmp_path / "bare", manifest={"kind": "test"})
    bare.log_eval(3, {"dev_metric": 2.0})
    assert A.tuning_config(bare) is None and A.run_label(bare) == "bare"
    assert A.run_progress(bare).status == "unknown" and A.run_progress(bare).note() is None
    finals = A.final_evals([bare])
    assert finals[
        ["strategy", "top_n", "steps", "status", "final_step", "dev_metric"]
    ].values.tolist() == [[None, None, None, "unknown", 3, 2.0]]
    result = analyze_run(bare)
    assert result.label == "bare" and result.summary["status"] == "unknown"
    assert result.summary["strategy"] is None and result.summary["final_dev_metric"] == 2.0
    assert any("no checkpoints" in n for n in result.notes)
    with pytest.raises(StoreError, match="pass task="):
        heads.run_task(bare, None)


# ---------------------------------------------------------------------------------------------
# model-based analyses: head roles and weight change on a tiny agreement-language model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random model with the agreement tokenizer, saved as a model directory, and a run
    store naming it with two checkpoints (unchanged weights at 0, perturbed at 1)."""
    from circuitdyn.models import DEFAULT_MODEL_DIR, save_model
    from circuitdyn.tasks.word_tokenizer import load_word_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = load_word_tokenizer(DEFAULT_MODEL_DIR / "tokenizer")
    cfg = HookedTransformerConfig(
        n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, d_vocab=len(tokenizer),
        n_ctx=48, act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    save_model(model, root / "model")
    graph = Graph.from_model(model)
    config = {
        "task": "agreement",
        "task_options": {"n_train": 8, "n_dev": 24, "n_test": 4},
        "seed": 0,
        "strategy": "circuit",
        "top_n": 3,
    }
    store = RunStore.create(
        root / "run",
        manifest={"config": config, "model_name": str(root / "model")},
        src_names=graph.src_names,
        dst_names=graph.dst_names,
        edge_valid=graph.edge_valid,
        node_names=graph.node_names,
    )
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    mask[graph.edge_index("a0.h0->logits")] = True
    for step in (0, 1):
        store.append(
            step,
            edge_scores=torch.zeros(graph.n_src, graph.n_dst),
            edge_mask=mask,
            node_scores=torch.zeros(len(graph.node_names)),
            metrics={"loss": 1.0},
        )
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    store.save_checkpoint(0, tensors=state, meta={})
    delta = torch.zeros_like(model.W_Q[1, 0])
    delta[0, 0] = 0.3
    state["model.blocks.1.attn.W_Q"][0] += delta  # layer 1, head 0 only
    state["model.blocks.0.mlp.W_in"] *= 1.1
    store.save_checkpoint(1, tensors=state, meta={})
    return {"store": store, "model": model, "root": root, "delta": delta}


def test_subject_positions_point_at_nouns(tiny_run):
    from circuitdyn.tasks.agreement import NOUNS

    task = heads.run_task(tiny_run["store"], tiny_run["model"])
    subjects = heads.subject_positions(task, "dev")
    encoded = task.encoded("dev")
    used = encoded.read_pos >= 0
    assert subjects.shape == encoded.read_pos.shape
    assert bool((subjects[used] >= 1).all()) and bool(
        (subjects[used] <= encoded.read_pos[used]).all()
    )
    nouns = {w for pair in NOUNS for w in pair}
    rows, cols = used.nonzero(as_tuple=True)
    words = task.tokenizer.convert_ids_to_tokens(encoded.clean[rows, subjects[rows, cols]].tolist())
    assert set(words) <= nouns


def test_uniform_attention_matches_baseline(tiny_run):
    model = tiny_run["model"]
    task = heads.run_task(tiny_run["store"], model)
    data = list(heads.task_examples(task, "dev", 16, 8))
    flat = A.head_roles_of_model(model, data)
    assert (flat["attention_to_subject"] > 0).all()
    with torch.no_grad():
        params = [getattr(b.attn, n) for b in model.blocks for n in ("W_Q", "W_K", "b_Q", "b_K")]
        saved = [(p, p.clone()) for p in params]
        for p, _ in saved:
            p.zero_()  # every score is 0: attention is uniform over the causal prefix
        try:
            roles = A.head_roles_of_model(model, data)
        finally:
            for p, old in saved:
                p.copy_(old)
    np.testing.assert_allclose(roles["attention_to_subject"], roles["uniform_baseline"], rtol=1e-5)
    np.testing.assert_allclose(roles["attention_ratio"], 1.0, rtol=1e-5)
    assert roles["n_reads"].iloc[0] == sum(int(b.read_mask.sum()) for b, _ in data)


def test_dla_adds_up_to_the_logit_difference(tiny_run):
    """Sum of the heads' DLA and the same linearisation of every other residual component (plus
    the final LN bias and the unembedding bias) is the logit difference, exactly."""
    model = tiny_run["model"]
    task = heads.run_task(tiny_run["store"], model)
    data = list(heads.task_examples(task, "dev", 16, 8))
    roles = A.head_roles_of_model(model, data)
    total_heads = roles["dla"].sum()
    others, diffs, n = 0.0, 0.0, 0
    with torch.no_grad():
        for batch, _ in data:
            logits, cache = model.run_with_cache(batch.clean)
            used = batch.read_mask
            rows = torch.arange(batch.size)[:, None]
            pos = batch.read_pos.clamp(min=0)
            d = (
                model.W_U[:, batch.target.clamp(min=0)] - model.W_U[:, batch.foil.clamp(min=0)]
            ).permute(1, 2, 0)
            scale = cache["ln_final.hook_scale"][rows, pos]
            parts = [cache["hook_embed"], cache["hook_pos_embed"].expand_as(cache["hook_embed"])]
            for layer in range(model.cfg.n_layers):
                parts.append(cache[f"blocks.{layer}.hook_mlp_out"])
                parts.append(model.b_O[layer].expand_as(cache["hook_embed"]))
            for part in parts:
                x = part[rows, pos]
                x = (x - x.mean(-1, keepdim=True)) / scale * model.ln_final.w
                others += float((x * d).sum(-1)[used].sum())
            bias = (model.ln_final.b * d).sum(-1) + (
                model.b_U[batch.target.clamp(min=0)] - model.b_U[batch.foil.clamp(min=0)]
            )
            others += float(bias[used].sum())
            target = logits[rows, pos].gather(-1, batch.target.clamp(min=0)[..., None])[..., 0]
            foil = logits[rows, pos].gather(-1, batch.foil.clamp(min=0)[..., None])[..., 0]
            diffs += float((target - foil)[used].sum())
            n += int(used.sum())
    assert total_heads + others / n == pytest.approx(diffs / n, abs=1e-4)


def test_head_roles_over_checkpoints(tiny_run):
    roles = A.head_roles(tiny_run["store"], n_examples=16, batch_size=8)
    assert roles["step"].unique().tolist() == [-1, 0, 1]
    assert roles["updates"].unique().tolist() == [0, 1, 2]
    initial = roles[roles["step"] == -1].reset_index(drop=True)
    same = roles[roles["step"] == 0].reset_index(drop=True)
    columns = ["attention_to_subject", "dla"]
    pd.testing.assert_frame_equal(initial[columns], same[columns], atol=1e-6, rtol=0)
    changes = A.head_role_changes(roles)
    assert len(changes) == 4 and changes["step_first"].iloc[0] == -1
    assert changes["delta_dla"].abs().is_monotonic_decreasing


def test_weight_changes_known_perturbation(tiny_run):
    store, model, delta = tiny_run["store"], tiny_run["model"], tiny_run["delta"]
    changes = A.weight_changes(store)
    assert changes["step"].unique().tolist() == [0, 1]
    assert changes[changes["step"] == 0]["rel_change"].abs().max() == 0.0
    last = changes[changes["step"] == 1].set_index(["node", "matrix"])["rel_change"]
    w_q = model.W_Q[1, 0].detach()
    assert last[("a1.h0", "W_Q")] == pytest.approx(float(delta.norm() / w_q.norm()), rel=1e-5)
    owned = sum(
        float(getattr(model, name)[1, 0].detach().pow(2).sum())
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
    )
    assert last[("a1.h0", "all")] == pytest.approx(float(delta.norm()) / owned**0.5, rel=1e-5)
    assert last[("a1.h1", "all")] == 0.0 and last[("a0.h0", "W_Q")] == 0.0
    assert last[("m0", "W_in")] == pytest.approx(0.1, rel=1e-5)
    assert last[("m1", "all")] == 0.0
    moved = A.where_weights_moved(changes).set_index(["step", "component"])
    assert moved.loc[(1, "head"), "n_moved"] == 1 and moved.loc[(1, "mlp"), "n_moved"] == 1
    assert moved.loc[(1, "head"), "share_sq_change"] + moved.loc[
        (1, "mlp"), "share_sq_change"
    ] == pytest.approx(1.0)
    final = A.final_weight_changes({"x": store})
    assert final["run"].unique().tolist() == ["x"] and (final["step"] == 1).all()


def test_model_at_loads_checkpoint(tiny_run):
    model = weights.model_at(tiny_run["store"], 1)
    expected = tiny_run["model"].W_Q[1, 0].detach() + tiny_run["delta"]
    torch.testing.assert_close(model.W_Q[1, 0].detach(), expected)


def test_circuit_from_checkpoint(tiny_run):
    store = tiny_run["store"]
    sets = A.circuit_from_checkpoint(store, None, top_n=5, n_examples=8)
    assert len(sets.edges) == 5 and "logits" in sets.nodes
    assert sets.label == "agreement @ initial"
    everything = A.circuit_from_checkpoint(store, 1, top_n=10_000, n_examples=8)
    assert everything.edges == set(store.edge_names)  # n clamped to the graph's edges


# ---------------------------------------------------------------------------------------------
# timeline: key steps, normalised scores, membership raster; seeds
# ---------------------------------------------------------------------------------------------
def test_key_steps_known_answers():
    evals = pd.DataFrame(
        {"step": [0, 5, 10, 15, 20], "dev_metric": [-3.0, -1.0, 0.5, 2.0, 3.0],
         "dev_accuracy": [0.0, 0.2, 0.55, 0.8, 0.95]}
    )  # fmt: skip
    keys = A.key_steps(evals, [0, 1, 2, 3, 7, 12, 19])
    # Sorted by step: 90% is first reached at the final evaluation (step 20, after the last
    # snapshot at 19).
    assert keys["key"].tolist() == ["initial", "metric_zero", "acc50", "final", "acc90"]
    assert keys["step"].tolist() == [0, 10, 10, 19, 20]
    # The circuit drawn for a key step is the last snapshot at or before it.
    assert keys["snapshot_step"].tolist() == [0, 7, 7, 19, 19]
    marked = A.marked_steps(keys)
    assert marked["step"].tolist() == [10, 20]
    assert marked["label"].iloc[0] == "dev metric crosses 0 / dev accuracy ≥ 50%"
    never = A.key_steps(evals.assign(dev_metric=1.0, dev_accuracy=0.1), [0, 1])
    assert never["key"].tolist() == ["initial", "final"]


def test_score_shares_and_totals(store):
    totals = A.step_score_totals(store)
    assert totals["step"].tolist() == [0, 1, 2]
    expected = [sum(abs(v[s]) for v in TRUE_SCORES.values()) for s in range(3)]
    np.testing.assert_allclose(totals["total_abs_score"], expected)
    traj = A.score_shares(A.edge_trajectories(store, [RISING]), totals)
    np.testing.assert_allclose(traj["share"], np.array([1.0, 3.0, 5.0]) / expected)
    shares = A.column_shares(A.node_score_matrix(store))
    np.testing.assert_allclose(shares.abs().sum(axis=0), 1.0)


def test_edge_membership_raster_sorted_by_entry(store):
    raster = A.edge_membership(store)
    assert list(raster.columns) == [0, 1, 2, 3]
    # Entered at 0 first (longest present first), then the edges that entered at step 1.
    assert raster.index.tolist() == [RISING, SHRINKING, NOISY, "m0->logits"]
    assert raster.loc[NOISY].tolist() == [0, 1, 1, 1]
    counts = A.churn_counts(A.churn(store), window=3)
    assert counts["edges_added"].tolist() == [0, 2, 0, 0]
    smooth = counts["jaccard_edges_prev"].rolling(3, center=True, min_periods=1).mean()
    np.testing.assert_allclose(counts["jaccard_edges_prev_smoothed"], smooth)


def test_mask_near_zero_and_step_descriptions():
    evals = pd.DataFrame(
        {"step": [0, 5, 10], "dev_metric": [-4.0, 0.1, 3.0], "faithfulness": [0.9, -13.0, 1.0],
         "dev_accuracy": [0.0, 0.5, 1.0]}
    )  # fmt: skip
    masked = A.mask_near_zero(evals)
    assert masked["faithfulness_masked"].tolist()[::2] == [0.9, 1.0]
    assert np.isnan(masked["faithfulness_masked"].iloc[1])  # |0.1| < 10% of 4
    metrics = pd.DataFrame({"step": [0, 7], "metric": [-4.2, 1.0]})
    text = A.step_descriptions(metrics, evals)
    assert text[0].startswith("batch metric -4.2") and "evaluated at t=5" in text[7]


def test_seed_groups_and_bands():
    assert (
        A.seed_group("circuit_s2") == "circuit" and A.seed_group("full-lr0.001") == "full-lr0.001"
    )
    table = pd.DataFrame(
        {"group": ["a"] * 4 + ["b"] * 2, "step": [0, 1, 0, 1, 0, 1],
         "value": [1.0, 2.0, 3.0, 4.0, 5.0, np.nan]}
    )  # fmt: skip
    bands = A.over_seeds(table, ["value"])
    a = bands[bands["group"] == "a"]
    assert a["mean"].tolist() == [2.0, 3.0] and a["std"].tolist() == [1.0, 1.0]
    assert a["n"].tolist() == [2, 2] and a["lo"].tolist() == [1.0, 2.0]
    b = bands[bands["group"] == "b"]
    assert b["step"].tolist() == [0] and b["std"].tolist() == [0.0]  # NaN dropped, one seed
