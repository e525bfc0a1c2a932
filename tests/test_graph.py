import pytest
import torch

from circuitdyn.graph import Graph, UnsupportedModelError


def test_gpt2_small_sizes_and_names():
    graph = Graph(n_layers=12, n_heads=12)
    # 1 + 12 * (12 heads + 1 MLP) sources; 12 * (3 * 12 + 1) + 1 destinations; the edge count
    # of GPT-2 small in EAP-IG / MIB.
    assert (graph.n_src, graph.n_dst, graph.n_edges) == (157, 445, 32491)
    assert set(graph.edge_names) == edges_by_rule(12, 12)
    assert graph.edge_names[0] == "input->a0.h0<q>"
    assert "a0.h1->a2.h3<q>" in graph.edge_names
    assert "m11->logits" in graph.edge_names
    assert len(graph.node_names) == 158


def edges_by_rule(n_layers: int, n_heads: int, has_mlp: bool = True) -> set[str]:
    """Every edge, written down from the layer rule alone: a head of layer L reads what was
    written before layer L (q, k and v separately); an MLP of layer L also reads the heads of
    its own layer; logits read everything."""
    written: list[tuple[str, float]] = [("input", -1)]  # (source, when it is written)
    for layer in range(n_layers):
        written += [(f"a{layer}.h{h}", layer) for h in range(n_heads)]
        if has_mlp:
            written.append((f"m{layer}", layer + 0.5))
    edges = set()
    for layer in range(n_layers):
        for src, when in written:
            if when < layer:
                edges |= {f"{src}->a{layer}.h{h}<{c}>" for h in range(n_heads) for c in "qkv"}
            if has_mlp and when <= layer:
                edges.add(f"{src}->m{layer}")
    return edges | {f"{src}->logits" for src, _ in written}


@pytest.mark.parametrize(
    ("n_layers", "n_heads", "has_mlp"), [(3, 2, True), (2, 3, False), (1, 1, True)]
)
def test_edges_are_exactly_those_of_the_layer_rule(n_layers, n_heads, has_mlp):
    graph = Graph(n_layers, n_heads, has_mlp)
    expected = edges_by_rule(n_layers, n_heads, has_mlp)
    assert len(graph.edge_names) == len(set(graph.edge_names)) == graph.n_edges == len(expected)
    assert set(graph.edge_names) == expected
    # The dense layout agrees with the names, entry by entry.
    for i, src in enumerate(graph.src_names):
        for j, dst in enumerate(graph.dst_names):
            assert bool(graph.edge_valid[i, j]) == (f"{src}->{dst}" in expected)


def test_edges_respect_layer_order():
    graph = Graph(n_layers=3, n_heads=2)
    # A head reads only earlier layers; an MLP also reads the heads of its own layer.
    assert graph.edge_index("m0->a1.h0<k>")
    assert graph.edge_index("a1.h1->m1")
    for bad in ["a1.h0->a1.h1<q>", "m1->a1.h0<v>", "m2->m1", "a2.h0->m1"]:
        with pytest.raises(KeyError):
            graph.edge_index(bad)


def test_name_index_round_trip_and_edges_of():
    graph = Graph(n_layers=2, n_heads=3)
    for name in graph.edge_names:
        i, j = graph.edge_index(name)
        assert f"{graph.src_names[i]}->{graph.dst_names[j]}" == name
    into_head = [e for e in graph.edges_of("a1.h2") if e.split("->")[1].startswith("a1.h2")]
    assert len(into_head) == 3 * graph.n_upstream_attn(1)
    out_of_head = [e for e in graph.edges_of("a1.h2") if e.startswith("a1.h2->")]
    assert out_of_head == ["a1.h2->m1", "a1.h2->logits"]


def test_node_scores_sum_outgoing_edges():
    graph = Graph(n_layers=2, n_heads=2)
    edges = torch.randn(graph.n_src, graph.n_dst)
    nodes = graph.node_scores(edges)
    masked = edges * graph.edge_valid
    assert torch.allclose(nodes[graph.node_index("a0.h1")], masked[graph.src_index("a0.h1")].sum())
    assert torch.allclose(nodes[graph.node_index("logits")], masked[:, graph.logits_dst].sum())
    with pytest.raises(ValueError, match="edge matrix"):
        graph.node_scores(torch.zeros(3, 3))


def test_attention_only_graph_has_no_mlps(make_tiny_model):
    graph = Graph.from_model(make_tiny_model(attn_only=True))
    assert not any(name.startswith("m") for name in graph.node_names)
    assert graph.n_edges == 3 * 4 * (1 + 5) + 9  # layer 0 and 1 heads' qkv inputs + logits


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parallel_attn_mlp": True}, "parallel attention"),
        ({"n_key_value_heads": 2}, "grouped-query"),
        ({"positions": "shortformer"}, "shortformer"),
        ({"normalization": None}, "normalization_type=None"),
    ],
)
def test_unsupported_architectures_raise_clear_errors(make_tiny_model, overrides, message):
    with pytest.raises(UnsupportedModelError, match=message):
        Graph.from_model(make_tiny_model(**overrides))


def test_only_hooked_transformers(no_typecheck):
    with pytest.raises(UnsupportedModelError, match="HookedTransformer"):
        Graph.from_model(torch.nn.Linear(2, 2))
