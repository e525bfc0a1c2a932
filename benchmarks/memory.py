"""Peak memory and time of one attribution batch, against `circuitdyn.memory`'s formula, and
the formula's extrapolation to a Llama-3-8B-shaped model.

For each random model shape and precision, a fresh subprocess builds the model, then runs
`attribute(method="eap")` on one batch (default 2 x 64 tokens) and reports

  * peak memory over the process's state right before the call: on CUDA
    ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` (after
    ``reset_peak_memory_stats``); on CPU the peak resident set size (``VmHWM``, reset through
    ``/proc/self/clear_refs`` just before the call) minus the resident size at that moment;
  * the formula's estimate of the same quantity (`attribution_memory` total minus parameters);
  * wall time of the call.

Shapes: GPT-2-medium (24 layers, d_model 1024, 16 heads, d_mlp 4096, vocabulary 50257) and
Pythia-1B (16 layers, d_model 2048, 8 heads of 256, d_mlp 8192, vocabulary 50304, rotary on a
quarter of each head). Pythia runs attention and MLP in parallel (``parallel_attn_mlp``), which
circuitdyn's graph does not support (the MLP would read the block's input, not its heads'
outputs: `Graph.from_model` refuses it), so the Pythia-shaped model here is the closest
supported one: the same sizes with sequential attention then MLP. Weights are random
(N(0, 0.02)); memory and time do not depend on their values.

Precisions: a float32 model with float32 differences; a bfloat16 model with float32
differences (the default for bf16 models); a bfloat16 model with bfloat16 differences
(``diff_dtype=torch.bfloat16``); the last again with ``memory_budget`` set to the formula's
estimate for one example, so the batch is scored one example at a time.

Then the formula for a Llama-3-8B-shaped model (32 layers, d_model 4096, 32 query heads and 8
key/value heads, ungrouped, d_mlp 14336 gated, vocabulary 128256, RMSNorm, bfloat16 weights)
at 8 x 128 tokens, and the chunk size `examples_per_chunk` picks for an 80 GB GPU.

Run: ``python benchmarks/memory.py`` (5 to 7 minutes on 2 CPU cores shared with other jobs;
``--shapes gpt2-medium`` halves it; ``--batch 8 --pos 128`` on a GPU). Output on 2 CPU cores,
no GPU: benchmarks/results/memory.txt (the live-tensor peaks are reproducible to the byte; the
times are not, on shared cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from attribution import make_batch  # the sibling benchmark's random batch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn.attribution import attribute
from circuitdyn.graph import Graph
from circuitdyn.memory import attribution_memory, examples_per_chunk, format_bytes

SHAPES = {
    "gpt2-medium": dict(
        n_layers=24,
        d_model=1024,
        n_heads=16,
        d_head=64,
        d_mlp=4096,
        d_vocab=50257,
        act_fn="gelu_new",
        normalization_type="LN",
    ),
    # Pythia-1B's sizes with sequential attention -> MLP (parallel_attn_mlp is unsupported).
    "pythia-1b-seq": dict(
        n_layers=16,
        d_model=2048,
        n_heads=8,
        d_head=256,
        d_mlp=8192,
        d_vocab=50304,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=64,
    ),
}

LLAMA_3_8B = dict(
    n_layers=32,
    d_model=4096,
    n_heads=32,
    d_head=128,
    d_mlp=14336,
    d_vocab=128256,
    n_ctx=8192,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=128,
    gated_mlp=True,
    n_key_value_heads=8,
    ungroup_grouped_query_attention=True,
    dtype=torch.bfloat16,
)

# (model dtype, diff dtype, chunk to one example by memory_budget)
VARIANTS = [
    ("float32", "float32", False),
    ("bfloat16", "float32", False),
    ("bfloat16", "bfloat16", False),
    ("bfloat16", "bfloat16", True),
]


def make_model(shape: dict, dtype: torch.dtype, device: str) -> HookedTransformer:
    """A random model of `shape`: matrices N(0, 0.02), norms and biases as initialised."""
    cfg = HookedTransformerConfig(**shape, n_ctx=512, dtype=dtype, init_weights=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _allocator_peak(profiler: torch.profiler.profile) -> int:
    """Peak bytes of live CPU tensors allocated inside the profiled region: the running sum of
    the profiler's allocation and release events (each counted once, as its op's own memory)."""
    events = [e for e in profiler.events() if e.self_cpu_memory_usage]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def worker(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process."""
    torch.manual_seed(0)
    model_dtype, diff_dtype = getattr(torch, args.model_dtype), getattr(torch, args.diff_dtype)
    model = make_model(SHAPES[args.shape], model_dtype, args.device)
    graph = Graph.from_model(model)
    batch = make_batch(model, args.batch, args.pos, args.device)
    budget = None
    if args.chunked:  # exactly enough for one example by the formula
        budget = attribution_memory(model, graph, 1, args.pos, diff_dtype)["total"]
    chunk = args.batch
    if budget is not None:
        chunk = examples_per_chunk(model, graph, args.pos, budget, diff_dtype)
    estimate = attribution_memory(model, graph, min(chunk, args.batch), args.pos, diff_dtype)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux >= 4.0)
        before = _status_kb("VmRSS") * 1024
    # On CPU the profiler's memory events give the allocator-level peak (what the formula
    # models: live tensors); the peak RSS adds glibc's retained heap and oneDNN's buffers.
    profiler = contextlib.nullcontext() if cuda else torch.profiler.profile(profile_memory=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    with profiler:
        attribute(model, graph, [batch], method="eap", diff_dtype=diff_dtype, memory_budget=budget)
        if cuda:
            torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    if cuda:
        peak = allocated = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_kb("VmHWM") * 1024 - before
        allocated = _allocator_peak(profiler)
    return {
        "shape": args.shape,
        "model_dtype": args.model_dtype,
        "diff_dtype": args.diff_dtype,
        "chunk": chunk,
        "measured": allocated,
        "rss": peak,
        "formula": estimate["total"] - estimate["parameters"],
        "differences": estimate["differences"],
        "parameters": estimate["parameters"],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "n_src": graph.n_src,
    }


def run_worker(shape: str, variant: tuple, args: argparse.Namespace) -> dict:
    model_dtype, diff_dtype, chunked = variant
    command = [sys.executable, __file__, "--worker", "--shape", shape]
    command += ["--model-dtype", model_dtype, "--diff-dtype", diff_dtype]
    command += ["--batch", str(args.batch), "--pos", str(args.pos), "--device", args.device]
    command += ["--chunked"] if chunked else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {shape} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_extrapolation(worst_ratio: float, batch: int = 8, pos: int = 128) -> list[str]:
    """The formula for a Llama-3-8B-shaped model, scaled up by `worst_ratio` (the largest
    measured / formula ratio above) where the formula fell short of a measurement."""
    cfg = HookedTransformerConfig(**LLAMA_3_8B)
    graph = Graph.from_config(cfg)
    gb = 1e9
    lines = [
        f"Llama-3-8B-shaped (bf16 weights, GQA ungrouped; {graph.n_src} sources, "
        f"{graph.n_dst} destinations, {graph.n_edges:,} edges), {batch} x {pos} tokens, eap:"
    ]
    for diff in (torch.float32, torch.bfloat16):
        parts = attribution_memory(cfg, graph, batch, pos, diff)
        shown = ", ".join(
            f"{k} {parts[k] / gb:.1f}"
            for k in ("parameters", "weight_copies", "differences", "activations")
        )
        shown += f", gradient buffer {parts['gradient_buffer'] / gb:.2f}"
        total = parts["total"]
        lines.append(
            f"  {str(diff).removeprefix('torch.'):>8} differences: total {total / gb:5.1f} GB "
            f"({shown} GB)"
        )
    if worst_ratio > 1:
        lines.append(
            f"  measured peaks exceeded the formula by up to {worst_ratio - 1:.0%}: "
            f"add that to the totals above"
        )
    else:
        lines.append("  (the formula was at or above every measured peak above)")
    for budget_gb in (80, 72, 40):
        budget = int(budget_gb * gb)
        for diff in (torch.float32, torch.bfloat16):
            try:
                n = examples_per_chunk(cfg, graph, pos, budget, diff)
                chunks = -(-batch // n)
                told = f"up to {n} examples of {pos} tokens per chunk: {batch} in {chunks} chunk"
                told += "s" if chunks > 1 else ""
            except ValueError as error:
                told = str(error)
            lines.append(
                f"  budget {budget_gb} GB, {str(diff).removeprefix('torch.')} differences: {told}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--model-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--diff-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (no GPU here)"
    print(
        f"device={args.device} [{where}] threads={torch.get_num_threads()} "
        f"batch={args.batch}x{args.pos} tokens, method=eap, corrupted ablation"
    )
    cuda = args.device.startswith("cuda")
    measured = "max_allocated" if cuda else "allocated"
    print(
        f"{'shape':>13} {'model':>8} {'diffs':>8} {'chunk':>5} | {measured:>10} "
        f"{'formula':>10} {'ratio':>5} | {'' if cuda else 'peak RSS':>10} | "
        f"{'differences':>11} | {'time/batch':>10} {'CPU time':>9}"
    )
    ratios = []
    for shape in args.shapes:
        for variant in VARIANTS:
            r = run_worker(shape, variant, args)
            ratio = r["measured"] / r["formula"]
            ratios.append(ratio)
            rss = "" if cuda else format_bytes(r["rss"])
            print(
                f"{shape:>13} {r['model_dtype']:>8} {r['diff_dtype']:>8} {r['chunk']:>5} | "
                f"{format_bytes(r['measured']):>10} {format_bytes(r['formula']):>10} "
                f"{ratio:5.2f} | {rss:>10} | {format_bytes(r['differences']):>11} | "
                f"{r['seconds']:9.1f}s {r['cpu_seconds']:8.1f}s",
                flush=True,
            )
    print(
        "(memory over the state right before attribute(): the parameters are not included; "
        f"{'allocated: peak of live tensors by the profiler; peak RSS: resident set, with the allocator overheads' if not cuda else ''})"
    )
    print()
    for line in llama_extrapolation(max(1.0, *ratios)):
        print(line)


if __name__ == "__main__":
    main()
