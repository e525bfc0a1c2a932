import json

import pytest
import tl_reference as ref
import torch

from circuitdyn.activations import ablated_sources, mean_activations
from circuitdyn.attribution import attribute, eap_with_loss
from circuitdyn.graph import Graph
from circuitdyn.patching import run_patched
from circuitdyn.scores import Scores
from circuitdyn.tasks.base import Batch, lm_loss, logit_diff


def _rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _rank(a), _rank(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def patched_metric(model, graph, batch, ablated, edge, weight, mask=None) -> float:
    weights = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.float64)
    weights[graph.edge_index(edge)] = weight
    logits = run_patched(model, graph, batch.clean, ablated, weights, mask)
    return float(logit_diff(logits, batch).mean())


ARCHITECTURES = {
    "layernorm": {},
    "rmsnorm-rotary": {"normalization": "RMS", "positions": "rotary"},
    "lnpre-attn-only": {"normalization": "LNPre", "attn_only": True},
    "three-layers": {"n_layers": 3},
    "gqa-ungrouped": {"n_key_value_heads": 2, "ungroup_grouped_query_attention": True},
    "alibi-rmspre": {"normalization": "RMSPre", "positions": "alibi"},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_eap_matches_finite_differences_of_edge_patching(
    make_tiny_model, make_tiny_batch, batch, arch, ablation
):
    """Patching one edge's source by eps * (ablated - clean) moves the metric by eps * score."""
    model = make_tiny_model(**ARCHITECTURES[arch])
    graph = Graph.from_model(model)
    reference = [make_tiny_batch(seed=7)]
    scores = attribute(model, graph, [batch], method="eap", ablation=ablation, reference=reference)
    means = mean_activations(model, graph, reference) if ablation == "mean" else None
    ablated = ablated_sources(model, graph, batch, ablation, means)
    generator = torch.Generator().manual_seed(1)
    picks = torch.randperm(graph.n_edges, generator=generator)[:12].tolist()
    picks.append(graph.n_edges - 1)  # an edge into logits
    eps = 1e-5
    for index in picks:
        edge = graph.edge_names[index]
        fd = (
            patched_metric(model, graph, batch, ablated, edge, eps)
            - patched_metric(model, graph, batch, ablated, edge, -eps)
        ) / (2 * eps)
        assert fd == pytest.approx(scores.edge(edge), rel=1e-4, abs=1e-9), edge


def test_exact_vs_eap_and_integrated_gradients(model, make_tiny_batch):
    graph = Graph.from_model(model)
    data = [make_tiny_batch(4, seed=3)]
    exact = attribute(model, graph, data, method="exact")
    eap = attribute(model, graph, data, method="eap")
    ig = attribute(model, graph, data, method="eap-ig", steps=20)
    rho_eap = spearman(eap.flat(), exact.flat())
    rho_ig = spearman(ig.flat(), exact.flat())
    print(f"Spearman vs exact: eap {rho_eap:.3f}, eap-ig {rho_ig:.3f}")
    assert rho_eap > 0.8
    # The model is far from linear, so integrated gradients track exact patching better.
    err_eap = (eap.flat() - exact.flat()).abs().sum()
    err_ig = (ig.flat() - exact.flat()).abs().sum()
    assert err_ig < 0.5 * err_eap
    assert rho_ig > rho_eap


def test_sum_rule_logits_edges_give_first_order_metric_change(model, batch):
    graph = Graph.from_model(model)
    scores = attribute(model, graph, [batch], method="eap")
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, corrupted = model.run_with_cache(batch.corrupted, names_filter=last)
    final = {}

    def keep(act, hook):
        act.retain_grad()
        final["x"] = act

    with model.hooks(fwd_hooks=[(last, keep)]):
        logit_diff(model(batch.clean), batch).sum().backward()
    x = final["x"]
    mask = batch.attention_mask[..., None]
    first_order = ((corrupted[last] - x.detach()) * x.grad * mask).sum() / batch.size
    # Scores are stored in float32: equal to its rounding.
    assert float(scores.edges[:, graph.logits_dst].double().sum()) == pytest.approx(
        float(first_order), rel=1e-6
    )
    # The head inputs' scores are not redundant copies of the logits' ones.
    assert scores.edges[:, graph.qkv_dst(1)].abs().sum() > 0


def test_exact_equals_the_metric_change_of_an_independent_patched_run(model, make_tiny_batch):
    """Exact scores against TransformerLens's split-input mode (tests/tl_reference.py): the
    run with only this edge ablated, rebuilt source by source at the destination's own input."""
    graph = Graph.from_model(model)
    batch = make_tiny_batch(2)
    exact = attribute(model, graph, [batch], method="exact")
    corrupted = ref.source_activations(model, batch.corrupted)
    with torch.no_grad():
        clean = float(logit_diff(model(batch.clean), batch).mean())
    edges = [
        "input->a0.h2<k>",
        "input->a0.h1<q>",
        "a0.h1->a1.h3<v>",
        "m0->a1.h2<k>",
        "input->m0",
        "a0.h1->m1",
        "a1.h2->logits",
        "m1->logits",
    ]
    for edge in edges:
        logits = ref.patched_logits(
            model, batch.clean, corrupted, {edge: 1.0}, batch.attention_mask
        )
        expected = float(logit_diff(logits, batch).mean()) - clean
        assert abs(expected) > 1e-6, edge  # the edge matters on this batch
        assert exact.edge(edge) == pytest.approx(expected, rel=1e-6, abs=1e-9), edge


@pytest.mark.parametrize("method", ["eap", "eap-ig", "exact"])
def test_two_batches_equal_one_batch(make_tiny_model, make_tiny_batch, method):
    model = make_tiny_model(n_layers=1)
    graph = Graph.from_model(model)
    whole = make_tiny_batch(4, seed=5)
    halves = [whole.select(slice(0, 1)), whole.select(slice(1, 4))]
    one = attribute(model, graph, [whole], method=method, steps=3)
    two = attribute(model, graph, halves, method=method, steps=3)
    assert torch.allclose(one.edges, two.edges, atol=1e-7)
    assert one.meta["n_examples"] == two.meta["n_examples"] == 4


def test_padding_never_contributes(model, make_tiny_batch):
    graph = Graph.from_model(model)
    batch = make_tiny_batch(3, pad_first=3)
    noisy_pad = batch.clean.clone()
    noisy_pad[0, -3:] = (noisy_pad[0, -3:] + 5) % 20
    noisy_corr = batch.corrupted.clone()
    noisy_corr[0, -3:] = (noisy_corr[0, -3:] + 7) % 20
    other = Batch(**{**batch.__dict__, "clean": noisy_pad, "corrupted": noisy_corr})
    a = attribute(model, graph, [batch])
    b = attribute(model, graph, [other])
    assert torch.allclose(a.edges, b.edges, atol=1e-12)
    # The padded example scored alone, unpadded, gives the same contribution.
    alone = batch.select(slice(0, 1))
    trimmed = Batch(
        clean=alone.clean[:, :5],
        corrupted=alone.corrupted[:, :5],
        attention_mask=alone.attention_mask[:, :5],
        read_pos=alone.read_pos,
        target=alone.target,
        foil=alone.foil,
    )
    rest = attribute(model, graph, [batch.select(slice(1, 3))])
    first = attribute(model, graph, [trimmed])
    assert torch.allclose(a.edges, (first.edges + 2 * rest.edges) / 3, atol=1e-10)


def test_position_restriction_matches_restricted_patching(model, batch):
    graph = Graph.from_model(model)

    def early(b: Batch) -> torch.Tensor:
        return torch.arange(b.clean.shape[1])[None].expand_as(b.clean) <= 3

    scores = attribute(model, graph, [batch], positions=early)
    ablated = ablated_sources(model, graph, batch, "corrupted")
    mask = early(batch) & batch.attention_mask
    eps = 1e-5
    for edge in ["input->a1.h0<v>", "a0.h3->logits", "m0->a1.h2<q>"]:
        fd = (
            patched_metric(model, graph, batch, ablated, edge, eps, mask)
            - patched_metric(model, graph, batch, ablated, edge, -eps, mask)
        ) / (2 * eps)
        assert fd == pytest.approx(scores.edge(edge), rel=1e-4, abs=1e-10)
    unrestricted = attribute(model, graph, [batch])
    assert not torch.allclose(scores.edges, unrestricted.edges)


def test_deterministic_on_cpu_and_float32_close_to_float64(model, batch):
    graph = Graph.from_model(model)
    a = attribute(model, graph, [batch], method="eap-ig", steps=4)
    b = attribute(model, graph, [batch], method="eap-ig", steps=4)
    assert torch.equal(a.edges, b.edges)
    single = attribute(model.to(torch.float32), graph, [batch], method="eap-ig", steps=4)
    assert single.edges.dtype == torch.float32
    assert torch.allclose(single.edges, a.edges.float(), atol=1e-5, rtol=1e-3)


def test_scores_json_and_safetensors_round_trip(model, batch, tmp_path):
    graph = Graph.from_model(model)
    scores = attribute(model, graph, [batch], method="eap")
    scores.to_json(tmp_path / "s.json")
    payload = json.loads((tmp_path / "s.json").read_text())
    assert set(payload) >= {"cfg", "nodes", "edges"}
    assert payload["edges"]["m1->logits"]["score"] == pytest.approx(scores.edge("m1->logits"))
    again = Scores.from_json(tmp_path / "s.json")
    assert torch.allclose(again.edges, scores.edges)
    assert again.meta["method"] == "eap"
    scores.save(tmp_path / "s.safetensors")
    assert torch.equal(Scores.load(tmp_path / "s.safetensors").edges, scores.edges)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a circuitdyn"):
        Scores.from_json(tmp_path / "bad.json")


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_clear_errors_and_hooks_removed_on_error(model, batch, no_typecheck):
    # circuitdyn's own errors, which runtime type checking would pre-empt.
    graph = Graph.from_model(model)

    def nan_metric(logits, b):
        out = logit_diff(logits, b)
        return out.where(torch.arange(b.size) != 1, float("nan"))

    with pytest.raises(ValueError, match=r"NaN/inf .*examples \[1\]"):
        attribute(model, graph, [batch], nan_metric)
    assert _no_hooks_left(model)
    with pytest.raises(ValueError, match="one value per example"):
        attribute(model, graph, [batch], lambda logits, b: logit_diff(logits, b).mean())
    assert _no_hooks_left(model)
    with pytest.raises(ValueError, match="no data"):
        attribute(model, graph, [])
    with pytest.raises(ValueError, match="needs reference"):
        attribute(model, graph, [batch], ablation="mean")
    no_corrupt = Batch(**{**batch.__dict__, "corrupted": None})
    with pytest.raises(ValueError, match="needs corrupted tokens"):
        attribute(model, graph, [no_corrupt])
    with pytest.raises(ValueError, match="same shape"):
        Batch(**{**batch.__dict__, "corrupted": batch.corrupted[:, :-1]})
    with pytest.raises(ValueError, match="right"):
        Batch(**{**batch.__dict__, "attention_mask": batch.attention_mask.flip(1)})
    too_big = Batch(**{**batch.__dict__, "clean": batch.clean + 100})
    with pytest.raises(ValueError, match="vocabulary"):
        attribute(model, graph, [too_big])
    with pytest.raises(ValueError, match=r"unknown|not a valid"):
        attribute(model, graph, [batch], method="magic")
    assert _no_hooks_left(model)


def test_shared_forward_gives_eap_scores_and_the_loss_gradient(model, batch):
    graph = Graph.from_model(model)
    ablated = ablated_sources(model, graph, batch, "corrupted")
    summed, logits, loss = eap_with_loss(model, graph, batch, logit_diff, lm_loss, ablated)
    loss.backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lm_loss(model(batch.clean), batch).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(shared_grads[name], param.grad, atol=1e-12), name
    # The scores: EAP computed independently with split q/k/v inputs (tests/tl_reference.py).
    expected = ref.split_hook_eap(
        model, batch, logit_diff, ref.source_activations(model, batch.corrupted)
    )
    for name in graph.edge_names:
        value = float(summed[graph.edge_index(name)]) / batch.size
        assert value == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
    assert torch.allclose(logits, model(batch.clean))


def test_half_precision_models_attribute_and_patch(make_tiny_model, batch):
    model = make_tiny_model(dtype=torch.bfloat16)
    graph = Graph.from_model(model)
    for method in ["eap", "exact"]:
        scores = attribute(model, graph, [batch], method=method)
        assert scores.edges.dtype == torch.float32 and torch.isfinite(scores.edges).all()
    ablated = ablated_sources(model, graph, batch, "corrupted")
    logits = run_patched(model, graph, batch.clean, ablated, graph.edge_valid.float())
    assert logits.dtype == torch.bfloat16
