"""Cost of circuit-tuning steps relative to full fine-tuning steps, same process, same batches.

For each model (the embedded default, and a GPT-2-small-shaped random model on random tokens):
mean wall time per optimizer step of
  * full fine-tuning (strategy ``full``, no attribution),
  * circuit-tuning with the circuit re-searched every step (K=1) and every 8 steps (K=8),
and the ratios to full fine-tuning; each variant also reports the peak resident memory of a
fresh process running it (``--memory``), relative to full fine-tuning.
Run: ``python benchmarks/tuning.py [--memory]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn.config import TuningConfig
from circuitdyn.graph import Graph
from circuitdyn.store import RunStore
from circuitdyn.tasks.base import Batch, lm_loss, logit_diff
from circuitdyn.tuning import _Run, train_stream


class RandomTokensTask:
    """Random clean tokens with a one-token corruption: enough to time a step."""

    name = "random-tokens"

    def __init__(self, d_vocab: int, pos: int) -> None:
        self.d_vocab, self.pos = d_vocab, pos

    def batches(self, split: str, batch_size: int, *, seed: int = 0) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        for _ in range(4):
            clean = torch.randint(0, self.d_vocab, (batch_size, self.pos), generator=g)
            corrupted = clean.clone()
            corrupted[:, 2] = torch.randint(0, self.d_vocab, (batch_size,), generator=g)
            yield Batch(
                clean=clean,
                corrupted=corrupted,
                attention_mask=torch.ones_like(clean, dtype=torch.bool),
                read_pos=torch.full((batch_size, 1), self.pos - 2),
                target=torch.randint(0, self.d_vocab, (batch_size, 1), generator=g),
                foil=torch.randint(0, self.d_vocab, (batch_size, 1), generator=g),
            )

    metric = staticmethod(logit_diff)
    loss = staticmethod(lm_loss)


def setup(model_name: str, batch: int):
    if model_name == "default":
        from circuitdyn.models import load_model
        from circuitdyn.tasks import load_task

        model = load_model("default", device="cpu")
        task = load_task("disagreement", model, n_train=512, n_dev=16, n_test=16)
    else:
        cfg = HookedTransformerConfig(
            n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
            n_ctx=128, act_fn="gelu_new", normalization_type="LN", seed=0,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer(cfg)
        task = RandomTokensTask(cfg.d_vocab, 64)
    return model, task


def time_variant(model_name: str, strategy: str, k: int, batch: int, steps: int) -> float:
    """Mean seconds per optimizer step over `steps` steps (after one warm-up step)."""
    model, task = setup(model_name, batch)
    config = TuningConfig(
        strategy=strategy, research_every=k, record_every=10**9, top_n=100, batch_size=batch,
        steps=steps + 1, n_eval=batch, lr=1e-4,
    )  # fmt: skip
    graph = Graph.from_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore.create(
            tmp + "/run", manifest={}, src_names=graph.src_names, dst_names=graph.dst_names,
            edge_valid=graph.edge_valid, node_names=graph.node_names,
        )  # fmt: skip
        run = _Run(config, model, task, None, store)
        stream = train_stream(task, batch, 0)
        run.step(0, [next(stream)])  # warm-up (and the step-0 circuit)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            run.step(step, [next(stream)])
        elapsed = (time.perf_counter() - start) / steps
        store.close()
    return elapsed


VARIANTS = [("full", "full", 1), ("circuit K=1", "circuit", 1), ("circuit K=8", "circuit", 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["default", "gpt2-small-shaped"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="timed steps (a multiple of 8)")
    parser.add_argument("--memory", action="store_true", help="peak RSS per variant (subprocesses)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # measure one variant's peak memory in a fresh process
        model_name, strategy, k = args.child
        time_variant(model_name, strategy, int(k), args.batch, 8)
        print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return
    print(f"threads={torch.get_num_threads()} batch={args.batch} steps={args.steps}")
    for model_name in args.models:
        steps = args.steps if model_name == "default" else 8
        times = {
            label: time_variant(model_name, s, k, args.batch, steps) for label, s, k in VARIANTS
        }
        base = times["full"]
        line = "  ".join(
            f"{label}: {t * 1e3:7.1f} ms ({t / base:4.2f}x)" for label, t in times.items()
        )
        print(f"{model_name:>18} | {line}", flush=True)
        if args.memory:
            peaks = {}
            for label, s, k in VARIANTS:
                command = [
                    sys.executable,
                    __file__,
                    "--batch",
                    str(args.batch),
                    "--child",
                    model_name,
                    s,
                    str(k),
                ]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                peaks[label] = json.loads(out.strip().splitlines()[-1])["maxrss_kb"] / 1024
            line = "  ".join(
                f"{label}: {mb:7.0f} MB ({mb / peaks['full']:4.2f}x)" for label, mb in peaks.items()
            )
            print(f"{'peak RSS':>18} | {line}", flush=True)


if __name__ == "__main__":
    main()
