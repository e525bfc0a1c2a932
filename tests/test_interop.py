"""EAP-IG / MIB graph files (JSON and .pt) in both directions.

The fixtures are written field by field from EAP-IG's format (hannamw/EAP-IG, src/eap/graph.py:
``Graph.from_model``, ``to_json``, ``from_json``, ``to_pt``, ``from_pt``), and files circuitdyn
writes are read back by `eap_from_json` / `eap_from_pt` below: minimal readers that follow
EAP-IG's loading logic (index formulas, required keys, tensor assignment) without circuitdyn's
`Graph`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from circuitdyn import interop
from circuitdyn.circuit import Circuit
from circuitdyn.graph import Graph
from circuitdyn.scores import Scores

# ---- EAP-IG's layout for n_layers=2, n_heads=2, written out by hand --------------------------
CFG = {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}
# Graph.to_pt: src_nodes = the non-logits nodes in insertion order (from_model).
SRC = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
# Graph.get_dst_nodes: per layer q of every head, k of every head, v of every head, the MLP.
DST = [
    "a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0",
    "a1.h0<q>", "a1.h1<q>", "a1.h0<k>", "a1.h1<k>", "a1.h0<v>", "a1.h1<v>", "m1",
    "logits",
]  # fmt: skip
NODES = [*SRC, "logits"]
# Edges: layer 0 heads 1 src x 2 heads x 3 inputs, m0 3 srcs, layer 1 heads 4 x 6, m1 6, logits 7.
N_EDGES = 6 + 3 + 24 + 6 + 7


# ---- a minimal reader following EAP-IG's Graph.from_model / from_json / from_pt ---------------
def eap_forward_index(cfg: dict[str, Any], name: str) -> int:
    """Graph._forward_index."""
    n_heads = cfg["n_heads"]
    if name == "input":
        return 0
    if name[0] == "m":
        return 1 + int(name[1:]) * (n_heads + 1) + n_heads
    layer, head = name.split(".")
    return 1 + int(layer[1:]) * (n_heads + 1) + int(head[1:])


def eap_backward_index(cfg: dict[str, Any], name: str, qkv: str | None) -> int:
    """Graph._backward_index (logits is -1, the last column)."""
    n_heads = cfg["n_heads"]
    if name == "logits":
        return -1
    if name[0] == "m":
        return int(name[1:]) * (3 * n_heads + 1) + 3 * n_heads
    layer, head = name.split(".")
    return int(layer[1:]) * (3 * n_heads + 1) + "qkv".index(qkv) * n_heads + int(head[1:])


def eap_edges(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Edge name -> matrix index, in the order Graph.from_model adds them (no parallel attn/MLP)."""
    edges: dict[str, tuple[int, int]] = {}

    def add(parent: str, child: str, qkv: str | None = None) -> None:
        name = f"{parent}->{child}" if qkv is None else f"{parent}->{child}<{qkv}>"
        edges[name] = (eap_forward_index(cfg, parent), eap_backward_index(cfg, child, qkv))

    residual = ["input"]
    for layer in range(cfg["n_layers"]):
        heads = [f"a{layer}.h{h}" for h in range(cfg["n_heads"])]
        for node in residual:
            for head in heads:
                for letter in "qkv":
                    add(node, head, letter)
        residual += heads
        for node in residual:
            add(node, f"m{layer}")
        residual.append(f"m{layer}")
    for node in residual:
        add(node, "logits")
    return edges


def eap_empty(cfg: dict[str, Any], neuron_level: bool) -> dict[str, Any]:
    """Graph.from_model(dict): the cfg keys it reads and the tensors it allocates."""
    assert cfg["parallel_attn_mlp"] is False  # read by from_model / prev_index
    n_forward = 1 + cfg["n_layers"] * (cfg["n_heads"] + 1)
    n_backward = cfg["n_layers"] * (3 * cfg["n_heads"] + 1) + 1
    graph = {
        "cfg": cfg,
        "scores": torch.zeros((n_forward, n_backward)),
        "in_graph": torch.zeros((n_forward, n_backward)).bool(),
        "nodes_in_graph": torch.zeros(n_forward).bool(),
        "nodes_scores": torch.full((n_forward,), torch.nan),
        "edges": eap_edges(cfg),
    }
    if neuron_level:
        graph["neurons_in_graph"] = torch.zeros((n_forward, cfg["d_model"])).bool()
    return graph


def eap_from_json(path: Path) -> dict[str, Any]:
    """Graph.from_json: cfg / nodes / edges required; every edge entry needs score and in_graph."""
    d = json.loads(path.read_text())
    assert all(k in d for k in ["cfg", "nodes", "edges"]), "Bad input JSON format - Missing keys"
    g = eap_empty(d["cfg"], neuron_level=True)  # needs cfg['d_model']
    any_node_scores = False
    for name, node_dict in d["nodes"].items():
        if name == "logits":
            continue
        index = eap_forward_index(d["cfg"], name)
        g["nodes_in_graph"][index] = node_dict["in_graph"]
        if "score" in node_dict:
            any_node_scores = True
            g["nodes_scores"][index] = node_dict["score"]
    if not any_node_scores:
        g["nodes_scores"] = None
    for name, info in d["edges"].items():
        index = g["edges"][name]  # KeyError for an edge EAP-IG's graph does not have
        g["scores"][index] = info["score"]
        g["in_graph"][index] = info["in_graph"]
    return g


def eap_from_pt(path: Path) -> dict[str, Any]:
    """Graph.from_pt: required keys, equal edge tensor shapes, tensors copied in place."""
    d = torch.load(path, weights_only=True)
    required = ["cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph"]
    assert all(k in d for k in required)
    assert d["edges_scores"].shape == d["edges_in_graph"].shape
    g = eap_empty(d["cfg"], neuron_level=False)
    g["in_graph"][:] = d["edges_in_graph"]
    g["scores"][:] = d["edges_scores"]
    g["nodes_in_graph"][:] = d["nodes_in_graph"]
    g["nodes_scores"] = d.get("nodes_scores")
    g["src_nodes"], g["dst_nodes"] = d["src_nodes"], d["dst_nodes"]
    return g


def in_graph_names(g: dict[str, Any]) -> set[str]:
    return {name for name, index in g["edges"].items() if bool(g["in_graph"][index])}


def edge_score(g: dict[str, Any], name: str) -> float:
    return float(g["scores"][g["edges"][name]])


# ---- circuitdyn objects -----------------------------------------------------------------------
def random_scores(graph: Graph, seed: int = 0, **meta: Any) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    return Scores(graph, torch.randn(graph.n_src, graph.n_dst, generator=generator), dict(meta))


CIRCUIT_EDGES = [  # an unpruned circuit: a0.h0 has an outgoing edge but no incoming one
    "input->a0.h1<v>",
    "a0.h1->a1.h0<k>",
    "a1.h0->logits",
    "a0.h0->m1",
    "m1->logits",
    "input->m0",
]


def test_the_hand_written_layout_is_circuitdyns_and_the_readers():
    graph = Graph(2, 2)
    assert list(graph.src_names) == SRC and list(graph.dst_names) == DST
    assert list(graph.node_names) == NODES
    assert [eap_forward_index(CFG, n) for n in SRC] == list(range(len(SRC)))
    backward = [eap_backward_index(CFG, d.split("<")[0], d[-2] if "<" in d else None) for d in DST]
    assert [j % len(DST) for j in backward] == list(range(len(DST)))
    edges = eap_edges(CFG)
    assert len(edges) == N_EDGES == graph.n_edges
    assert set(edges) == set(graph.edge_names)
    for name, (i, j) in edges.items():
        assert graph.edge_index(name) == (i, j % len(DST))


# ---- circuitdyn -> EAP-IG ---------------------------------------------------------------------
def test_scores_json_loads_in_eap_from_json(tmp_path):
    graph = Graph(2, 2)
    scores = random_scores(graph, method="eap", d_model=8)
    scores.to_json(tmp_path / "s.json")
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["cfg"] == CFG
    assert list(payload["nodes"]) == NODES
    assert all(set(entry) == {"in_graph", "score"} for entry in payload["nodes"].values())
    assert all(set(entry) == {"score", "in_graph"} for entry in payload["edges"].values())
    assert payload["meta"] == {"method": "eap", "d_model": 8}
    g = eap_from_json(tmp_path / "s.json")
    for name in graph.edge_names:
        assert edge_score(g, name) == scores.edge(name)
    assert in_graph_names(g) == set(graph.edge_names)  # bare scores: the full model
    assert bool(g["nodes_in_graph"].all())
    assert torch.equal(g["nodes_scores"], scores.nodes[: len(SRC)])


def test_scores_without_d_model_still_load_in_eap(tmp_path):
    graph = Graph(2, 2)
    random_scores(graph).to_json(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["cfg"]["d_model"] == 0
    eap_from_json(tmp_path / "s.json")
    random_scores(graph, d_model=8).to_json(tmp_path / "t.json", d_model=16)
    assert json.loads((tmp_path / "t.json").read_text())["cfg"]["d_model"] == 16


def test_circuit_json_with_scores_loads_in_eap_from_json(tmp_path):
    graph = Graph(2, 2)
    scores = random_scores(graph, d_model=8)
    circuit = Circuit.from_edges(graph, CIRCUIT_EDGES)
    circuit.to_json(tmp_path / "c.json", scores=scores)
    payload = json.loads((tmp_path / "c.json").read_text())
    assert payload["cfg"] == CFG
    g = eap_from_json(tmp_path / "c.json")
    assert in_graph_names(g) == set(CIRCUIT_EDGES)
    for name in graph.edge_names:
        assert edge_score(g, name) == scores.edge(name)
    # Node in_graph as EAP-IG's prune sets it: outgoing and (but for input) incoming edges.
    in_nodes = {n for n in SRC if bool(g["nodes_in_graph"][eap_forward_index(CFG, n)])}
    # a0.h0 has an outgoing edge but no incoming one, m0 the reverse: both are out.
    assert in_nodes == {"input", "a0.h1", "a1.h0", "m1"}
    assert payload["nodes"]["logits"] == {"in_graph": True, "score": scores.node("logits")}


def test_circuit_json_without_scores(tmp_path):
    graph = Graph(2, 2)
    circuit = Circuit.from_edges(graph, CIRCUIT_EDGES).prune()
    circuit.to_json(tmp_path / "c.json")
    payload = json.loads((tmp_path / "c.json").read_text())
    assert payload["cfg"]["d_model"] == 0
    assert all(set(entry) == {"in_graph"} for entry in payload["nodes"].values())
    g = eap_from_json(tmp_path / "c.json")
    assert in_graph_names(g) == set(circuit.edges)
    assert not bool(g["scores"].any())
    # A pruned circuit: EAP-IG's node membership is circuitdyn's node set.
    in_nodes = {n for n in NODES if payload["nodes"][n]["in_graph"]}
    assert in_nodes == set(circuit.nodes)
    assert circuit.to_dict() == payload


def test_pt_files_load_in_eap_from_pt(tmp_path):
    graph = Graph(2, 2)
    scores = random_scores(graph, d_model=8, method="eap-ig")
    circuit = Circuit.from_edges(graph, CIRCUIT_EDGES)
    scores.to_pt(tmp_path / "s.pt")
    circuit.to_pt(tmp_path / "c.pt", scores=scores)
    cases = [(tmp_path / "s.pt", set(graph.edge_names)), (tmp_path / "c.pt", set(CIRCUIT_EDGES))]
    for path, expected in cases:
        raw = torch.load(path, weights_only=True)
        assert raw["cfg"] == CFG
        assert raw["src_nodes"] == SRC and raw["dst_nodes"] == DST
        assert raw["edges_scores"].dtype == torch.float32
        assert raw["edges_in_graph"].dtype == raw["nodes_in_graph"].dtype == torch.bool
        assert raw["edges_scores"].shape == (len(SRC), len(DST))
        assert json.loads(raw["meta_json"]) == {"d_model": 8, "method": "eap-ig"}
        g = eap_from_pt(path)
        assert in_graph_names(g) == expected
        for name in graph.edge_names:
            assert edge_score(g, name) == scores.edge(name)
        assert torch.equal(g["nodes_scores"], scores.nodes[: len(SRC)])
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    in_nodes = {n for i, n in enumerate(SRC) if bool(raw["nodes_in_graph"][i])}
    assert in_nodes == {"input", "a0.h1", "a1.h0", "m1"}
    Circuit.from_edges(graph, CIRCUIT_EDGES).to_pt(tmp_path / "bare.pt")
    bare = torch.load(tmp_path / "bare.pt", weights_only=True)
    assert "nodes_scores" not in bare and not bool(bare["edges_scores"].any())


def test_attention_only_graphs_use_eap_igs_full_layout(tmp_path):
    graph = Graph(2, 2, has_mlp=False)
    scores = random_scores(graph)
    circuit = Circuit.from_edges(graph, ["input->a0.h1<v>", "a0.h1->a1.h0<k>", "a1.h0->logits"])
    circuit.to_json(tmp_path / "c.json", scores=scores)
    circuit.to_pt(tmp_path / "c.pt", scores=scores)
    payload = json.loads((tmp_path / "c.json").read_text())
    assert payload["cfg"] == {**CFG, "d_model": 0, "attn_only": True}
    assert len(payload["edges"]) == graph.n_edges  # no MLP edges written
    for g in (eap_from_json(tmp_path / "c.json"), eap_from_pt(tmp_path / "c.pt")):
        assert in_graph_names(g) == set(circuit.edges)
        for name in eap_edges(CFG):
            expected = scores.edge(name) if "m" not in name else 0.0
            assert edge_score(g, name) == expected
    assert Circuit.from_json(tmp_path / "c.json") == circuit
    assert Circuit.from_pt(tmp_path / "c.pt") == circuit
    assert torch.equal(Scores.from_pt(tmp_path / "c.pt").edges, scores.edges)
    assert torch.equal(Scores.from_json(tmp_path / "c.json").edges, scores.edges)


# ---- EAP-IG -> circuitdyn ---------------------------------------------------------------------
IN_GRAPH = {"input->a0.h0<q>", "a0.h0->a1.h1<v>", "a1.h1->m1", "m1->logits", "a0.h0->logits"}


def eap_written_values() -> dict[str, float]:
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(N_EDGES, generator=generator).tolist()
    return dict(zip(eap_edges(CFG), values, strict=True))


def eap_json_payload() -> dict[str, Any]:
    """What EAP-IG's Graph.to_json writes: cfg, nodes (in_graph, score), edges (score, in_graph)."""
    values = eap_written_values()
    nodes_in = {"input", "a0.h0", "a1.h1", "m1", "logits"}
    return {
        "cfg": dict(CFG),
        "nodes": {n: {"in_graph": n in nodes_in, "score": 0.5} for n in NODES},
        "edges": {n: {"score": v, "in_graph": n in IN_GRAPH} for n, v in values.items()},
    }


def eap_pt_payload() -> dict[str, Any]:
    """What EAP-IG's Graph.to_pt saves."""
    values = eap_written_values()
    scores = torch.zeros(len(SRC), len(DST))
    in_graph = torch.zeros(len(SRC), len(DST), dtype=torch.bool)
    for name, value in values.items():
        src, _, dst = name.partition("->")
        i, j = SRC.index(src), DST.index(dst)
        scores[i, j] = value
        in_graph[i, j] = name in IN_GRAPH
    nodes_in = torch.tensor([n in {"input", "a0.h0", "a1.h1", "m1"} for n in SRC])
    return {
        "cfg": dict(CFG),
        "src_nodes": list(SRC),
        "dst_nodes": list(DST),
        "edges_scores": scores,
        "edges_in_graph": in_graph,
        "nodes_in_graph": nodes_in,
        "nodes_scores": torch.full((len(SRC),), torch.nan),
    }


def test_eap_json_to_scores_and_circuit(tmp_path):
    path = tmp_path / "eap.json"
    path.write_text(json.dumps(eap_json_payload()))
    scores = Scores.from_json(path)
    assert scores.graph == Graph(2, 2)
    values = eap_written_values()
    for name, value in values.items():
        assert scores.edge(name) == pytest.approx(value, rel=1e-7)
    assert scores.meta == {"d_model": 8} and scores.d_model == 8
    circuit = Circuit.from_json(path)
    assert set(circuit.edges) == IN_GRAPH
    assert Circuit.from_dict(eap_json_payload()) == circuit
    assert Circuit.from_json(path, graph=Graph(2, 2)) == circuit


def test_eap_pt_to_scores_and_circuit(tmp_path):
    path = tmp_path / "eap.pt"
    torch.save(eap_pt_payload(), path)
    scores = Scores.from_pt(path)
    for name, value in eap_written_values().items():
        assert scores.edge(name) == pytest.approx(value, rel=1e-7)
    assert scores.meta == {"d_model": 8}
    assert set(Circuit.from_pt(path).edges) == IN_GRAPH
    assert interop.read(path).in_graph.sum() == len(IN_GRAPH)


# ---- within circuitdyn ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["json", "pt"])
@pytest.mark.parametrize("has_mlp", [True, False])
def test_round_trip(tmp_path, suffix, has_mlp):
    graph = Graph(3, 2, has_mlp=has_mlp)
    scores = random_scores(graph, seed=3, method="eap", n_examples=4, d_model=12)
    circuit = Circuit.top_edges(scores, 9)
    path = tmp_path / f"c.{suffix}"
    getattr(circuit, f"to_{suffix}")(path, scores=scores)
    again = getattr(Scores, f"from_{suffix}")(path)
    assert again.graph == graph and torch.equal(again.edges, scores.edges)
    assert again.meta == scores.meta
    assert getattr(Circuit, f"from_{suffix}")(path) == circuit
    getattr(again, f"to_{suffix}")(tmp_path / f"s.{suffix}")
    reread = getattr(Scores, f"from_{suffix}")(tmp_path / f"s.{suffix}")
    assert torch.equal(reread.edges, scores.edges)
    assert getattr(Circuit, f"from_{suffix}")(tmp_path / f"s.{suffix}") == Circuit.full(graph)
    data = interop.read(path, graph=graph)
    assert data.d_model == 12 and torch.equal(data.in_graph, circuit.mask)


def test_older_circuitdyn_files_still_load(tmp_path):
    graph = Graph(2, 2)
    scores = random_scores(graph)
    old_scores = {  # Scores.to_json before EAP-IG's node entries and d_model
        "cfg": {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "attn_only": False},
        "nodes": {name: True for name in graph.node_names},
        "node_scores": dict(zip(graph.node_names, scores.nodes.tolist(), strict=True)),
        "edges": {
            n: {"score": s, "in_graph": True}
            for n, s in zip(graph.edge_names, scores.flat().tolist(), strict=True)
        },
        "meta": {"method": "eap"},
    }
    (tmp_path / "old.json").write_text(json.dumps(old_scores))
    loaded = Scores.from_json(tmp_path / "old.json")
    assert torch.equal(loaded.edges, scores.edges) and loaded.meta == {"method": "eap"}
    old_circuit = {  # Circuit.to_json, version 1
        "format": "circuitdyn.circuit",
        "version": 1,
        "cfg": {"n_layers": 2, "n_heads": 2, "has_mlp": True},
        "edges": CIRCUIT_EDGES,
        "nodes": [],
    }
    (tmp_path / "old_c.json").write_text(json.dumps(old_circuit))
    assert Circuit.from_json(tmp_path / "old_c.json") == Circuit.from_edges(graph, CIRCUIT_EDGES)


# ---- bad input --------------------------------------------------------------------------------
def write_json(tmp_path: Path, payload: Any) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    return path


def write_pt(tmp_path: Path, payload: Any) -> Path:
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    return path


def test_json_of_another_graph_size(tmp_path):
    payload = eap_json_payload()
    payload["cfg"]["n_layers"] = 1  # the edges are of a 2-layer graph
    with pytest.raises(ValueError, match="another graph size") as error:
        Scores.from_json(write_json(tmp_path, payload))
    assert "bad.json" in str(error.value)
    payload = eap_json_payload()
    payload["cfg"]["n_heads"] = 3  # the edges of head 2 are missing
    with pytest.raises(ValueError, match=r"edges of .* are missing"):
        Circuit.from_json(write_json(tmp_path, payload))
    payload = eap_json_payload()
    with pytest.raises(ValueError, match="was expected"):
        Scores.from_json(write_json(tmp_path, payload), graph=Graph(3, 2))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.pop("cfg"), "missing field 'cfg'"),
        (lambda p: p.pop("edges"), "missing field 'edges'"),
        (lambda p: p["cfg"].pop("n_heads"), "'cfg' has no 'n_heads'"),
        (lambda p: p["edges"]["m1->logits"].pop("score"), r"edges\['m1->logits'\] has no 'score'"),
        (lambda p: p["edges"]["m1->logits"].pop("in_graph"), "has no 'in_graph'"),
        (lambda p: p["edges"]["m1->logits"].update(in_graph=1), "must be true or false"),
        (lambda p: p["edges"]["m1->logits"].update(score="x"), "must be a number"),
        (lambda p: p["nodes"]["m0"].pop("in_graph"), r"nodes\['m0'\] has no 'in_graph'"),
        (lambda p: p["nodes"]["m0"].update(neurons=[True, False]), "neuron-level"),
        (lambda p: p["cfg"].update(parallel_attn_mlp=True), "parallel attention"),
        (lambda p: p["cfg"].update(attn_only=True), "attention-only"),
        (lambda p: p["nodes"].update({"a5.h0": {"in_graph": False}}), "not a node"),
    ],
)
def test_json_missing_or_malformed_fields(tmp_path, damage, message):
    payload = eap_json_payload()
    damage(payload)
    path = write_json(tmp_path, payload)
    for reader in (Scores.from_json, Circuit.from_json):
        with pytest.raises(ValueError, match=message):
            reader(path)


def test_not_json_and_not_a_graph_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        Scores.from_json(tmp_path / "x.json")
    with pytest.raises(ValueError, match="not a circuitdyn"):
        Scores.from_json(write_json(tmp_path, {}))
    with pytest.raises(ValueError, match="expected a JSON object"):
        Circuit.from_json(write_json(tmp_path, [1, 2]))


class Arbitrary:  # a pickled object torch.load(weights_only=True) must refuse
    pass


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.pop("edges_in_graph"), r"missing field\(s\) \['edges_in_graph'\]"),
        (lambda p: p.pop("cfg"), r"missing field\(s\) \['cfg'\]"),
        (lambda p: p.update(src_nodes=SRC[:-1]), "'src_nodes' is not the 7 names"),
        (lambda p: p.update(dst_nodes=DST[::-1]), "'dst_nodes' is not the 15 names"),
        (lambda p: p.update(edges_scores=torch.zeros(7, 14)), r"shape \(7, 14\)"),
        (lambda p: p.update(nodes_in_graph=torch.zeros(6, dtype=torch.bool)), r"shape \(6,\)"),
        (lambda p: p.update(edges_in_graph=p["edges_in_graph"].float()), "must be a bool"),
        (lambda p: p.update(edges_scores=[0.0]), "must be a tensor"),
        (lambda p: p.update(neurons_in_graph=torch.zeros(7, 8, dtype=torch.bool)), "neuron-level"),
        (lambda p: p["cfg"].update(d_model=-1), "d_model"),
    ],
)
def test_pt_missing_or_malformed_fields(tmp_path, damage, message):
    payload = eap_pt_payload()
    damage(payload)
    path = write_pt(tmp_path, payload)
    for reader in (Scores.from_pt, Circuit.from_pt):
        with pytest.raises(ValueError, match=message):
            reader(path)


def test_pt_of_another_graph_size_and_non_edges(tmp_path):
    payload = eap_pt_payload()
    payload["cfg"]["n_layers"] = 3
    with pytest.raises(ValueError, match="another graph size"):
        Scores.from_pt(write_pt(tmp_path, payload))
    with pytest.raises(ValueError, match="was expected"):
        Circuit.from_pt(write_pt(tmp_path, eap_pt_payload()), graph=Graph(2, 3))
    payload = eap_pt_payload()
    payload["edges_in_graph"][SRC.index("m1"), DST.index("a1.h0<q>")] = True
    with pytest.raises(ValueError, match=r"\(m1, a1.h0<q>\), which is not an edge"):
        Circuit.from_pt(write_pt(tmp_path, payload))


def test_pt_with_pickled_objects_or_not_torch(tmp_path):
    payload = {**eap_pt_payload(), "extra": Arbitrary()}
    with pytest.raises(ValueError, match=r"pickled .*Arbitrary") as error:
        Scores.from_pt(write_pt(tmp_path, payload))
    assert "weights_only=True" in str(error.value)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read it"):
        Circuit.from_pt(tmp_path / "text.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        Circuit.from_pt(write_pt(tmp_path, [torch.zeros(3)]))
    with pytest.raises(FileNotFoundError):
        Scores.from_pt(tmp_path / "missing.pt")


def test_writing_checks_its_inputs(tmp_path):
    graph = Graph(2, 2)
    circuit = Circuit.full(graph)
    with pytest.raises(ValueError, match="scores are over"):
        circuit.to_json(tmp_path / "c.json", scores=random_scores(Graph(2, 3)))
    with pytest.raises(TypeError):  # the test run's type checker or the method itself
        circuit.to_json(tmp_path / "c.json", scores=torch.zeros(7, 15))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        circuit.to_json(tmp_path / "c.json", d_model=8.0)  # type: ignore[arg-type]
