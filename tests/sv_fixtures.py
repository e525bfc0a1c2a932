"""A GPT-2-style setting built offline: a byte-level BPE tokenizer trained on the agreement
language, a small random HookedTransformer that uses it, and sv-jsonl files with the defects that
files written by the paper's pipeline have."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from circuitdyn.models import save_model
from circuitdyn.tasks.agreement import generate_splits
from circuitdyn.tasks.sv_jsonl import sv_records, write_sv_jsonl

EOT = "<|endoftext|>"


def train_bpe(
    directory: Path, n_pairs: int = 300, vocab_size: int = 1000
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and decoder) trained on the language,
    saved in `directory` and loaded from there, as a real tokenizer is (TransformerLens reloads
    it by its name_or_path)."""
    pairs = generate_splits({"train": n_pairs}, seed=0)["train"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(
        [s.text for p in pairs for s in (p.clean, p.clean.disagreeing())], trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=EOT, eos_token=EOT, pad_token=EOT
    )
    fast.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def bpe_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> HookedTransformer:
    """A 2-layer, 2-head random model on the BPE vocabulary (GPT-2's layout, no BOS by default)."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2,
        n_heads=2,
        d_model=32,
        d_head=16,
        d_mlp=64,
        n_ctx=64,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        default_prepend_bos=False,
        seed=seed,
    )
    return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


def save_bpe_model(directory: Path) -> tuple[Path, PreTrainedTokenizerFast]:
    tokenizer = train_bpe(directory.parent / f"{directory.name}_bpe")
    return save_model(bpe_model(tokenizer), directory), tokenizer


DEFECTS = ("lengths differ", "positions differ", "verb not changed", "wrong verb id", "bad JSON")


def defective_sv_file(
    path: Path, tokenizer: PreTrainedTokenizerFast, n_pairs: int = 400, every: int = 33
) -> dict[str, list[int]]:
    """An sv-jsonl file of the language in which every `every`-th row has one defect (the kinds
    in `DEFECTS`, in turn): about 3% of the rows, 0.6% of each kind. Returns the 1-based line
    numbers of each defect kind."""
    pairs = generate_splits({"train": n_pairs}, seed=5)["train"]
    records = sv_records(pairs, tokenizer)
    lines = [json.dumps(r) for r in records]
    rng = random.Random(0)
    where: dict[str, list[int]] = {kind: [] for kind in DEFECTS}
    for k, index in enumerate(range(every - 1, len(records), every)):
        kind = DEFECTS[k % len(DEFECTS)]
        r = dict(records[index])
        if kind == "lengths differ":  # the parser re-joined the flipped tokens with an extra one
            r["corr_text"] += " ."
        elif kind == "positions differ":  # the corrupted side names another, real token
            ids = tokenizer(r["corr_text"])["input_ids"]
            moved = [p - 1 if p > 1 else p + 1 for p in r["corr_verb_pos"]]
            r["corr_verb_pos"], r["corr_verb_ids"] = moved, [ids[p] for p in moved]
        elif kind == "verb not changed":
            r["corr_verb_ids"] = list(r["clean_verb_ids"])
        elif kind == "wrong verb id":
            r["clean_verb_ids"] = [rng.randrange(len(tokenizer)), *r["clean_verb_ids"][1:]]
            if r["clean_verb_ids"] == records[index]["clean_verb_ids"]:
                r["clean_verb_ids"][0] += 1
        lines[index] = "{not json" if kind == "bad JSON" else json.dumps(r)
        where[kind].append(index + 1)
    write_sv_jsonl(path, [])
    path.write_text("\n".join(lines) + "\n")
    return where
