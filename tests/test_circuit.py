"""Tests of circuitdyn.circuit: selection against hand-computed expectations, pruning, set
operations, JSON, and the parameters a circuit owns (counted by hand)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuitdyn.circuit import Circuit, jaccard_edges, jaccard_nodes
from circuitdyn.graph import Graph
from circuitdyn.optim import restrict_gradients
from circuitdyn.ownership import (
    ParameterPolicy,
    ParamKind,
    classify_parameter,
    count_tunable,
    parameter_masks,
)
from circuitdyn.scores import Scores

# Graph(1 layer, 2 heads, MLP): its 13 edges in edge_names order, with handmade scores. Ties:
# |0.3| twice (indices 4 and 10) and |0.1| twice (indices 2 and 11).
SMALL_SCORES = {
    "input->a0.h0<q>": 0.5,
    "input->a0.h1<q>": -0.9,
    "input->a0.h0<k>": 0.1,
    "input->a0.h1<k>": 0.0,
    "input->a0.h0<v>": 0.3,
    "input->a0.h1<v>": 0.05,
    "input->m0": 0.2,
    "input->logits": 0.4,
    "a0.h0->m0": -0.6,
    "a0.h0->logits": 0.7,
    "a0.h1->m0": 0.3,
    "a0.h1->logits": -0.1,
    "m0->logits": 0.8,
}


def small_scores() -> Scores:
    graph = Graph(1, 2)
    assert list(graph.edge_names) == list(SMALL_SCORES)
    edges = torch.zeros(graph.n_src, graph.n_dst)
    for name, value in SMALL_SCORES.items():
        edges[graph.edge_index(name)] = value
    return Scores(graph, edges)


# ---- selection -------------------------------------------------------------------------------
def test_top_edges_absolute_and_signed_with_ties():
    scores = small_scores()
    top3 = Circuit.top_edges(scores, 3)
    assert set(top3.edges) == {"input->a0.h1<q>", "m0->logits", "a0.h0->logits"}
    # Seventh place is a tie at |0.3| between edges 4 and 10: the earlier edge wins.
    top7 = Circuit.top_edges(scores, 7)
    assert "input->a0.h0<v>" in top7 and "a0.h1->m0" not in top7
    signed = Circuit.top_edges(scores, 3, absolute=False)
    assert set(signed.edges) == {"m0->logits", "a0.h0->logits", "input->a0.h0<q>"}
    assert Circuit.top_edges(scores, 0) == Circuit.empty(scores.graph)
    assert Circuit.top_edges(scores, 13) == Circuit.full(scores.graph)


def test_threshold():
    scores = small_scores()
    assert Circuit.threshold(scores, 0.3).n_edges == 8
    assert set(Circuit.threshold(scores, 0.3, absolute=False).edges) == {
        "m0->logits",
        "a0.h0->logits",
        "input->a0.h0<q>",
        "input->logits",
        "input->a0.h0<v>",
        "a0.h1->m0",
    }
    with pytest.raises(ValueError, match="finite"):
        Circuit.threshold(scores, math.nan)


def test_greedy_grows_from_logits():
    scores = small_scores()
    # Candidates start as the edges into logits; a source joins when its edge is taken and the
    # edges into it become candidates. The best edge overall (input->a0.h1<q>, |-0.9|) is not
    # eligible until a0.h1 joins.
    four = {"m0->logits", "a0.h0->logits", "a0.h0->m0", "input->a0.h0<q>"}
    assert set(Circuit.greedy(scores, 4).edges) == four
    # Next: input->logits (0.4), then the 0.3 tie goes to the earlier edge input->a0.h0<v>.
    assert set(Circuit.greedy(scores, 6).edges) == four | {"input->logits", "input->a0.h0<v>"}
    seven = Circuit.greedy(scores, 7)
    assert "a0.h1->m0" in seven and "input->a0.h1<q>" not in seven
    assert "input->a0.h1<q>" in Circuit.greedy(scores, 8)
    signed = Circuit.greedy(scores, 3, absolute=False)
    assert set(signed.edges) == {"m0->logits", "a0.h0->logits", "input->a0.h0<q>"}
    assert Circuit.greedy(scores, 13) == Circuit.full(scores.graph)


def test_top_nodes():
    scores = small_scores()
    # Node scores (sum of outgoing edges): a0.h0 = 0.1, a0.h1 = 0.2, m0 = 0.8.
    one = Circuit.top_nodes(scores, 1)
    assert set(one.edges) == {"input->m0", "input->logits", "m0->logits"}
    two = Circuit.top_nodes(scores, 2)
    assert two.nodes == ("input", "a0.h1", "m0", "logits")
    assert two.n_edges == 8
    assert set(Circuit.top_nodes(scores, 0).edges) == {"input->logits"}
    with pytest.raises(ValueError, match="only 3"):
        Circuit.top_nodes(scores, 4)


@pytest.mark.parametrize("method", [Circuit.top_edges, Circuit.greedy, Circuit.top_nodes])
def test_selection_errors(method):
    scores = small_scores()
    with pytest.raises(ValueError, match=">= 0"):
        method(scores, -1)
    with pytest.raises(ValueError, match="only"):
        method(scores, 14)
    with pytest.raises(TypeError):
        method(scores, 1.5)
    scores.edges[0, 0] = math.nan  # Scores checks at construction; selection checks again
    with pytest.raises(ValueError, match="NaN"):
        method(scores, 1)


def test_greedy_on_a_real_sized_graph_is_fast_and_connected():
    graph = Graph(12, 12)  # GPT-2 small: 32491 edges
    generator = torch.Generator().manual_seed(0)
    scores = Scores(graph, torch.randn(graph.n_src, graph.n_dst, generator=generator))
    circuit = Circuit.greedy(scores, 3000)
    assert circuit.n_edges == 3000
    # Every edge's destination node is logits or the source of another circuit edge.
    sources = set(circuit.mask.any(dim=1).nonzero()[:, 0].tolist())
    for name in circuit.edges:
        dst = Graph.dst_node(name.split("->")[1])
        assert dst == "logits" or graph.src_index(dst) in sources


# ---- pruning ---------------------------------------------------------------------------------
def test_prune_hand_built():
    graph = Graph(2, 2)
    kept = [
        "input->a0.h0<q>",
        "a0.h0->m1",
        "m1->logits",
        "a0.h0->a1.h1<v>",  # a1.h1 is reached through its value input only
        "a1.h1->m1",
    ]
    dropped = [
        "a0.h1->a1.h0<q>",  # a0.h1 has no input
        "a1.h0->logits",  # a1.h0's only input comes from the unreached a0.h1
        "input->m0",  # m0 reaches nothing
        "a0.h0->m0",
    ]
    circuit = Circuit.from_edges(graph, kept + dropped)
    pruned = circuit.prune()
    assert set(pruned.edges) == set(kept)
    assert pruned.prune() == pruned
    assert pruned.nodes == ("input", "a0.h0", "a1.h1", "m1", "logits")
    # Nothing reaches logits from input: everything goes.
    assert Circuit.from_edges(graph, ["a0.h0->logits", "input->m0"]).prune().n_edges == 0
    assert Circuit.full(graph).prune() == Circuit.full(graph)


def test_prune_keeps_greedy_circuits_idempotent():
    graph = Graph(3, 4)
    generator = torch.Generator().manual_seed(1)
    scores = Scores(graph, torch.randn(graph.n_src, graph.n_dst, generator=generator))
    for n in (5, 40, 200):
        pruned = Circuit.greedy(scores, n).prune()
        assert pruned.prune() == pruned
        assert pruned.n_edges <= n


# ---- sets, names, JSON ------------------------------------------------------------------------
def test_set_operations_and_jaccard():
    graph = Graph(1, 2)
    a = Circuit.from_edges(graph, ["input->a0.h0<q>", "a0.h0->logits"])
    b = Circuit.from_edges(graph, ["input->a0.h0<k>", "a0.h0->logits", "m0->logits"])
    assert (a | b).n_edges == 4
    assert (a & b).edges == ("a0.h0->logits",)
    assert (a - b).edges == ("input->a0.h0<q>",)
    assert jaccard_edges(a, b) == pytest.approx(1 / 4)
    assert a.nodes == ("input", "a0.h0", "logits")
    assert b.n_nodes == 4
    assert jaccard_nodes(a, b) == pytest.approx(3 / 4)
    assert jaccard_edges(Circuit.empty(graph), Circuit.empty(graph)) == 1.0
    assert a.complement() == Circuit.full(graph) - a
    assert "a0.h0" in a and "m0" not in a and "a0.h0->logits" in a
    with pytest.raises(ValueError, match="different graphs"):
        _ = a | Circuit.empty(Graph(1, 3))


def test_validation(no_typecheck):
    graph = Graph(1, 2)
    bad = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    bad[graph.src_index("m0"), graph.dst_index("a0.h0<q>")] = True
    with pytest.raises(ValueError, match="not edges"):
        Circuit(graph, bad)
    with pytest.raises(ValueError, match="bool"):
        Circuit(graph, torch.zeros(graph.n_src, graph.n_dst))
    with pytest.raises(KeyError):
        Circuit.from_edges(graph, ["m0->a0.h0<q>"])


def test_json_round_trip(tmp_path):
    graph = Graph(2, 3, has_mlp=False)
    circuit = Circuit.from_edges(graph, ["input->a1.h2<k>", "a0.h1->a1.h0<v>", "a1.h2->logits"])
    path = tmp_path / "circuit.json"
    circuit.to_json(path)
    payload = json.loads(path.read_text())
    # EAP-IG's graph-file cfg: an attention-only model of 2 layers of 3 heads.
    cfg = payload["cfg"]
    assert (cfg["n_layers"], cfg["n_heads"], cfg["attn_only"]) == (2, 3, True)
    assert {e for e, v in payload["edges"].items() if v["in_graph"]} == set(circuit.edges)
    loaded = Circuit.from_json(path)
    assert loaded == circuit and loaded.graph == graph
    # EAP-IG / MIB graph files: edges map name -> {"in_graph": ...}.
    mib = {
        "cfg": {"n_layers": 2, "n_heads": 3, "attn_only": True, "parallel_attn_mlp": False},
        "edges": {e: {"score": 1.0, "in_graph": e in circuit} for e in graph.edge_names},
    }
    assert Circuit.from_dict(mib) == circuit
    with pytest.raises(ValueError, match="not a circuit"):
        Circuit.from_dict({"edges": []})


# ---- parameters ------------------------------------------------------------------------------
PARAM_CIRCUIT = [
    "input->a0.h1<q>",  # W_Q[1], b_Q[1] of layer 0:  32*8 + 8 = 264
    "input->a0.h1<v>",  # W_V[1], b_V[1] of layer 0:  264
    "a0.h1->m1",  # W_O[1] of layer 0: 8*32 = 256; m1: W_in, b_in, W_out, b_out = 2048+64+2048+32
    "m1->logits",
    "input->a1.h3<k>",  # W_K[3], b_K[3] of layer 1: 264
]


def test_count_tunable_by_hand(model):
    circuit = Circuit.from_edges(Graph.from_model(model), PARAM_CIRCUIT)
    assert count_tunable(model, circuit) == 264 + 264 + 256 + 4192 + 264
    # ln1.0 + ln1.1 + ln2.1 + ln_final (weight and bias, 2*32 each)
    assert count_tunable(model, circuit, ParameterPolicy(include_layernorm=True)) == 5240 + 4 * 64
    # W_E (20*32) + W_pos (16*32)
    assert count_tunable(model, circuit, ParameterPolicy(include_embed=True)) == 5240 + 640 + 512
    # W_U (32*20) + b_U (20)
    assert count_tunable(model, circuit, ParameterPolicy(include_unembed=True)) == 5240 + 660
    # b_O of layer 0 only (no head of layer 1 has an output edge)
    assert count_tunable(model, circuit, ParameterPolicy(include_attn_bias_out=True)) == 5240 + 32
    everything = ParameterPolicy(True, True, True, True)
    n_params = sum(p.numel() for p in model.parameters())
    assert count_tunable(model, Circuit.full(Graph.from_model(model)), everything) == n_params
    assert count_tunable(model, Circuit.empty(Graph.from_model(model)), everything) == 0


def test_parameter_masks_slices(model):
    masks = parameter_masks(model, Circuit.from_edges(Graph.from_model(model), PARAM_CIRCUIT))
    assert set(masks) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert masks[name].shape == param.shape and masks[name].dtype == torch.bool
    heads = lambda name: masks[name].flatten(1).all(dim=1).tolist()  # noqa: E731
    assert heads("blocks.0.attn.W_Q") == [False, True, False, False]
    assert heads("blocks.0.attn.W_K") == [False] * 4
    assert heads("blocks.0.attn.W_O") == [False, True, False, False]
    assert heads("blocks.1.attn.W_K") == [False, False, False, True]
    assert masks["blocks.1.attn.b_K"][3].all() and not masks["blocks.1.attn.b_K"][:3].any()
    assert masks["blocks.1.mlp.W_in"].all() and not masks["blocks.0.mlp.W_in"].any()
    sparse = parameter_masks(
        model, Circuit.from_edges(Graph.from_model(model), PARAM_CIRCUIT), include_frozen=False
    )
    assert "embed.W_E" not in sparse and "blocks.0.attn.W_Q" in sparse


def test_masks_freeze_gradient_updates(model):
    circuit = Circuit.from_edges(Graph.from_model(model), PARAM_CIRCUIT)
    masks = parameter_masks(model, circuit)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    model(tokens, return_type="loss").backward()
    restrict_gradients(dict(model.named_parameters()), masks)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = 0
    for name, param in model.named_parameters():
        moved = param.detach() != before[name]
        assert not (moved & ~masks[name]).any(), name
        changed += int(moved.sum())
    assert 0 < changed <= count_tunable(model, circuit)


def test_grouped_query_attention_rows_are_shared(make_tiny_model):
    model = make_tiny_model(
        n_layers=1,
        n_key_value_heads=2,
        ungroup_grouped_query_attention=True,
        normalization="RMS",
        gated_mlp=True,
        act_fn="silu",
    )
    graph = Graph.from_model(model)
    # Head 1 owns K: _W_K is stored [2 kv heads, ...]; heads 0 and 1 share row 0.
    circuit = Circuit.from_edges(graph, ["input->a0.h1<k>", "a0.h1->logits"])
    masks = parameter_masks(model, circuit)
    assert masks["blocks.0.attn._W_K"].flatten(1).all(dim=1).tolist() == [True, False]
    assert count_tunable(model, circuit) == (32 * 8 + 8) + 8 * 32
    # A gated MLP owns W_gate too: W_in, W_gate, W_out (3*32*64) + b_in + b_out.
    mlp = Circuit.from_edges(graph, ["input->m0", "m0->logits"])
    assert count_tunable(model, mlp) == 3 * 32 * 64 + 64 + 32


def test_classify_parameter():
    assert classify_parameter("blocks.3.attn.W_Q").kind is ParamKind.HEAD_Q
    assert classify_parameter("blocks.3.attn._W_V").layer == 3
    assert classify_parameter("blocks.0.mlp.experts.2.W_in.weight").kind is ParamKind.MLP
    assert classify_parameter("ln_final.w").kind is ParamKind.LAYERNORM
    with pytest.raises(ValueError, match="cannot map"):
        classify_parameter("blocks.0.attn.mystery")
