"""The agreement language: grammar, recorded annotations, corrupted twins, splits, tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from circuitdyn.tasks.agreement import (
    ADJECTIVES,
    BOS,
    DEFAULT_GRAMMAR,
    NOUNS,
    NUMBER_DETERMINERS,
    OBJECTS_OF,
    PERIOD,
    RELATIVIZERS,
    SPLITS,
    VERB_PAIRS,
    AgreementPair,
    generate_splits,
    iter_pairs,
    lexicon,
    pair_key,
    split_of,
)
from circuitdyn.tasks.word_tokenizer import (
    build_word_tokenizer,
    load_word_tokenizer,
    save_word_tokenizer,
    word_ids,
)

NOUN_NUMBER = {word: number for pair in NOUNS for number, word in enumerate(pair)}
VERB_NUMBER = {word: number for pair in VERB_PAIRS for number, word in enumerate(pair)}
VERB_OTHER = {a: b for pair in VERB_PAIRS for a, b in (pair, pair[::-1])}
NOUN_OTHER = {a: b for pair in NOUNS for a, b in (pair, pair[::-1])}
DET_OTHER = {a: b for pair in NUMBER_DETERMINERS for a, b in (pair, pair[::-1])}
SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "circuitdyn/assets/default/tokenizer"


@pytest.fixture(scope="module")
def pairs() -> list[AgreementPair]:
    stream = iter_pairs(seed=123)
    return [next(stream) for _ in range(3000)]


def test_generation_is_deterministic_for_a_seed() -> None:
    a = generate_splits({"train": 50, "dev": 20, "test": 20}, seed=7)
    b = generate_splits({"train": 50, "dev": 20, "test": 20}, seed=7)
    c = generate_splits({"train": 50, "dev": 20, "test": 20}, seed=8)
    assert a == b
    assert [p.clean.text for p in a["train"]] != [p.clean.text for p in c["train"]]
    assert {name: len(v) for name, v in a.items()} == {"train": 50, "dev": 20, "test": 20}


def test_sentences_start_with_bos_end_with_period_and_fit_the_context(
    pairs: list[AgreementPair],
) -> None:
    for pair in pairs:
        for sentence in (pair.clean, pair.corrupted):
            assert sentence.words[0] == BOS and sentence.words[-1] == PERIOD
            assert BOS not in sentence.words[1:]
            assert len(sentence) <= DEFAULT_GRAMMAR.max_words
            assert sentence.text == " ".join(sentence.words[1:])


def test_recorded_verbs_subjects_alternatives_and_attractors(pairs: list[AgreementPair]) -> None:
    for pair in pairs:
        for sentence in (pair.clean, pair.corrupted):
            nouns = [(i, NOUN_NUMBER[w]) for i, w in enumerate(sentence.words) if w in NOUN_NUMBER]
            assert sentence.verbs, sentence.text
            for verb in sentence.verbs:
                assert sentence.words[verb.position] == verb.form
                assert VERB_OTHER[verb.form] == verb.alternative
                subject_word = sentence.words[verb.subject]
                assert verb.subject in sentence.subjects
                # The verb agrees in number with the noun recorded as its subject.
                assert VERB_NUMBER[verb.form] == NOUN_NUMBER[subject_word], sentence.text
                assert verb.subject < verb.position
                expected = any(
                    verb.subject < i < verb.position and n != NOUN_NUMBER[subject_word]
                    for i, n in nouns
                )
                assert verb.attractor == expected
            main_subject = min(i for i, _ in nouns)  # the first noun heads the main clause
            assert sentence.subjects[0] == main_subject
            assert all((v.subject == main_subject) == v.main for v in sentence.verbs)
            assert sentence.plural == tuple(
                bool(NOUN_NUMBER[sentence.words[i]]) for i in sentence.subjects
            )


def test_the_corrupted_twin_flips_only_the_main_subject_and_its_verbs(
    pairs: list[AgreementPair],
) -> None:
    for pair in pairs:
        clean, corrupted = pair.clean, pair.corrupted
        assert len(clean) == len(corrupted)
        subject = clean.subjects[0]
        main_verbs = {v.position for v in clean.verbs if v.main}
        assert main_verbs
        for i, (a, b) in enumerate(zip(clean.words, corrupted.words, strict=True)):
            if i == subject:
                assert b == NOUN_OTHER[a]
            elif i in main_verbs:
                assert b == VERB_OTHER[a]
            elif a != b:  # only a number-marked determiner of the subject may change
                assert i < subject and DET_OTHER[a] == b
        # The other verbs keep their form; the main ones now agree with the flipped subject.
        for v, w in zip(clean.verbs, corrupted.verbs, strict=True):
            assert (v.position, v.main) == (w.position, w.main)
            assert w.form == (v.alternative if v.main else v.form)
        assert pair.key == pair_key(corrupted.text, clean.text)


def test_attractors_relative_clauses_and_several_verbs_are_all_present(
    pairs: list[AgreementPair],
) -> None:
    verbs = [v for p in pairs for v in p.clean.verbs]
    attractor_rate = sum(v.attractor for v in verbs) / len(verbs)
    assert 0.15 < attractor_rate < 0.5
    main_with_attractor = [v for v in verbs if v.main and v.attractor]
    assert len(main_with_attractor) > 0.1 * len(pairs)
    texts = [p.clean.text for p in pairs]
    assert sum(any(r in t.split() for r in RELATIVIZERS) for t in texts) > 0.2 * len(pairs)
    several = [p for p in pairs if len(p.clean.verbs) >= 2]
    assert len(several) > 0.4 * len(pairs)
    # Two clauses: a verb agreeing with a second, independent subject.
    assert sum(any(not v.main for v in p.clean.verbs) for p in pairs) > 0.3 * len(pairs)
    # Lexical variety: most nouns and verbs occur, and sentences rarely repeat.
    words = {w for t in texts for w in t.split()}
    assert len(words & set(NOUN_NUMBER)) > 0.9 * len(NOUN_NUMBER)
    assert len(words & set(VERB_NUMBER)) > 0.8 * len(VERB_NUMBER)
    assert len(set(texts)) > 0.99 * len(texts)


def test_number_determiners_and_selected_objects_are_recorded(pairs: list[AgreementPair]) -> None:
    det_number = {w: n for pair in NUMBER_DETERMINERS for n, w in enumerate(pair)}
    nouns = [n for p in pairs for n in p.clean.nouns]
    assert 0.15 < sum(n.determined for n in nouns) / len(nouns) < 0.35
    objects = 0
    for pair in pairs:
        words = pair.clean.words
        for noun in pair.clean.nouns:
            # Determiner-noun agreement: a number-marked determiner has the noun's number.
            det = next(w for w in reversed(words[: noun.position]) if w not in ADJECTIVES)
            assert noun.determined == (det in det_number)
            assert not noun.determined or det_number[det] == NOUN_NUMBER[words[noun.position]]
            if noun.verb is not None:
                verb = next(p for p in OBJECTS_OF if words[noun.verb] in p)
                assert any(words[noun.position] in n for n in OBJECTS_OF[verb])
                objects += 1
    assert objects > 0.4 * len(pairs)


def test_disagreeing_sentence_flips_every_verb(pairs: list[AgreementPair]) -> None:
    for pair in pairs[:200]:
        wrong = pair.clean.disagreeing()
        assert len(wrong) == len(pair.clean)
        for v, w in zip(pair.clean.verbs, wrong.verbs, strict=True):
            assert wrong.words[w.position] == v.alternative == w.form
            assert w.alternative == v.form and not w.agrees and v.agrees
        assert wrong.disagreeing() == pair.clean


def test_splits_never_share_a_sentence() -> None:
    splits = generate_splits({"train": 600, "dev": 150, "test": 150}, seed=3)
    texts = {
        name: {s.text for p in pairs for s in (p.clean, p.corrupted)}
        for name, pairs in splits.items()
    }
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not texts[a] & texts[b]
    for name, split_pairs in splits.items():
        assert all(split_of(p.key) == name for p in split_pairs)
        assert len({p.key for p in split_pairs}) == len(split_pairs)
    # The split of a sentence does not depend on the seed that drew it.
    assert split_of("the keys to the cabinet are red .") == split_of(
        "the keys to the cabinet are red ."
    )


def test_tokenizer_round_trip_and_deterministic_vocabulary(tmp_path: Path) -> None:
    tokenizer = build_word_tokenizer()
    assert tokenizer.get_vocab() == build_word_tokenizer().get_vocab()
    assert len(tokenizer) == len(lexicon()) + 4
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (0, 1)
    saved = load_word_tokenizer(save_word_tokenizer(tokenizer, tmp_path / "tok"))
    rng = random.Random(0)
    for _ in range(50):
        sentence = DEFAULT_GRAMMAR.sample(rng).clean
        ids = saved(sentence.text)["input_ids"]
        assert ids == word_ids(saved, sentence.words)  # <bos> prepended, one token per word
        assert ids[0] == saved.bos_token_id
        assert saved.decode(ids, skip_special_tokens=True) == sentence.text
        assert saved.convert_ids_to_tokens(ids) == list(sentence.words)
    # Punctuation attached to a word is split off; unknown words map to <unk>.
    assert saved("red.", add_special_tokens=False)["input_ids"] == word_ids(saved, ["red", "."])
    assert saved("zebra", add_special_tokens=False)["input_ids"] == [saved.unk_token_id]
    with pytest.raises(ValueError, match="zebra"):
        word_ids(saved, ["the", "zebra"])


def test_shipped_tokenizer_matches_the_grammar() -> None:
    shipped = load_word_tokenizer(SHIPPED_TOKENIZER)
    assert shipped.get_vocab() == build_word_tokenizer().get_vocab()
