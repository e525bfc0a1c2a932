"""A small English-like language with subject-verb number agreement, generated from a seeded
probabilistic grammar.

Every sentence records, for each of its verbs, the position of the verb, the position of the
noun it agrees with, its other-number form, and whether a noun of the opposite number (an
*attractor*) lies between the two::

    <bos> the keys to the cabinet are red .
              ^subject  ^attractor ^verb (alternative: "is", attractor: True)

The grammar (one clause, or two clauses joined by a conjunction; each clause a subject noun
phrase and a verb phrase):

* subject NP: determiner, up to two adjectives, noun, then optionally one modifier: one or two
  prepositional phrases ("to the cabinets"), an object relative clause whose verb agrees with
  its own subject ("that the dogs like"), or a subject relative clause whose verb agrees with
  the head noun ("that opens the doors");
* verb phrase: copula + adjective or PP, "has/have" + object, a transitive verb + object, or an
  intransitive verb (+ adverb); single-clause sentences may coordinate two verb phrases
  ("is red and opens the doors"), both verbs agreeing with the same subject.

Modifiers attach only to clause subjects, so every noun's role is unambiguous. Nouns of every NP
draw their number independently, which is what creates attractors. The determiner of every NP is
number-marked ("this"/"these", "one"/"two", agreeing with its noun) with probability
``p_number_determiner``, else number-neutral ("the", "my", ...).

Lexical selection: every transitive verb and "has/have" takes objects of some noun classes only
(`OBJECTS_OF`: "opens" takes doors, boxes, letters ..., "visits" people and places). The object
of a main verb phrase or of a subject relative clause is drawn from its verb's allowed nouns; an
object relative clause ("the door that the girls open") draws a verb that allows its head noun.
Nouns of prepositional phrases and subjects are unrestricted. `Sentence.nouns` records every
noun (number, number-marked determiner, selecting verb), for the capability tasks of
`circuitdyn.tasks.capabilities`.

The corrupted twin of a sentence flips the number of the *main* subject (the first clause's
subject): that noun is swapped for its pair, a number-marked determiner on it too ("this" <->
"these"), and every verb agreeing with it, so the correct verb changes. Everything is one word per
slot, so the twin has the same length and aligned positions. Flipping twice gives back the
sentence, so a pair is the same unordered set whichever member is called clean; `pair_key` names
it and decides its split (train / dev / test) by a stable hash, so splits never share a sentence.

Generation is pure Python on `random.Random(seed)`: the same seed gives the same sentences.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from circuitdyn.tasks.batching import SPLITS

BOS = "<bos>"
PAD = "<pad>"
UNK = "<unk>"
EOS = "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, UNK, EOS)
PERIOD = "."


# (singular, plural). Irregular plurals keep the task from being "ends in -s".
NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"), ("cabinet", "cabinets"), ("dog", "dogs"), ("cat", "cats"),
    ("teacher", "teachers"), ("student", "students"), ("doctor", "doctors"),
    ("farmer", "farmers"), ("author", "authors"), ("pilot", "pilots"), ("bird", "birds"),
    ("horse", "horses"), ("car", "cars"), ("book", "books"), ("table", "tables"),
    ("door", "doors"), ("window", "windows"), ("friend", "friends"),
    ("neighbor", "neighbors"), ("king", "kings"), ("queen", "queens"), ("artist", "artists"),
    ("lawyer", "lawyers"), ("manager", "managers"), ("singer", "singers"), ("boy", "boys"),
    ("girl", "girls"), ("officer", "officers"), ("guest", "guests"), ("player", "players"),
    ("tree", "trees"), ("river", "rivers"), ("garden", "gardens"), ("painting", "paintings"),
    ("letter", "letters"), ("clock", "clocks"), ("lamp", "lamps"), ("box", "boxes"),
    ("boss", "bosses"), ("baby", "babies"), ("city", "cities"), ("wolf", "wolves"),
    ("knife", "knives"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("mouse", "mice"), ("person", "people"),
)  # fmt: skip

# Verb pairs (singular, plural), by the complement they take.
COPULAS: tuple[tuple[str, str], ...] = (("is", "are"), ("was", "were"))
POSSESSIVES: tuple[tuple[str, str], ...] = (("has", "have"),)
TRANSITIVES: tuple[tuple[str, str], ...] = (
    ("likes", "like"), ("sees", "see"), ("finds", "find"), ("needs", "need"),
    ("wants", "want"), ("holds", "hold"), ("opens", "open"), ("makes", "make"),
    ("knows", "know"), ("takes", "take"), ("follows", "follow"), ("helps", "help"),
    ("carries", "carry"), ("watches", "watch"), ("visits", "visit"),
    ("remembers", "remember"), ("loves", "love"), ("paints", "paint"),
)  # fmt: skip
INTRANSITIVES: tuple[tuple[str, str], ...] = (
    ("runs", "run"), ("sleeps", "sleep"), ("waits", "wait"), ("falls", "fall"),
    ("stays", "stay"), ("works", "work"), ("smiles", "smile"), ("moves", "move"),
    ("laughs", "laugh"), ("sings", "sing"),
)  # fmt: skip

ADJECTIVES: tuple[str, ...] = (
    "red", "old", "small", "big", "new", "happy", "quiet", "tall", "green", "heavy", "bright",
    "dark", "young", "strange", "famous", "clever", "lazy", "brave", "cold", "warm", "empty",
    "broken", "gentle", "busy", "proud",
)  # fmt: skip
ADVERBS: tuple[str, ...] = (
    "today", "again", "often", "quickly", "slowly", "here", "there", "now", "outside", "tonight",
)  # fmt: skip
PREPOSITIONS: tuple[str, ...] = (
    "to", "near", "behind", "beside", "under", "above", "with", "for", "from", "by", "of", "on",
)  # fmt: skip
# Determiners that carry no number, and (singular, plural) pairs that do.
NEUTRAL_DETERMINERS: tuple[str, ...] = ("the", "my", "your", "our", "their", "his", "her")
NUMBER_DETERMINERS: tuple[tuple[str, str], ...] = (("this", "these"), ("one", "two"))
CONJUNCTIONS: tuple[str, ...] = ("and", "while", "but", "because", "although", "when")
RELATIVIZERS: tuple[str, ...] = ("that", "which")
VP_COORDINATOR = "and"


def _all_verb_pairs() -> tuple[tuple[str, str], ...]:
    return COPULAS + POSSESSIVES + TRANSITIVES + INTRANSITIVES


VERB_PAIRS: tuple[tuple[str, str], ...] = _all_verb_pairs()


def _nouns(singulars: str) -> tuple[tuple[str, str], ...]:
    pairs = {pair[0]: pair for pair in NOUNS}
    return tuple(pairs[word] for word in singulars.split())


# Semantic noun classes (a partition of NOUNS) and the classes each verb takes as its object.
NOUN_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "people": _nouns(
        "teacher student doctor farmer author pilot friend neighbor king queen artist lawyer "
        "manager singer boy girl officer guest player boss baby child man woman person"
    ),
    "animals": _nouns("dog cat bird horse wolf mouse"),
    "objects": _nouns(
        "key cabinet car book table door window painting letter clock lamp box knife"
    ),
    "places": _nouns("tree river garden city"),
}
_PEOPLE, _ANIMALS = NOUN_CLASSES["people"], NOUN_CLASSES["animals"]
_OBJECTS, _PLACES = NOUN_CLASSES["objects"], NOUN_CLASSES["places"]
_PORTABLE = _nouns("key book painting letter clock lamp box knife")
OBJECTS_OF: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("has", "have"): _OBJECTS + _ANIMALS,
    ("likes", "like"): _PEOPLE + _ANIMALS,
    ("sees", "see"): _PEOPLE + _ANIMALS,
    ("finds", "find"): _OBJECTS + _ANIMALS,
    ("needs", "need"): _OBJECTS,
    ("wants", "want"): _OBJECTS,
    ("holds", "hold"): _PORTABLE,
    ("opens", "open"): _nouns("door window box cabinet letter book car"),
    ("makes", "make"): _OBJECTS,
    ("knows", "know"): _PEOPLE + _PLACES,
    ("takes", "take"): _OBJECTS + _ANIMALS,
    ("follows", "follow"): _PEOPLE + _ANIMALS,
    ("helps", "help"): _PEOPLE + _ANIMALS,
    ("carries", "carry"): _PORTABLE,
    ("watches", "watch"): _PEOPLE + _ANIMALS,
    ("visits", "visit"): _PEOPLE + _PLACES,
    ("remembers", "remember"): _PEOPLE + _PLACES,
    ("loves", "love"): _PEOPLE + _ANIMALS,
    ("paints", "paint"): _OBJECTS + _PLACES,
}
assert sorted(p for c in NOUN_CLASSES.values() for p in c) == sorted(NOUNS)
assert set(OBJECTS_OF) == set(POSSESSIVES + TRANSITIVES)


def allowed_objects(verb: str) -> tuple[tuple[str, str], ...]:
    """The (singular, plural) nouns that the verb `verb` (either number) takes as its object."""
    for pair, nouns in OBJECTS_OF.items():
        if verb in pair:
            return nouns
    raise ValueError(f"{verb!r} takes no object; verbs with objects: {sorted(OBJECTS_OF)}")


def lexicon() -> list[str]:
    """Every word the grammar can produce (specials excluded), in a fixed, deterministic order."""
    words: list[str] = [PERIOD]
    words += list(NEUTRAL_DETERMINERS) + [w for pair in NUMBER_DETERMINERS for w in pair]
    words += [w for pair in NOUNS for w in pair]
    words += [w for pair in VERB_PAIRS for w in pair]
    words += list(ADJECTIVES) + list(ADVERBS) + list(PREPOSITIONS)
    words += list(CONJUNCTIONS) + list(RELATIVIZERS)
    # Deduplicate keeping the first occurrence ("and" is both a conjunction and a coordinator).
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------------------------
# Generated sentences
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerbSlot:
    """One verb of a sentence. Positions index `Sentence.words` (0 is `<bos>`).

    The verb is predicted at ``position - 1`` (the read position of the agreement metric).
    """

    position: int
    subject: int  # position of the head noun the verb agrees with
    form: str  # the word in the sentence
    alternative: str  # the same verb in the other number
    attractor: bool  # a noun of the opposite number lies strictly between subject and verb
    main: bool  # agrees with the main (first) subject, i.e. flips in the corrupted twin
    agrees: bool = True  # False in a disagreeing sentence (form has the wrong number)


@dataclass(frozen=True)
class NounSlot:
    """One noun of a sentence; positions index `Sentence.words`."""

    position: int
    plural: bool
    determined: bool  # its NP starts with a number-marked determiner ("these", "one", ...)
    verb: int | None = None  # position of the verb whose object it is (selection), if any


@dataclass(frozen=True)
class Sentence:
    """A generated sentence: ``<bos>`` then words, ending with a period."""

    words: tuple[str, ...]
    subjects: tuple[int, ...]  # positions of the nouns some verb agrees with; [0] is the main one
    verbs: tuple[VerbSlot, ...]
    plural: tuple[bool, ...]  # number of the noun at each subject position (same order)
    nouns: tuple[NounSlot, ...] = ()  # every noun, in sentence order

    @property
    def text(self) -> str:
        """The sentence without ``<bos>``, words joined by single spaces."""
        return " ".join(self.words[1:])

    @property
    def has_attractor(self) -> bool:
        return any(verb.attractor for verb in self.verbs)

    def __len__(self) -> int:
        return len(self.words)

    def disagreeing(self) -> Sentence:
        """The same sentence with every verb replaced by its other-number (wrong) form."""
        words = list(self.words)
        verbs = []
        for verb in self.verbs:
            words[verb.position] = verb.alternative
            verbs.append(
                replace(verb, form=verb.alternative, alternative=verb.form, agrees=not verb.agrees)
            )
        return replace(self, words=tuple(words), verbs=tuple(verbs))


@dataclass(frozen=True)
class AgreementPair:
    """A sentence and its twin with the main subject's number flipped (same length, aligned)."""

    clean: Sentence
    corrupted: Sentence

    @property
    def key(self) -> str:
        return pair_key(self.clean.text, self.corrupted.text)

    @property
    def split(self) -> str:
        return split_of(self.key)

    def disagreeing(self) -> AgreementPair:
        """Both sentences with every verb in the wrong number (the disagreement task's data)."""
        return AgreementPair(self.clean.disagreeing(), self.corrupted.disagreeing())


def pair_key(text_a: str, text_b: str) -> str:
    """A name for the unordered pair {a, b}: the same whichever member is called clean."""
    return min(text_a, text_b)


def split_of(key: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split ('train', 'dev' or 'test') of an example, from a stable hash of its key.

    A hash (not a shuffled index) decides, so the split of a sentence does not depend on the
    seed or on how many examples were drawn: the default model's pretraining sees only 'train'
    sentences, and every task's dev/test sentences are new to it.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if u < cumulative:
            return name
    return SPLITS[-1]


# ----------------------------------------------------------------------------------------------
# The grammar
# ----------------------------------------------------------------------------------------------

# Abstract sentence items: a fixed word, a noun / number-marked determiner / verb whose form
# depends on the number of an NP "group". Rendering with a group -> plural assignment gives the
# words; flipping group 0 gives the corrupted twin.


@dataclass(frozen=True)
class _Word:
    word: str


@dataclass(frozen=True)
class _Noun:
    pair: tuple[str, str]
    group: int
    verb: int | None = None  # index (in the item list) of the verb whose object it is


@dataclass(frozen=True)
class _Det:
    pair: tuple[str, str]
    group: int


@dataclass(frozen=True)
class _Verb:
    pair: tuple[str, str]
    group: int  # the NP group whose head noun it agrees with


_Item = _Word | _Noun | _Det | _Verb


@dataclass(frozen=True)
class Grammar:
    """Probabilities of the grammar's choices. All sentences have at most `max_words` tokens
    (``<bos>`` and the period included); longer draws are re-drawn."""

    p_two_clauses: float = 0.35
    p_adjective: float = 0.3  # per adjective slot (two slots on subjects, one elsewhere)
    p_number_determiner: float = 0.25
    p_pp: float = 0.25
    p_two_pps: float = 0.07
    p_object_relative: float = 0.18
    p_subject_relative: float = 0.15
    p_vp_coordination: float = 0.2  # single-clause sentences only
    p_object_pp: float = 0.1
    p_adverb: float = 0.5
    p_plural: float = 0.5
    max_words: int = 40
    verb_kinds: tuple[float, float, float, float] = field(
        default=(0.3, 0.12, 0.4, 0.18)  # copula, has/have, transitive, intransitive
    )

    def sample(self, rng: random.Random) -> AgreementPair:
        """Draw one sentence and its subject-number-flipped twin."""
        while True:
            items, plural = self._sentence(rng)
            if len(items) + 2 <= self.max_words:
                break
        clean = _render(items, plural)
        flipped = list(plural)
        flipped[0] = not flipped[0]
        return AgreementPair(clean, _render(items, flipped))

    # -- pieces --------------------------------------------------------------------------------

    def _sentence(self, rng: random.Random) -> tuple[list[_Item], list[bool]]:
        plural: list[bool] = []
        items: list[_Item] = []
        two = rng.random() < self.p_two_clauses
        self._clause(rng, items, plural, allow_coordination=not two)
        if two:
            items.append(_Word(rng.choice(CONJUNCTIONS)))
            self._clause(rng, items, plural, allow_coordination=False)
        items.append(_Word(PERIOD))
        return items, plural

    def _new_group(self, rng: random.Random, plural: list[bool]) -> int:
        plural.append(rng.random() < self.p_plural)
        return len(plural) - 1

    def _np(
        self,
        rng: random.Random,
        items: list[_Item],
        plural: list[bool],
        adjectives: int,
        verb: int | None = None,
    ) -> tuple[int, tuple[str, str]]:
        """Determiner, adjectives, noun; returns the NP's group and noun. With `verb` (the item
        index of a verb) the NP is that verb's object and its noun one the verb allows."""
        group = self._new_group(rng, plural)
        if rng.random() < self.p_number_determiner:
            items.append(_Det(rng.choice(NUMBER_DETERMINERS), group))
        else:
            items.append(_Word(rng.choice(NEUTRAL_DETERMINERS)))
        for _ in range(adjectives):
            if rng.random() < self.p_adjective:
                items.append(_Word(rng.choice(ADJECTIVES)))
        selector = None if verb is None else items[verb]
        noun = rng.choice(OBJECTS_OF[selector.pair] if isinstance(selector, _Verb) else NOUNS)
        items.append(_Noun(noun, group, verb))
        return group, noun

    def _pp(self, rng: random.Random, items: list[_Item], plural: list[bool]) -> None:
        items.append(_Word(rng.choice(PREPOSITIONS)))
        self._np(rng, items, plural, adjectives=1)

    def _clause(
        self, rng: random.Random, items: list[_Item], plural: list[bool], allow_coordination: bool
    ) -> None:
        subject, head = self._np(rng, items, plural, adjectives=2)
        u = rng.random()
        edges = [self.p_pp, self.p_two_pps, self.p_object_relative, self.p_subject_relative]
        if u < edges[0]:
            self._pp(rng, items, plural)
        elif u < sum(edges[:2]):
            self._pp(rng, items, plural)
            self._pp(rng, items, plural)
        elif u < sum(edges[:3]):
            # Object relative clause: its verb agrees with its own subject.
            items.append(_Word(rng.choice(RELATIVIZERS)))
            inner, _ = self._np(rng, items, plural, adjectives=1)
            # The head noun is the relative verb's object: pick a verb that allows it.
            verbs = [pair for pair in TRANSITIVES if head in OBJECTS_OF[pair]]
            items.append(_Verb(rng.choice(verbs), inner))
        elif u < sum(edges):
            # Subject relative clause: its verb agrees with the head noun.
            items.append(_Word(rng.choice(RELATIVIZERS)))
            if rng.random() < 0.7:
                items.append(_Verb(rng.choice(TRANSITIVES), subject))
                self._np(rng, items, plural, adjectives=1, verb=len(items) - 1)
            else:
                items.append(_Verb(rng.choice(INTRANSITIVES), subject))
        self._verb_phrase(rng, items, plural, subject)
        if allow_coordination and rng.random() < self.p_vp_coordination:
            items.append(_Word(VP_COORDINATOR))
            self._verb_phrase(rng, items, plural, subject)

    def _verb_phrase(
        self, rng: random.Random, items: list[_Item], plural: list[bool], subject: int
    ) -> None:
        kind = rng.choices(range(4), weights=self.verb_kinds)[0]
        if kind == 0:
            items.append(_Verb(rng.choice(COPULAS), subject))
            if rng.random() < 0.7:
                items.append(_Word(rng.choice(ADJECTIVES)))
            else:
                self._pp(rng, items, plural)
        elif kind in (1, 2):
            pairs = POSSESSIVES if kind == 1 else TRANSITIVES
            items.append(_Verb(rng.choice(pairs), subject))
            self._np(rng, items, plural, adjectives=1, verb=len(items) - 1)
            if rng.random() < self.p_object_pp:
                self._pp(rng, items, plural)
        else:
            items.append(_Verb(rng.choice(INTRANSITIVES), subject))
            if rng.random() < self.p_adverb:
                items.append(_Word(rng.choice(ADVERBS)))


def _render(items: list[_Item], plural: list[bool]) -> Sentence:
    """Words and annotations of an abstract sentence under a group -> plural assignment."""
    words = [BOS]
    noun_at: dict[int, int] = {}  # group -> position of its head noun
    noun_positions: list[tuple[int, bool]] = []  # (position, plural) of every noun
    determined = {item.group for item in items if isinstance(item, _Det)}
    nouns: list[NounSlot] = []
    verb_items: list[tuple[int, _Verb]] = []
    for item in items:
        position = len(words)
        if isinstance(item, _Word):
            words.append(item.word)
        elif isinstance(item, (_Noun, _Det)):
            words.append(item.pair[int(plural[item.group])])
            if isinstance(item, _Noun):
                noun_at[item.group] = position
                noun_positions.append((position, plural[item.group]))
                # Item i is word i + 1 (after <bos>).
                verb = None if item.verb is None else item.verb + 1
                nouns.append(NounSlot(position, plural[item.group], item.group in determined, verb))
        else:
            words.append(item.pair[int(plural[item.group])])
            verb_items.append((position, item))
    subject_groups = sorted({verb.group for _, verb in verb_items})  # group 0 (main) first
    verbs = []
    for position, verb in verb_items:
        subject = noun_at[verb.group]
        number = plural[verb.group]
        attractor = any(subject < p < position and n != number for p, n in noun_positions)
        verbs.append(
            VerbSlot(
                position=position,
                subject=subject,
                form=verb.pair[int(number)],
                alternative=verb.pair[int(not number)],
                attractor=attractor,
                main=verb.group == 0,
            )
        )
    return Sentence(
        words=tuple(words),
        subjects=tuple(noun_at[g] for g in subject_groups),
        verbs=tuple(verbs),
        plural=tuple(plural[g] for g in subject_groups),
        nouns=tuple(nouns),
    )


DEFAULT_GRAMMAR = Grammar()


def iter_pairs(seed: int = 0, grammar: Grammar = DEFAULT_GRAMMAR) -> Iterator[AgreementPair]:
    """An endless, seeded stream of sentence pairs (all splits)."""
    rng = random.Random(seed)
    while True:
        yield grammar.sample(rng)


class _SharedStream:
    """The pairs of `iter_pairs(seed, grammar)` drawn so far, extended on demand: tasks built
    from the same seed and grammar (a task, its general-capability task and its capability
    tasks, in every run of a worker process) draw the sentences once. Pairs are immutable, so
    sharing them is safe; the output is the same as drawing afresh."""

    def __init__(self, seed: int, grammar: Grammar) -> None:
        self._stream = iter_pairs(seed, grammar)
        self._drawn: list[AgreementPair] = []

    def __iter__(self) -> Iterator[AgreementPair]:
        for i in itertools.count():
            if i == len(self._drawn):
                self._drawn.append(next(self._stream))
            yield self._drawn[i]


@functools.lru_cache(maxsize=8)
def _shared_stream(seed: int, grammar: Grammar) -> _SharedStream:
    return _SharedStream(seed, grammar)


def copy_grammar(grammar: Grammar = DEFAULT_GRAMMAR) -> Grammar:
    """The grammar of copy items' sentences: short enough that ``<bos> S S`` fits
    ``grammar.max_words`` tokens (S, period included, has at most ``(max_words - 1) // 2``
    words)."""
    return replace(grammar, max_words=(grammar.max_words - 1) // 2 + 1)


def generate_splits(
    sizes: dict[str, int],
    *,
    seed: int = 0,
    grammar: Grammar = DEFAULT_GRAMMAR,
    keep: Callable[[AgreementPair], bool] | None = None,
) -> dict[str, list[AgreementPair]]:
    """Distinct pairs for each split, e.g. ``{"train": 2000, "dev": 500, "test": 500}``.

    Pairs are drawn from one seeded stream and kept in the split their key hashes to, until every
    split is full; within a split no pair repeats, across splits no sentence is shared. `keep`
    (optional) skips the pairs it rejects, e.g. those without a number-marked determiner.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
    out: dict[str, list[AgreementPair]] = {name: [] for name in sizes}
    seen: set[str] = set()
    missing = sum(max(0, n) for n in sizes.values())
    # The grammar has vastly more sentences than any request; the cap only guards against a
    # grammar so small that a split can never fill.
    budget = 50 * missing + 10_000
    for drawn, pair in enumerate(_shared_stream(seed, grammar)):
        if missing == 0:
            break
        if drawn >= budget:
            raise ValueError(
                f"could not draw {sizes} distinct pairs after {drawn} draws; the grammar is too "
                "small for this many examples"
            )
        key = pair.key
        split = split_of(key)
        if split not in out or len(out[split]) >= sizes[split] or key in seen:
            continue
        if keep is not None and not keep(pair):
            continue
        seen.add(key)
        out[split].append(pair)
        missing -= 1
    return out
