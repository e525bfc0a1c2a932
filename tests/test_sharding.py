"""FSDP2 (`circuitdyn.sharding`) on CPU: two gloo processes spawned from the test compare a
block-sharded model with an unsharded copy - EAP scores and loss gradients, masked AdamW
steps (full weights equal, frozen entries bit-identical) and the gathered checkpoint.

The model has 3 heads on 2 ranks, so the head axis is split unevenly (rows 0-1 on rank 0, row
2 on rank 1) and per-head masks cross the shard boundary; MLP neuron blocks give column masks
on ``W_in`` (sharded on its rows) and row masks on ``W_out`` that are all-True on one rank and
all-False on the other.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from circuitdyn.optim import masked_step, restrict_gradients
from circuitdyn.sharding import (
    full_state_dict,
    gathered,
    is_sharded,
    load_full_state_dict,
    shard_blocks,
    shard_like,
)

WORLD = 2
TIMEOUT_S = 180
NODES = ["a0.h1", "a1.h2", "m0.b00"]  # head 1 on rank 0, head 2 on rank 1, half of MLP 0


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _worker(rank: int, init_file: str, results: dict) -> None:
    os.environ["CIRCUITDYN_TYPECHECK"] = "0"  # spawned workers run unchecked (see conftest)
    # The root returns logits as a view; nothing modifies them in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results[rank] = _compare(rank)
    finally:
        dist.destroy_process_group()


def _compare(rank: int) -> dict:
    from conftest import tiny_batch, tiny_model
    from transformer_lens import HookedTransformer

    from circuitdyn.activations import ablated_sources
    from circuitdyn.attribution import attribute, eap_with_loss
    from circuitdyn.circuit import Circuit
    from circuitdyn.graph import Graph
    from circuitdyn.optim import make_optimizer
    from circuitdyn.ownership import parameter_masks
    from circuitdyn.tasks.base import lm_loss, logit_diff

    out: dict = {}
    ref = tiny_model(n_heads=3, d_model=24, dtype=torch.float32)
    model = shard_blocks(copy.deepcopy(ref))
    out["sharded"] = is_sharded(model) and not is_sharded(ref)
    out["local_rows"] = model.blocks[0].attn.W_Q.to_local().shape[0]
    try:
        shard_blocks(model)
        out["twice"] = "no error"
    except ValueError as error:
        out["twice"] = str(error)
    graph = Graph.from_model(ref, 2)
    batch = tiny_batch()  # the same batch on both ranks: averaged gradients = one rank's

    # EAP, then the training loss's gradients, from the shared pass; and attribute("eap").
    runs = {}
    for name, m in (("ref", ref), ("sharded", model)):
        with gathered(m):  # source_hooks reads W_O while building the hooks
            ablated = ablated_sources(m, graph, batch, "corrupted", None)
            scores, _, loss = eap_with_loss(m, graph, batch, logit_diff, lm_loss, ablated)
            loss.backward()
            edges = attribute(m, graph, [batch], method="eap").edges
        grads = {n: _full(p.grad) for n, p in m.named_parameters()}
        runs[name] = (scores, loss.detach(), grads, edges)
        m.zero_grad(set_to_none=True)
    (s0, l0, g0, e0), (s1, l1, g1, e1) = runs["ref"], runs["sharded"]
    out["eap_scale"] = float(s0.abs().max())
    out["eap_diff"] = float((s0 - s1).abs().max())
    out["attribute_diff"] = float((e0 - e1).abs().max())
    out["loss_diff"] = float((l0 - l1).abs())
    out["grad_diff"] = max(float((g0[n] - g1[n]).abs().max()) for n in g0)
    out["not_plain_after"] = type(model.blocks[0].attn.W_O).__name__

    # Two masked AdamW steps, chained as circuit-tuning does.
    circuit = Circuit.from_nodes(graph, NODES)
    initial = {n: p.detach().clone() for n, p in ref.named_parameters()}
    masks = parameter_masks(ref, circuit, "nodes+norms", include_frozen=False)
    sharded_masks = parameter_masks(model, circuit, "nodes+norms", include_frozen=False)
    out["masks_equal"] = masks.keys() == sharded_masks.keys() and all(
        torch.equal(masks[n], sharded_masks[n]) for n in masks
    )
    norms = {}
    for name, m, mk in (("ref", ref, masks), ("sharded", model, sharded_masks)):
        params = dict(m.named_parameters())
        optimizer = make_optimizer(params.values(), "adamw", lr=0.05, weight_decay=0.1)
        norms[name] = []
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            with gathered(m):
                ablated = ablated_sources(m, graph, batch, "corrupted", None)
                _, _, loss = eap_with_loss(m, graph, batch, logit_diff, lm_loss, ablated)
                loss.backward()
            restrict_gradients(params, mk)
            with_grad = [p for p in params.values() if p.grad is not None]
            norms[name].append(float(torch.nn.utils.clip_grad_norm_(with_grad, 0.5)))
            masked_step(optimizer, params, mk)
        if name == "sharded":
            moments = [
                _full(optimizer.state[p]["exp_avg"])[~mk[n]]
                for n, p in params.items()
                if n in mk and p in optimizer.state
            ]
            out["frozen_moments_zero"] = all(bool((x == 0).all()) for x in moments)
    out["grad_norm_diff"] = max(
        abs(a - b) for a, b in zip(norms["ref"], norms["sharded"], strict=True)
    )
    sharded_params = {n: _full(p.detach()) for n, p in model.named_parameters()}
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    out["weight_diff"] = max(_diff(sharded_params[n], ref_params[n]) for n in ref_params)
    out["moved"] = sum(int((sharded_params[n] != initial[n]).sum()) for n in initial)
    frozen_ok = True
    for n, value in sharded_params.items():
        frozen = ~masks[n] if n in masks else torch.ones_like(value, dtype=torch.bool)
        frozen_ok &= torch.equal(value[frozen], initial[n][frozen])
    out["frozen_identical"] = frozen_ok
    out["owned"] = sum(int(mask.sum()) for mask in masks.values())

    state = full_state_dict(model)  # collective; rank 0 only
    if rank == 0:
        expected = ref.state_dict()
        out["state_keys_equal"] = state.keys() == expected.keys()
        out["state_diff"] = max(_diff(state[k], expected[k]) for k in expected)
        out["state_on_cpu"] = all(v.device.type == "cpu" for v in state.values())
    else:
        out["state_empty"] = state == {}

    # A model built on the meta device, filled from rank 0's checkpoint of the trained one.
    with torch.device("meta"):
        loaded = HookedTransformer(copy.deepcopy(ref.cfg), move_to_device=False)
    shard_blocks(loaded)
    loaded.to_empty(device="cpu")
    load_full_state_dict(loaded, state)
    with torch.no_grad():
        out["loaded_logits_diff"] = _diff(loaded(batch.clean), ref(batch.clean))
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    """What each rank found. Forked workers (Linux) start in about a second; spawned ones
    re-import torch and TransformerLens (~10 s each on a loaded machine)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    import torch.multiprocessing as mp

    method = "fork" if sys.platform == "linux" else "spawn"
    with tempfile.TemporaryDirectory() as tmp, mp.get_context(method).Manager() as manager:
        shared = manager.dict()
        args = (os.path.join(tmp, "init"), shared)
        context = mp.start_processes(
            _worker, args=args, nprocs=WORLD, join=False, start_method=method
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the {WORLD} gloo workers did not finish in {TIMEOUT_S} s")
        return {rank: dict(shared[rank]) for rank in range(WORLD)}


def test_sharded_model_is_split_unevenly_and_refuses_a_second_shard(results):
    assert results[0]["sharded"] and results[1]["sharded"]
    assert (results[0]["local_rows"], results[1]["local_rows"]) == (2, 1)
    assert results[0]["twice"] == "shard_blocks: the model is already sharded"
    assert results[0]["not_plain_after"] == "DTensor"  # resharded after `gathered`


@pytest.mark.parametrize("rank", range(WORLD))
def test_eap_scores_loss_and_gradients_match_the_unsharded_model(results, rank):
    r = results[rank]
    assert r["eap_scale"] > 1e-4  # non-trivial scores
    assert r["eap_diff"] <= 1e-6 * r["eap_scale"] + 1e-9
    assert r["attribute_diff"] <= 1e-6 * r["eap_scale"] + 1e-9
    assert r["loss_diff"] <= 1e-6
    assert r["grad_diff"] <= 1e-6


@pytest.mark.parametrize("rank", range(WORLD))
def test_masked_steps_on_shards_match_and_keep_frozen_entries(results, rank):
    r = results[rank]
    assert r["masks_equal"]  # parameter_masks sees the global shapes of the DTensors
    assert r["moved"] > 0.5 * r["owned"]  # the circuit's entries did move
    assert r["grad_norm_diff"] <= 1e-5
    assert r["weight_diff"] <= 1e-6
    assert r["frozen_identical"]  # bit for bit, despite momentum and weight decay
    assert r["frozen_moments_zero"]


def test_full_state_dict_gathers_on_rank_zero_only(results):
    assert results[0]["state_keys_equal"] and results[0]["state_on_cpu"]
    assert results[0]["state_diff"] <= 1e-6
    assert results[1]["state_empty"]


@pytest.mark.parametrize("rank", range(WORLD))
def test_meta_model_loads_rank_zero_checkpoint(results, rank):
    assert results[rank]["loaded_logits_diff"] == 0.0


def test_shard_like_leaves_plain_tensors_alone(make_tiny_model):
    model = make_tiny_model()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert shard_like(mask, torch.zeros(3, 4)) is mask
    assert not is_sharded(model)
    with gathered(model):  # no FSDP modules: a no-op
        pass
    assert full_state_dict(model).keys() == model.state_dict().keys()
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_blocks(model)
