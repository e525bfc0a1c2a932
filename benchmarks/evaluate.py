"""Benchmark: `run_with_circuit` on a ~half-size circuit vs. a plain forward pass.

Two random float32 HookedTransformers (no download): (a) GPT-2-small-shaped (12 layers,
d_model 768, 12 heads, d_vocab 50257, n_ctx 128) at batch 8 x 64 tokens, (b) 4 layers, d_model
256, 8 heads, d_vocab 5000 at the same batch shape. Prints the median wall time of several runs
of: a plain no-grad forward, the ablated sources alone (a corrupted forward that records every
source), the patched run alone, and `run_with_circuit` (sources + patched run); and the ratios
to the plain forward. Target: `run_with_circuit` ~ 2 forward passes.

Usage: ``python benchmarks/evaluate.py [--repeats 5] [--threads N] [--device cpu]``.
On a shared machine the numbers move with other load: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn.activations import ablated_sources
from circuitdyn.circuit import Circuit
from circuitdyn.evaluate import ablation_weights, run_with_circuit
from circuitdyn.graph import Graph
from circuitdyn.patching import run_patched
from circuitdyn.scores import Scores
from circuitdyn.tasks.base import Batch

SHAPES = {
    "gpt2-small-shaped": dict(n_layers=12, d_model=768, n_heads=12, d_vocab=50257),
    "4L-d256": dict(n_layers=4, d_model=256, n_heads=8, d_vocab=5000),
}


def build(shape: dict, device: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=shape["n_layers"],
        d_model=shape["d_model"],
        n_heads=shape["n_heads"],
        d_head=shape["d_model"] // shape["n_heads"],
        d_mlp=4 * shape["d_model"],
        d_vocab=shape["d_vocab"],
        n_ctx=128,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
        device=device,
    )
    return HookedTransformer(cfg).eval()


def median_times(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median seconds of each function; the functions are interleaved within each repeat so
    that drifting load on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(name: str, shape: dict, repeats: int, device: str) -> None:
    model = build(shape, device)
    graph = Graph.from_model(model)
    generator = torch.Generator().manual_seed(0)
    batch_size, pos = 8, 64
    clean = torch.randint(0, shape["d_vocab"], (batch_size, pos), generator=generator)
    corrupted = clean.clone()
    corrupted[:, pos // 2] = torch.randint(0, shape["d_vocab"], (batch_size,), generator=generator)
    batch = Batch(
        clean=clean,
        corrupted=corrupted,
        attention_mask=torch.ones(batch_size, pos, dtype=torch.bool),
        read_pos=torch.full((batch_size, 1), pos - 1),
        target=torch.zeros(batch_size, 1, dtype=torch.long),
        foil=torch.ones(batch_size, 1, dtype=torch.long),
    ).to(device)
    # A random half of the edges: every layer has both kept and ablated edges (worst case for
    # patching, which rebuilds a layer's inputs only where some edge into it is ablated).
    scores = Scores(graph, torch.randn(graph.n_src, graph.n_dst, generator=generator))
    circuit = Circuit.top_edges(scores, graph.n_edges // 2)
    ablated = ablated_sources(model, graph, batch, "corrupted")
    weights = ablation_weights(graph, circuit, device)

    def plain() -> object:
        with torch.no_grad():
            return model(batch.clean)

    results = median_times(
        {
            "forward": plain,
            "ablated sources": lambda: ablated_sources(model, graph, batch, "corrupted"),
            "patched run": lambda: run_patched(model, graph, batch.clean, ablated, weights),
            "run_with_circuit": lambda: run_with_circuit(model, graph, circuit, batch),
        },
        repeats,
        device,
    )
    base = results["forward"]
    print(
        f"\n{name}: {graph.n_edges} edges, circuit {circuit.n_edges}, batch {batch_size}x{pos}, "
        f"{device}, {torch.get_num_threads()} threads, median of {repeats}"
    )
    for label, seconds in results.items():
        print(f"  {label:<18} {seconds * 1000:9.1f} ms   {seconds / base:5.2f} x forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=list(SHAPES), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
    print("note: shared machine; timings vary with other load, ratios are more stable")
    for name, shape in SHAPES.items():
        if args.only in (None, name):
            bench(name, shape, args.repeats, args.device)


if __name__ == "__main__":
    main()
