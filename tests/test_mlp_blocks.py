"""MLP neuron-block nodes: each MLP split into B nodes of d_mlp / B contiguous neurons."""

import pytest
import torch

from circuitdyn.activations import ablated_sources, mean_activations, run_sources
from circuitdyn.attribution import attribute
from circuitdyn.circuit import Circuit
from circuitdyn.cli import main
from circuitdyn.config import TuningConfig
from circuitdyn.graph import Graph, UnsupportedModelError, parse_node
from circuitdyn.models import load_model
from circuitdyn.ownership import count_tunable, parameter_masks
from circuitdyn.patching import run_patched
from circuitdyn.selection import select
from circuitdyn.store import RunStore
from circuitdyn.tasks import load_task
from circuitdyn.tasks.base import logit_diff
from circuitdyn.tuning import tune


def test_names_layout_and_one_block_is_todays_graph():
    graph = Graph(2, 2, mlp_blocks=4)
    assert graph.src_names == (
        "input", "a0.h0", "a0.h1", "m0.b00", "m0.b01", "m0.b02", "m0.b03",
        "a1.h0", "a1.h1", "m1.b00", "m1.b01", "m1.b02", "m1.b03",
    )  # fmt: skip
    assert graph.dst_names[6:10] == ("m0.b00", "m0.b01", "m0.b02", "m0.b03")
    assert parse_node("m1.b03<q>") == parse_node("m1.b03")
    assert (parse_node("m1.b03").layer, parse_node("m1.b03").block) == (1, 3)
    assert Graph.from_names(graph.src_names, graph.dst_names) == graph
    # Blocks of one MLP read the same upstream sources and do not feed each other.
    i, j = graph.src_index("m0.b01"), graph.dst_index("m0.b02")
    assert not graph.edge_valid[i, j] and graph.edge_valid[graph.src_index("a0.h1"), j]
    one = Graph(2, 2, mlp_blocks=1)
    assert one == Graph(2, 2) and "m0" in one.src_names
    # Edges, counted per destination (H = 2 heads, B blocks): layer 0's 6 q/k/v inputs read
    # input; its B blocks read input and 2 heads; layer 1's q/k/v read 3 + B sources, its blocks
    # 5 + B; logits reads all 5 + 2B sources: 29 + 16 B + B^2 edges.
    for blocks, g in ((4, graph), (1, one)):
        assert g.n_edges == 29 + 16 * blocks + blocks**2


def test_block_outputs_sum_to_the_mlp_output(model, batch):
    blocked, whole = Graph.from_model(model, 4), Graph.from_model(model)
    parts = run_sources(model, blocked, batch.clean)
    full = run_sources(model, whole, batch.clean)
    for layer in range(2):
        summed = parts[blocked.mlp_src(layer)].sum(0) + model.blocks[layer].mlp.b_out
        torch.testing.assert_close(summed, full[whole.mlp_src(layer)][0])
        heads = parts[blocked.head_src(layer)]
        torch.testing.assert_close(heads, full[whole.head_src(layer)])


@pytest.mark.parametrize("ablation", ["corrupted", "mean"])
def test_eap_matches_finite_differences_of_edge_patching(
    make_tiny_model, make_tiny_batch, batch, ablation
):
    model = make_tiny_model(n_layers=3)
    graph = Graph.from_model(model, mlp_blocks=4)
    reference = [make_tiny_batch(seed=7)]
    scores = attribute(model, graph, [batch], method="eap", ablation=ablation, reference=reference)
    means = mean_activations(model, graph, reference) if ablation == "mean" else None
    ablated = ablated_sources(model, graph, batch, ablation, means)
    # every edge into or out of a block, plus a sample of the others
    picks = [e for e in graph.edge_names if ".b0" in e]
    picks = picks[:: max(1, len(picks) // 16)] + list(graph.edge_names[::97])
    eps = 1e-5
    for edge in picks:
        values = []
        for sign in (1, -1):
            weights = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.float64)
            weights[graph.edge_index(edge)] = sign * eps
            logits = run_patched(model, graph, batch.clean, ablated, weights)
            values.append(float(logit_diff(logits, batch).mean()))
        fd = (values[0] - values[1]) / (2 * eps)
        assert fd == pytest.approx(scores.edge(edge), rel=1e-4, abs=1e-9), edge


def test_patching_every_edge_reproduces_the_corrupted_run(model, batch):
    graph = Graph.from_model(model, mlp_blocks=8)
    ablated = ablated_sources(model, graph, batch, "corrupted")
    everything = graph.edge_valid.double()
    logits = run_patched(model, graph, batch.clean, ablated, everything)
    torch.testing.assert_close(logits, model(batch.corrupted))
    nothing = torch.zeros_like(everything)
    clean = run_patched(model, graph, batch.clean, ablated, nothing)
    torch.testing.assert_close(clean, model(batch.clean))


def test_one_block_graph_scores_like_the_whole_mlp_graph(model, batch):
    one = attribute(model, Graph.from_model(model, 1), [batch])
    whole = attribute(model, Graph.from_model(model), [batch])
    torch.testing.assert_close(one.edges, whole.edges)


def test_blocks_own_their_neurons(model):
    graph = Graph.from_model(model, mlp_blocks=4)  # d_mlp 64: 16 neurons per block
    circuit = Circuit.from_edges(graph, ["input->m1.b02", "m1.b02->logits"])
    masks = parameter_masks(model, circuit)
    cols = torch.zeros(64, dtype=torch.bool)
    cols[32:48] = True
    assert torch.equal(masks["blocks.1.mlp.W_in"], cols[None, :].expand(32, 64))
    assert torch.equal(masks["blocks.1.mlp.b_in"], cols)
    assert torch.equal(masks["blocks.1.mlp.W_out"], cols[:, None].expand(64, 32))
    assert bool(masks["blocks.1.mlp.b_out"].all())  # goes with any block of its MLP
    assert not bool(masks["blocks.0.mlp.W_in"].any())
    assert count_tunable(model, circuit) == 32 * 16 + 16 + 16 * 32 + 32
    # B = 1: the whole MLP, as before
    whole = Circuit.from_edges(Graph.from_model(model), ["input->m1", "m1->logits"])
    assert count_tunable(model, whole) == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("blocks.1.mlp.")
    )


def test_a_40_edge_circuit_tunes_a_minority_of_the_embedded_model():
    model = load_model("default")
    task = load_task("disagreement", model, n_train=32, n_dev=16, n_test=16)
    batches = list(task.batches("train", 16))[:1]
    n_params = sum(p.numel() for p in model.parameters())
    fractions = {}
    for blocks in (1, 16):
        graph = Graph.from_model(model, blocks)
        circuit = select(attribute(model, graph, batches, task.metric), 40).circuit
        fractions[blocks] = count_tunable(model, circuit) / n_params
    assert fractions[16] < 0.5 < fractions[1]  # measured: 0.32 and 0.68


def test_tuning_with_blocks_records_block_circuits(tmp_path):
    config = TuningConfig(
        task_options={"n_train": 32, "n_dev": 16, "n_test": 16},
        top_n=20,
        steps=2,
        batch_size=8,
        eval_every=2,
        n_eval=8,
        mlp_blocks=8,
    )
    tune(config, tmp_path / "run", progress=False)
    store = RunStore.open(tmp_path / "run")
    assert store.graph.mlp_blocks == 8 and store.config.mlp_blocks == 8
    assert any(".b" in node for node in store.node_names)


def test_bad_block_counts_are_clear_errors(model, tmp_path, capsys):
    with pytest.raises(UnsupportedModelError, match="does not divide d_mlp=64"):
        Graph.from_model(model, mlp_blocks=7)
    with pytest.raises(ValueError, match="mlp_blocks must be >= 1"):
        TuningConfig(mlp_blocks=0)
    code = main(["attribute", "--mlp-blocks", "7", "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not divide d_mlp=256" in err
