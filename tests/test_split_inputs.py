"""circuitdyn's fused EAP and edge patching against references built on TransformerLens's own
split-input modes (tests/tl_reference.py): per-head q/k/v inputs (``hook_q_input`` etc.),
per-head results and MLP inputs, as EAP-IG and MIB compute them. float64 tiny models, so the
tolerances are tight: any difference is a convention or arithmetic error, not rounding."""

from __future__ import annotations

import pytest
import tl_reference as ref
import torch

from circuitdyn.activations import mean_activations
from circuitdyn.attribution import attribute
from circuitdyn.circuit import Circuit
from circuitdyn.evaluate import run_with_circuit
from circuitdyn.graph import Graph
from circuitdyn.patching import run_patched
from circuitdyn.tasks.base import logit_diff

ARCHITECTURES = {
    "layernorm": {},
    "rmsnorm-rotary-3-layers": {"normalization": "RMS", "positions": "rotary", "n_layers": 3},
    "lnpre-attn-only": {"normalization": "LNPre", "attn_only": True},
}


def reference_ablated(model, batch, ablation: str, reference_batch=None) -> dict:
    """What each source carries when ablated, computed by the reference alone."""
    if ablation == "corrupted":
        return ref.source_activations(model, batch.corrupted)
    if ablation == "zero":
        return {
            name: torch.zeros(model.cfg.d_model, dtype=model.cfg.dtype)
            for name in ref.sources(model)
        }
    assert ablation == "mean"
    return ref.mean_source_activations(model, reference_batch.clean, reference_batch.attention_mask)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


# ---- the reference itself ----------------------------------------------------------------------
def test_reference_decomposes_the_residual_stream_and_patches_the_extremes(
    make_tiny_model, make_tiny_batch
):
    """The reference's building blocks hold on their own: the sources (+ b_O) sum to the final
    residual stream; keeping every edge gives the clean run and ablating every edge (corrupted)
    the corrupted run; its edges are the graph's edges."""
    model = make_tiny_model(n_layers=3)
    batch = make_tiny_batch(pad_first=0)
    _, cache = model.run_with_cache(batch.clean)
    acts = ref.source_activations(model, batch.clean)
    residual = sum(acts.values()) + sum(block.attn.b_O for block in model.blocks)
    assert_close(residual, cache["blocks.2.hook_resid_post"])
    corrupted = ref.source_activations(model, batch.corrupted)
    everything = set(ref.edge_names(model))
    assert_close(ref.circuit_logits(model, batch.clean, corrupted, everything), model(batch.clean))
    assert_close(ref.circuit_logits(model, batch.clean, corrupted, set()), model(batch.corrupted))
    assert set(ref.edge_names(model)) == set(Graph.from_model(model).edge_names)


# ---- EAP: fused vs split hooks -------------------------------------------------------------------
# Every ablation on the LayerNorm model, corrupted ablation on the other architectures.
CASES = [("layernorm", a) for a in ("corrupted", "mean", "zero")] + [
    (arch, "corrupted") for arch in ARCHITECTURES if arch != "layernorm"
]


@pytest.mark.parametrize(("arch", "ablation"), CASES)
def test_fused_eap_equals_split_hook_eap_on_every_edge(
    make_tiny_model, make_tiny_batch, arch, ablation
):
    model = make_tiny_model(**ARCHITECTURES[arch])
    graph = Graph.from_model(model)
    batch = make_tiny_batch(4, seed=2)  # the first example padded
    reference_batch = make_tiny_batch(5, seed=9)
    scores = attribute(
        model,
        graph,
        [batch],
        logit_diff,
        method="eap",
        ablation=ablation,
        reference=[reference_batch],
    )
    expected = ref.split_hook_eap(
        model, batch, logit_diff, reference_ablated(model, batch, ablation, reference_batch)
    )
    assert set(expected) == set(graph.edge_names)
    names = list(graph.edge_names)
    want = torch.tensor([expected[name] for name in names], dtype=torch.float64)
    got = torch.tensor([scores.edge(name) for name in names], dtype=torch.float64)
    # Scores are stored in float32: agreement to float32 rounding, on every edge.
    scale = float(want.abs().max())
    assert scale > 1e-4
    torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-9 * scale)
    kinds = {"<q>": 0, "<k>": 0, "<v>": 0, "->m": 0, "->logits": 0}
    for name, value in zip(names, want.tolist(), strict=True):
        for kind in kinds:
            kinds[kind] += kind in name and abs(value) > 1e-6 * scale
    # Every kind of destination carries non-trivial scores (so each path was compared).
    assert all(kinds[k] for k in ("<q>", "<k>", "<v>", "->logits")), kinds
    assert kinds["->m"] or model.cfg.attn_only


# ---- edge patching: partial q / k / v inputs --------------------------------------------------
def partial_circuit(graph: Graph, head: str, channel: str, removed_sources: list[str]) -> Circuit:
    """Every edge except some (not all) of those into one head's `channel` input."""
    removed = [f"{src}->{head}<{channel}>" for src in removed_sources]
    return Circuit.full(graph) - Circuit.from_edges(graph, removed)


@pytest.mark.parametrize(
    ("channel", "ablation"), [("q", "corrupted"), ("k", "zero"), ("v", "corrupted")]
)
def test_partial_qkv_patching_matches_split_qkv_inputs(
    make_tiny_model, make_tiny_batch, channel, ablation
):
    model = make_tiny_model(n_layers=3)
    graph = Graph.from_model(model)
    batch = make_tiny_batch(4, seed=3)
    ablated = reference_ablated(model, batch, ablation)
    # a2.h1 reads 11 sources; remove 4 of them from one of its inputs, from different layers.
    circuit = partial_circuit(graph, "a2.h1", channel, ["input", "a0.h2", "m0", "a1.h3"])
    assert 0 < sum(f"a2.h1<{channel}>" in e for e in circuit.edges) < graph.n_upstream_attn(2)
    logits = run_with_circuit(model, graph, circuit, batch, ablation)
    expected = ref.circuit_logits(model, batch.clean, ablated, circuit.edges, batch.attention_mask)
    assert_close(logits, expected)
    # The removed edges matter: the run is neither the clean nor a fully ablated head input.
    clean = model(batch.clean)
    assert (logits - clean).abs().max() > 1e-5
    whole_input = Circuit.full(graph) - Circuit.from_edges(
        graph, [f"{s}->a2.h1<{channel}>" for s in ref.upstream(model, "a2.h1")]
    )
    all_removed = ref.circuit_logits(
        model, batch.clean, ablated, whole_input.edges, batch.attention_mask
    )
    assert (logits - all_removed).abs().max() > 1e-5


def test_partial_inputs_of_several_heads_and_layers_at_once(make_tiny_model, make_tiny_batch):
    """Partial q of one head, k of another and v of a third in the same layer, plus partial
    inputs in layer 1, whose changed outputs then feed layer 2."""
    model = make_tiny_model(n_layers=3)
    graph = Graph.from_model(model)
    batch = make_tiny_batch(3, seed=4)
    removed = [
        "input->a2.h0<q>",
        "a1.h1->a2.h0<q>",
        "m1->a2.h2<k>",
        "a0.h0->a2.h2<k>",
        "a0.h3->a2.h2<k>",
        "a1.h2->a2.h3<v>",
        "input->a1.h1<k>",
        "a0.h1->a1.h1<v>",
        "m0->a1.h0<q>",
    ]
    circuit = Circuit.full(graph) - Circuit.from_edges(graph, removed)
    logits = run_with_circuit(model, graph, circuit, batch, "corrupted")
    ablated = ref.source_activations(model, batch.corrupted)
    expected = ref.circuit_logits(model, batch.clean, ablated, circuit.edges, batch.attention_mask)
    assert_close(logits, expected)


@pytest.mark.parametrize(("arch", "ablation"), CASES)
def test_random_circuits_match_the_reference(make_tiny_model, make_tiny_batch, arch, ablation):
    model = make_tiny_model(**ARCHITECTURES[arch])
    graph = Graph.from_model(model)
    batch = make_tiny_batch(4, seed=5)
    reference_batch = make_tiny_batch(5, seed=9)
    ablated = reference_ablated(model, batch, ablation, reference_batch)
    means = None
    if ablation == "mean":
        means = mean_activations(model, graph, [reference_batch])
        expected_means = torch.stack([ablated[name] for name in graph.src_names])[:, None]
        assert_close(means, expected_means)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        keep = torch.rand(graph.n_edges, generator=generator) < 0.5
        edges = [e for e, k in zip(graph.edge_names, keep.tolist(), strict=True) if k]
        circuit = Circuit.from_edges(graph, edges)
        logits = run_with_circuit(model, graph, circuit, batch, ablation, means)
        expected = ref.circuit_logits(model, batch.clean, ablated, edges, batch.attention_mask)
        assert_close(logits, expected)


def test_fractional_edge_weights_match_the_reference(make_tiny_model, make_tiny_batch):
    """run_patched with weights in [0, 1]: each edge carries actual + w * (ablated - actual)."""
    model = make_tiny_model()
    graph = Graph.from_model(model)
    batch = make_tiny_batch(3, seed=6)
    ablated = ref.source_activations(model, batch.corrupted)
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(graph.n_src, graph.n_dst, generator=generator, dtype=torch.float64)
    weights = weights * graph.edge_valid
    by_name = {name: float(weights[graph.edge_index(name)]) for name in graph.edge_names}
    stacked = torch.stack([ablated[name] for name in graph.src_names])
    logits = run_patched(model, graph, batch.clean, stacked, weights, batch.attention_mask)
    expected = ref.patched_logits(model, batch.clean, ablated, by_name, batch.attention_mask)
    assert_close(logits, expected)
