"""Capability tasks of the agreement language: determiner agreement, lexical selection, copying."""

from __future__ import annotations

import random

import pytest
import torch

from circuitdyn.models import load_model
from circuitdyn.tasks import TASKS, CapabilityTask, Task, capability_tasks, general_task, load_task
from circuitdyn.tasks.agreement import (
    ADJECTIVES,
    BOS,
    DEFAULT_GRAMMAR,
    NOUN_CLASSES,
    NOUNS,
    NUMBER_DETERMINERS,
    OBJECTS_OF,
    SPLITS,
    TRANSITIVES,
    VERB_PAIRS,
    allowed_objects,
    copy_grammar,
    iter_pairs,
    split_of,
)
from circuitdyn.tasks.base import accuracy
from circuitdyn.tasks.capabilities import CAPABILITIES, copy_probe
from circuitdyn.tasks.word_tokenizer import build_word_tokenizer

SIZES = {"n_train": 60, "n_dev": 30, "n_test": 30}
NOUN_NUMBER = {w: n for pair in NOUNS for n, w in enumerate(pair)}
NOUN_OTHER = {a: b for pair in NOUNS for a, b in (pair, pair[::-1])}
DET_NUMBER = {w: n for pair in NUMBER_DETERMINERS for n, w in enumerate(pair)}
VERB_NUMBER = {w: n for pair in VERB_PAIRS for n, w in enumerate(pair)}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def tasks(tokenizer) -> dict[str, CapabilityTask]:
    return capability_tasks("agreement", tokenizer, seed=4, **SIZES)  # type: ignore[return-value]


def words_of(task: CapabilityTask, split: str) -> list[tuple[tuple[str, ...], list]]:
    return [(p.words, list(p.reads)) for p in task.probes(split)]


def test_selection_sets_leave_out_a_third_and_generated_objects_obey_them() -> None:
    assert sum(len(c) for c in NOUN_CLASSES.values()) == len(NOUNS)
    for verb, nouns in OBJECTS_OF.items():
        assert len(nouns) <= 2 * len(NOUNS) / 3, verb
    # Every noun can head an object relative clause ("the door that the girls open").
    assert {n for pair in TRANSITIVES for n in OBJECTS_OF[pair]} == set(NOUNS)
    stream = iter_pairs(seed=11)
    n_objects = 0
    for _ in range(1500):
        pair = next(stream)
        for sentence in (pair.clean, pair.corrupted, pair.disagreeing().clean):
            words = sentence.words
            nouns = [i for i, w in enumerate(words) if w in NOUN_NUMBER]
            assert [n.position for n in sentence.nouns] == nouns
            for noun in sentence.nouns:
                assert NOUN_NUMBER[words[noun.position]] == noun.plural
                if noun.verb is not None:  # the object of that verb, an allowed noun
                    n_objects += 1
                    assert words[noun.verb] in VERB_NUMBER and noun.verb < noun.position
                    assert all(w not in NOUN_NUMBER for w in words[noun.verb + 1 : noun.position])
                    objects = {w for p in allowed_objects(words[noun.verb]) for w in p}
                    assert words[noun.position] in objects
                j = noun.position - 1
                while words[j] in ADJECTIVES:
                    j -= 1
                assert noun.determined == (words[j] in DET_NUMBER)
                if noun.determined:
                    assert DET_NUMBER[words[j]] == noun.plural
    assert n_objects > 1000
    with pytest.raises(ValueError, match="takes no object"):
        allowed_objects("sleeps")


def test_determiner_reads_and_foils(tasks: dict[str, CapabilityTask]) -> None:
    task = tasks["determiner"]
    for split in SPLITS:
        assert len(task.probes(split)) == SIZES[f"n_{split}"]
        for words, reads in words_of(task, split):
            assert reads
            for read in reads:
                assert words[read.position + 1] == read.target and read.target in NOUN_NUMBER
                assert read.foil == NOUN_OTHER[read.target]
                before = [w for w in words[: read.position + 1] if w not in ADJECTIVES]
                assert DET_NUMBER[before[-1]] == NOUN_NUMBER[read.target]


def test_selection_reads_and_foils(tasks: dict[str, CapabilityTask]) -> None:
    task = tasks["selection"]
    foils = set()
    for split in SPLITS:
        for words, reads in words_of(task, split):
            assert reads
            for read in reads:
                assert words[read.position + 1] == read.target
                verb = next(w for w in reversed(words[: read.position + 1]) if w in VERB_NUMBER)
                allowed = {w for pair in allowed_objects(verb) for w in pair}
                assert read.target in allowed and read.foil not in allowed
                assert NOUN_NUMBER[read.foil] == NOUN_NUMBER[read.target]
                foils.add(read.foil)
    assert len(foils) > 10  # foils vary
    # Deterministic: the same task twice gives the same foils.
    again = CapabilityTask(build_word_tokenizer(), capability="selection", seed=4, **SIZES)
    assert again.probes("test") == task.probes("test")


def test_copy_items_fit_and_read_the_second_copy(tasks: dict[str, CapabilityTask]) -> None:
    task = tasks["copy"]
    for split in SPLITS:
        for words, reads in words_of(task, split):
            assert len(words) <= DEFAULT_GRAMMAR.max_words and words[0] == BOS
            n = (len(words) - 1) // 2
            first, second = words[1 : 1 + n], words[1 + n :]
            assert (
                first == second and first[-1] == "." and n <= (DEFAULT_GRAMMAR.max_words - 1) // 2
            )
            read_at = [r.position for r in reads]
            assert read_at == sorted(read_at) and min(read_at) >= 1 + n  # never the copy's 1st word
            for read in reads:
                assert words[read.position + 1] == read.target
                assert read.foil not in first  # absent from S ...
                for table in (NOUN_NUMBER, VERB_NUMBER):  # ... and of the same category
                    assert (read.foil in table) == (read.target in table)
                    if read.target in table:
                        assert table[read.foil] == table[read.target]
            # Every noun, verb and adjective is read (from the copy's 2nd word on), never ".".
            content = [
                i
                for i, w in enumerate(words)
                if i > 1 + n and (w in NOUN_NUMBER or w in VERB_NUMBER or w in ADJECTIVES)
            ]
            assert [r.position + 1 for r in reads if r.target != "."] == [
                r.position + 1 for r in reads
            ]
            assert set(content) <= {r.position + 1 for r in reads}


def test_copy_splits_are_their_sentences_splits_and_disjoint(
    tasks: dict[str, CapabilityTask],
) -> None:
    task = tasks["copy"]
    texts = {}
    for split in SPLITS:
        sentences = []
        for probe in task.probes(split):
            n = (len(probe.words) - 1) // 2
            sentences.append(" ".join(probe.words[1 : 1 + n]))
        texts[split] = set(sentences)
        assert len(texts[split]) == len(sentences)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not texts[a] & texts[b]
    # The split is the pair key's: a stream of copy-grammar pairs sorted by split agrees.
    stream = iter_pairs(seed=4, grammar=copy_grammar())
    for _ in range(300):
        pair = next(stream)
        probe = copy_probe(pair.clean)
        if " ".join(probe.words[1 : len(pair.clean)]) in texts["test"]:
            assert split_of(pair.key) == "test"


def test_capability_tasks_registry_and_twins(tokenizer) -> None:
    assert set(CAPABILITIES) <= set(TASKS.names())
    for name in CAPABILITIES:
        assert TASKS[name].default_ablation == "mean"
        task = load_task(name, tokenizer, twins=False, seed=1, **SIZES)
        assert isinstance(task, Task) and task.name == name
        batch = next(task.batches("dev", 8))
        assert batch.corrupted is None and batch.read_mask.any(dim=1).all()
        with pytest.raises(ValueError, match="no corrupted twins: use ablation 'mean'"):
            load_task(name, tokenizer, twins=True)
    assert set(capability_tasks("disagreement", tokenizer, **SIZES)) == set(CAPABILITIES)
    assert capability_tasks("general", tokenizer) == {}
    assert general_task("agreement", tokenizer, **SIZES) is not None
    # Options of the main task other than the sizes are ignored.
    tasks = capability_tasks("agreement", tokenizer, n_train=5, n_dev=5, n_test=7, verb_weight=2.0)
    assert all(len(t.encoded("test")) == 7 for t in tasks.values())


def test_agreement_twins_still_flip_only_the_main_subject(tokenizer) -> None:
    task = load_task("disagreement", tokenizer, seed=9, **SIZES)
    for pair in task.pairs("test"):
        clean, corrupted = pair.clean, pair.corrupted
        assert len(clean) == len(corrupted)
        changed = [
            i for i, (a, b) in enumerate(zip(clean.words, corrupted.words, strict=True)) if a != b
        ]
        main = {v.position for v in clean.verbs if v.main} | {clean.subjects[0]}
        assert main <= set(changed) and set(changed) - main <= set(range(clean.subjects[0]))
        assert [n.verb for n in clean.nouns] == [n.verb for n in corrupted.nouns]


def test_shipped_model_has_every_capability() -> None:
    model = load_model("default", device="cpu")
    for name, task in capability_tasks(
        "agreement", model, seed=1, n_train=0, n_dev=0, n_test=300
    ).items():
        batch = next(task.batches("test", 300))
        with torch.no_grad():
            logits = model(batch.clean)
        weights = batch.read_mask.sum(dim=1)
        acc = float((accuracy(logits, batch) * weights).sum() / weights.sum())
        assert acc >= 0.99, (name, acc)
        assert float(task.metric(logits, batch).mean()) > 1.0, name


def test_copy_probe_skips_words_without_foils() -> None:
    rng = random.Random(0)
    sentence = copy_grammar().sample(rng).clean
    probe = copy_probe(sentence)
    assert all(r.target != "." for r in probe.reads)
