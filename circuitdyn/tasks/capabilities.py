"""Capability tasks of the agreement language that subject-verb (dis)agreement does not target.

Each task reads the metric at some positions of held-out text, with a ``target`` token (what the
language says comes next) and a ``foil`` (a token it rules out there); the metric is `logit_diff`,
accuracy = target outscores foil, the loss is the LM loss on the whole sequence.

* ``determiner``: determiner-noun number agreement. Read at the position before each noun whose
  NP starts with a number-marked determiner ("these red [keys]"); target = that noun, foil = the
  same noun in the other number.
* ``selection``: lexical selection of objects (`circuitdyn.tasks.agreement.OBJECTS_OF`). Read at
  the position before the head noun of each verb's object ("opens the [door]"); target = the
  object noun, foil = a noun of the same number that the verb does not allow, drawn by an rng
  seeded with the sentence text (so the same sentence always gets the same foil).
* ``copy``: induction. An item is ``<bos> S S`` for a short generated sentence S
  (`copy_grammar`); read at every position of the second copy that predicts its 2nd..last word;
  target = the copied word, foil = a word of the same category (noun or verb of the same
  number, adjective, preposition, ...) absent from S, drawn as above; words without such a word
  (the period) are not read. An item's split is its sentence pair's split, so held-out copies are
  never trained on (pretraining copies train-split sentences only).

The tasks have no corrupted twins: use the mean or zero ablation with them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from circuitdyn.tasks.agreement import (
    ADJECTIVES,
    ADVERBS,
    BOS,
    CONJUNCTIONS,
    DEFAULT_GRAMMAR,
    NEUTRAL_DETERMINERS,
    NOUNS,
    NUMBER_DETERMINERS,
    PREPOSITIONS,
    RELATIVIZERS,
    SPLITS,
    VERB_PAIRS,
    AgreementPair,
    Grammar,
    Sentence,
    allowed_objects,
    copy_grammar,
    generate_splits,
)
from circuitdyn.tasks.batching import EncodedSplit, EncodedTask, check_split, pad_sequences
from circuitdyn.tasks.word_tokenizer import word_ids

Capability = Literal["determiner", "selection", "copy"]
CAPABILITIES: tuple[str, ...] = ("determiner", "selection", "copy")

_OTHER_NUMBER = {a: b for pair in NOUNS for a, b in (pair, pair[::-1])}
# Word categories for copy foils: a foil has the category of the copied word.
_CATEGORIES: tuple[tuple[str, ...], ...] = (
    tuple(p[0] for p in NOUNS),
    tuple(p[1] for p in NOUNS),
    tuple(p[0] for p in VERB_PAIRS),
    tuple(p[1] for p in VERB_PAIRS),
    ADJECTIVES,
    ADVERBS,
    PREPOSITIONS,
    NEUTRAL_DETERMINERS + tuple(w for p in NUMBER_DETERMINERS for w in p),
    CONJUNCTIONS,
    RELATIVIZERS,
)
_CATEGORY_OF = {word: category for category in _CATEGORIES for word in category}


@dataclass(frozen=True)
class Read:
    """One read position: the metric compares `target` with `foil` as the next word there."""

    position: int
    target: str
    foil: str


@dataclass(frozen=True)
class Probe:
    """One example: its words (``<bos>`` first) and read positions."""

    words: tuple[str, ...]
    reads: tuple[Read, ...]


def sentence_rng(sentence: Sentence) -> random.Random:
    """An rng seeded by the sentence text: foils are the same whoever draws the sentence."""
    digest = hashlib.blake2b(sentence.text.encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def determiner_probe(sentence: Sentence) -> Probe:
    """Reads before each noun with a number-marked determiner; foil = the other number."""
    reads = [
        Read(n.position - 1, sentence.words[n.position], _OTHER_NUMBER[sentence.words[n.position]])
        for n in sentence.nouns
        if n.determined
    ]
    return Probe(sentence.words, tuple(reads))


def selection_probe(sentence: Sentence) -> Probe:
    """Reads before each verb object's noun; foil = a same-number noun the verb rules out."""
    rng = sentence_rng(sentence)
    reads = []
    for noun in sentence.nouns:
        if noun.verb is None:
            continue
        allowed = allowed_objects(sentence.words[noun.verb])
        banned = [pair[int(noun.plural)] for pair in NOUNS if pair not in allowed]
        word = sentence.words[noun.position]
        reads.append(Read(noun.position - 1, word, rng.choice(banned)))
    return Probe(sentence.words, tuple(reads))


def copy_probe(sentence: Sentence) -> Probe:
    """``<bos> S S`` with reads at the second copy's 2nd..last words (those with a foil)."""
    body = sentence.words[1:]
    rng = sentence_rng(sentence)
    present = set(body)
    reads = []
    start = 1 + len(body)  # position of the second copy's first word
    for j in range(1, len(body)):
        word = body[j]
        foils = [w for w in _CATEGORY_OF.get(word, ()) if w not in present]
        if foils:
            reads.append(Read(start + j - 1, word, rng.choice(foils)))
    return Probe((BOS, *body, *body), tuple(reads))


PROBES: dict[str, Callable[[Sentence], Probe]] = {
    "determiner": determiner_probe,
    "selection": selection_probe,
    "copy": copy_probe,
}


class CapabilityTask(EncodedTask):
    """One capability task (see the module docstring); implements `Task`.

    Args:
        tokenizer: the embedded word-level tokenizer.
        capability: ``"determiner"``, ``"selection"`` or ``"copy"``; also the task's `name`.
        n_train, n_dev, n_test: examples per split (each with at least one read position).
        seed: seed of the sentence generator (splits never overlap, whatever the seed).
        grammar: the sentence grammar (copy items use its `copy_grammar`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        capability: Capability,
        n_train: int = 2000,
        n_dev: int = 500,
        n_test: int = 500,
        seed: int = 0,
        grammar: Grammar = DEFAULT_GRAMMAR,
    ) -> None:
        if capability not in PROBES:
            raise ValueError(f"unknown capability {capability!r}; expected one of {CAPABILITIES}")
        self.name: str = capability
        self.seed = seed
        self.tokenizer = tokenizer
        probe = PROBES[capability]
        if capability == "copy":
            grammar = copy_grammar(grammar)

        def keep(pair: AgreementPair) -> bool:
            return bool(probe(pair.clean).reads)

        sizes = {"train": n_train, "dev": n_dev, "test": n_test}
        pairs = generate_splits(sizes, seed=seed, grammar=grammar, keep=keep)
        self._probes = {split: [probe(p.clean) for p in pairs[split]] for split in SPLITS}
        self._encoded = {split: encode_probes(self._probes[split], tokenizer) for split in SPLITS}

    def probes(self, split: str) -> list[Probe]:
        """The split's examples, in encoded order."""
        return list(self._probes[check_split(split)])

    def encoded(self, split: str) -> EncodedSplit:
        """The whole split as padded tensors (no corrupted twins)."""
        return self._encoded[check_split(split)]

    def __repr__(self) -> str:
        sizes = {split: len(self._probes[split]) for split in SPLITS}
        return f"CapabilityTask({self.name!r}, sizes={sizes}, seed={self.seed})"


def encode_probes(probes: Sequence[Probe], tokenizer: PreTrainedTokenizerBase) -> EncodedSplit:
    """Probes as right-padded tensors: word ids, mask, read positions, target and foil ids
    (unused read slots -1); ``corrupted`` is None."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not probes:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return EncodedSplit(empty, empty.bool(), empty, empty, empty, None, None)
    clean = pad_sequences([word_ids(tokenizer, p.words) for p in probes], pad)
    lengths = torch.tensor([len(p.words) for p in probes])
    mask = torch.arange(clean.shape[1])[None, :] < lengths[:, None]
    read_pos = pad_sequences([[r.position for r in p.reads] for p in probes], -1)
    target = pad_sequences([word_ids(tokenizer, [r.target for r in p.reads]) for p in probes], -1)
    foil = pad_sequences([word_ids(tokenizer, [r.foil for r in p.reads]) for p in probes], -1)
    return EncodedSplit(clean, mask, read_pos, target, foil, None, None)


def capability_suite(
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_train: int = 2000,
    n_dev: int = 500,
    n_test: int = 500,
    seed: int = 0,
    grammar: Grammar = DEFAULT_GRAMMAR,
) -> dict[str, CapabilityTask]:
    """Every capability task, by name, with the same sizes and seed."""
    return {
        name: CapabilityTask(
            tokenizer,
            capability=name,  # type: ignore[arg-type]
            n_train=n_train,
            n_dev=n_dev,
            n_test=n_test,
            seed=seed,
            grammar=grammar,
        )
        for name in CAPABILITIES
    }
