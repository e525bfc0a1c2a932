"""The subject-verb (dis)agreement file format of "Fine-Tuning is Subgraph Search"
(arXiv 2502.06106), for models with their own tokenizer (e.g. GPT-2).

One JSON object per line::

    {"clean_text": "The keys to the cabinet are red.",   # grammatical sentence
     "corr_text":  "The keys to the cabinet is red.",    # the same with its verbs flipped
     "clean_verb_pos": [5], "corr_verb_pos": [5],        # token index of each verb
     "clean_verb_ids": [389], "corr_verb_ids": [318],    # token id of each verb
     "clean_verbs": ["are"], "corr_verbs": ["is"]}       # the verbs as text

Semantics (those of the paper's code): ``corr_text`` is the *verb-flipped* sentence, not a
subject-flipped one. Positions index the tokens of the text as the model's tokenizer splits it
*without* special tokens (``tokenizer(text, add_special_tokens=False)``); the verb at position
``p`` is predicted at ``p - 1``. With ``prepend_bos`` the task prepends the tokenizer's BOS token
and shifts every position by one.

Modes: ``"disagreement"`` (default; the paper's training task): clean tokens = ``corr_text``,
target = ``corr_verb_ids``, foil = ``clean_verb_ids``, corrupted tokens = ``clean_text`` (the
paper swaps the two the same way). ``"agreement"``: clean = ``clean_text``, target =
``clean_verb_ids``, foil = ``corr_verb_ids``, corrupted = ``corr_text``. Because the two texts
differ only at the verbs, a read position's prefix differs only after the first verb: corrupted
ablation has no effect on the first verb's prediction in this format.

Every row is validated, and rows are kept for what the run needs. Files written by the paper's
pipeline have a few percent of defective rows; a defect is either *broken* (bad JSON, missing or
malformed fields, a verb that the flip left unchanged, a position out of range or a stated verb id
that is not the token at its position; the twin's verb ids are the foils, so both sides must hold
their verbs) or a *twin that does not align* (the two texts tokenize to different lengths or put
their verbs at different positions). Training, mean and zero ablation read only one side, so rows with a
misaligned twin are used for them; corrupted ablation needs aligned twins (``twins=True``) and
uses only those. Unusable rows are skipped with a summary (`RowReport`: a count per reason and
the first line numbers), as a warning; the file is refused, with the summary, when the unusable
fraction exceeds ``max_bad_fraction`` or nothing is left, and on the first unusable row with
``strict=True``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from circuitdyn.tasks.agreement import SPLITS, AgreementPair, split_of
from circuitdyn.tasks.batching import EncodedSplit, EncodedTask, check_split, pad_sequences

SV_FIELDS: tuple[str, ...] = (
    "clean_text",
    "corr_text",
    "clean_verb_pos",
    "corr_verb_pos",
    "clean_verb_ids",
    "corr_verb_ids",
    "clean_verbs",
    "corr_verbs",
)
_LIST_FIELDS = SV_FIELDS[2:]
_INT_FIELDS = ("clean_verb_pos", "corr_verb_pos", "clean_verb_ids", "corr_verb_ids")
_LINES_SHOWN = 5  # line numbers named per reason in a summary
MAX_BAD_FRACTION = 0.1  # default: refuse a file when more than this share of rows is unusable
TWIN = "twin does not align"  # prefix of the reasons that only corrupted ablation minds


@dataclass(frozen=True)
class SvSide:
    """One text of a row, tokenized (ids without special tokens), with its verbs."""

    text: str
    ids: tuple[int, ...]
    verb_pos: tuple[int, ...]
    verb_ids: tuple[int, ...]


@dataclass(frozen=True)
class SvRow:
    """A parsed row. `twin_problem`: why the two sides do not align position by position (None
    when they do)."""

    line: int
    clean: SvSide
    corr: SvSide
    twin_problem: str | None

    @property
    def clean_text(self) -> str:
        return self.clean.text

    def sides(self, mode: str) -> tuple[SvSide, SvSide]:
        """(the side the model reads, its twin) in `mode`."""
        return (self.corr, self.clean) if mode == "disagreement" else (self.clean, self.corr)

    def problem(self, twins: bool) -> str | None:
        """Why the row cannot be used (with or without corrupted twins), or None."""
        if twins and self.twin_problem is not None:
            return f"{TWIN} ({self.twin_problem})"
        return None


@dataclass
class RowReport:
    """Which rows of a file a task uses: `total` rows, `used`, and the line numbers of the
    skipped ones by reason."""

    path: str
    total: int = 0
    used: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped.setdefault(reason, []).append(line)

    @property
    def n_skipped(self) -> int:
        return sum(len(lines) for lines in self.skipped.values())

    def summary(self) -> str:
        """One line: rows used, and per reason the count and the first line numbers."""
        parts = []
        for reason, lines in sorted(self.skipped.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(map(str, lines[:_LINES_SHOWN]))
            more = ", ..." if len(lines) > _LINES_SHOWN else ""
            parts.append(f"{len(lines)} {reason} (line {shown}{more})")
        skipped = f"; skipped {'; '.join(parts)}" if parts else ""
        return f"{self.path}: {self.used} of {self.total} rows used{skipped}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "total": self.total,
            "used": self.used,
            "skipped": {reason: lines for reason, lines in self.skipped.items()},
        }


def read_sv_jsonl(
    path: str | Path, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[SvRow], dict[str, list[int]]]:
    """Parse and tokenize a file: the rows that parse (each side checked, see `SvRow`) and the
    line numbers of broken rows by reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sv-jsonl file not found: {path}")
    rows: list[SvRow] = []
    broken: dict[str, list[int]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = _parse_row(line, line_number, tokenizer)
            if isinstance(row, str):
                broken.setdefault(row, []).append(line_number)
            else:
                rows.append(row)
    return rows, broken


def _parse_row(line: str, line_number: int, tokenizer: PreTrainedTokenizerBase) -> SvRow | str:
    """The row, or the reason it is broken (a short category, the same for alike rows)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "bad JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    if any(name not in record for name in SV_FIELDS):
        return "missing fields"
    lists = {name: record[name] for name in _LIST_FIELDS}
    if not (
        isinstance(record["clean_text"], str)
        and isinstance(record["corr_text"], str)
        and all(isinstance(value, list) for value in lists.values())
        and all(isinstance(x, int) for name in _INT_FIELDS for x in lists[name])
    ):
        return "malformed fields"
    if len({len(value) for value in lists.values()}) != 1:
        return "verb lists of different lengths"
    if not lists["clean_verb_pos"]:
        return "no verbs"
    if any(a == b for a, b in zip(lists["clean_verb_ids"], lists["corr_verb_ids"], strict=True)):
        return "verb not changed"
    clean = _side(record, "clean", tokenizer)
    corr = _side(record, "corr", tokenizer)
    for side in (clean, corr):
        problem = _verb_problem(side)
        if problem is not None:
            return problem
    twin_problem = None
    if len(clean.ids) != len(corr.ids):
        twin_problem = "texts tokenize to different lengths"
    elif clean.verb_pos != corr.verb_pos:
        twin_problem = "verb positions differ"
    return SvRow(line_number, clean, corr, twin_problem)


def _side(record: dict[str, Any], side: str, tokenizer: PreTrainedTokenizerBase) -> SvSide:
    text = record[f"{side}_text"]
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return SvSide(text, ids, tuple(record[f"{side}_verb_pos"]), tuple(record[f"{side}_verb_ids"]))


def _verb_problem(side: SvSide) -> str | None:
    """Why a side's stated verbs are not where it says (the verb is predicted at p - 1, so it
    needs a token before it), or None."""
    for pos, verb_id in zip(side.verb_pos, side.verb_ids, strict=True):
        if not 1 <= pos < len(side.ids):
            return "verb position out of range"
        if side.ids[pos] != verb_id:
            return "verb id is not the token at its position"
    return None


def sv_records(
    pairs: Sequence[AgreementPair], tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, Any]]:
    """Agreement-language sentences in the sv-jsonl format, for `tokenizer`.

    ``clean_text`` is each pair's grammatical clean sentence, ``corr_text`` the same with every
    verb flipped. Verbs are located through the tokenizer's character offsets; a verb that is
    not exactly one token is left out (as the paper does), and a sentence with no verb left is
    dropped.
    """
    records = []
    for pair in pairs:
        sentence = pair.clean
        flipped = sentence.disagreeing()
        starts = _word_starts(sentence.words[1:])
        clean = tokenizer(sentence.text, add_special_tokens=False, return_offsets_mapping=True)
        corr = tokenizer(flipped.text, add_special_tokens=False, return_offsets_mapping=True)
        if len(clean["input_ids"]) != len(corr["input_ids"]):
            continue
        record: dict[str, Any] = {"clean_text": sentence.text, "corr_text": flipped.text}
        record.update({name: [] for name in _LIST_FIELDS})
        for verb, flip in zip(sentence.verbs, flipped.verbs, strict=True):
            start = starts[verb.position - 1]
            a = _token_at(clean["offset_mapping"], sentence.text, start, verb.form)
            b = _token_at(corr["offset_mapping"], flipped.text, start, flip.form)
            if a is None or a != b or a == 0:
                continue
            record["clean_verb_pos"].append(a)
            record["corr_verb_pos"].append(b)
            record["clean_verb_ids"].append(clean["input_ids"][a])
            record["corr_verb_ids"].append(corr["input_ids"][b])
            record["clean_verbs"].append(verb.form)
            record["corr_verbs"].append(flip.form)
        if record["clean_verb_pos"]:
            records.append(record)
    return records


def write_sv_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write records (e.g. from `sv_records`) one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def _word_starts(words: Sequence[str]) -> list[int]:
    starts, offset = [], 0
    for word in words:
        starts.append(offset)
        offset += len(word) + 1
    return starts


def _token_at(offsets: Sequence[tuple[int, int]], text: str, start: int, word: str) -> int | None:
    """Index of the token spanning exactly `word` at character `start` (leading space allowed)."""
    end = start + len(word)
    for index, (a, b) in enumerate(offsets):
        if b == end and text[a:b].strip() == word:
            return index
    return None


class SvJsonlTask(EncodedTask):
    """Subject-verb (dis)agreement from sv-jsonl files; implements `Task`.

    Args:
        tokenizer: the model's tokenizer (the file's ids must be its ids).
        path: one file, split into train/dev/test by a stable hash of ``clean_text`` (80/10/10);
            or give ``train``, ``dev`` and ``test`` files instead.
        mode: ``"disagreement"`` (default, the paper's training task) or ``"agreement"``.
        prepend_bos: prepend the tokenizer's BOS token (positions shift by one; the paper does
            not).
        twins: provide the corrupted twins (needed by corrupted ablation); then only rows whose
            twins align are used. Without twins, rows whose twin does not align are used too.
        strict: refuse the file on its first unusable row.
        max_bad_fraction: refuse the file when more than this share of its rows is unusable.
        verb_weight: loss weight of positions predicting verbs (0: the LM loss on the other
            tokens, the general-capability measure of sv-jsonl runs).
        n_train, n_dev, n_test: keep at most this many rows of each split (file order).

    ``report`` (`RowReport`) says which rows were used and why others were skipped.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        path: str | Path | None = None,
        train: str | Path | None = None,
        dev: str | Path | None = None,
        test: str | Path | None = None,
        mode: Literal["disagreement", "agreement"] = "disagreement",
        prepend_bos: bool = True,
        twins: bool = True,
        strict: bool = False,
        max_bad_fraction: float = MAX_BAD_FRACTION,
        verb_weight: float = 1.0,
        n_train: int | None = None,
        n_dev: int | None = None,
        n_test: int | None = None,
    ) -> None:
        if mode not in ("disagreement", "agreement"):
            raise ValueError(f"sv-jsonl mode must be 'disagreement' or 'agreement', got {mode!r}")
        files = {"train": train, "dev": dev, "test": test}
        if path is not None and any(f is not None for f in files.values()):
            raise ValueError("give either path= (one file, hash-split) or train=/dev=/test=")
        if path is None and any(f is None for f in files.values()):
            raise ValueError("sv-jsonl needs path= or all of train=, dev= and test=")
        if prepend_bos and tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        self.name = "sv-jsonl"
        self.mode = mode
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        self.twins = twins
        self.verb_weight = float(verb_weight)
        sources = {"all": path} if path is not None else files
        self.report = RowReport(", ".join(str(f) for f in sources.values()))
        usable: dict[str, list[SvRow]] = {}
        for name, file in sources.items():
            rows, broken = read_sv_jsonl(file, tokenizer)
            usable[name] = self._usable(rows, broken, strict)
        self._check_enough(max_bad_fraction)
        if path is not None:
            rows = usable["all"]
            by_split = {s: [r for r in rows if split_of(r.clean_text) == s] for s in SPLITS}
        else:
            by_split = usable
        caps = {"train": n_train, "dev": n_dev, "test": n_test}
        self._rows = {s: by_split[s][: caps[s]] for s in SPLITS}
        self._encoded = {s: self._encode(self._rows[s]) for s in SPLITS}

    def _usable(self, rows: list[SvRow], broken: dict[str, list[int]], strict: bool) -> list[SvRow]:
        """The rows this task can use; the others go into `report` (or raise, with `strict`)."""
        skipped = {reason: list(lines) for reason, lines in broken.items()}
        kept = []
        for row in rows:
            problem = row.problem(self.twins)
            if problem is None:
                kept.append(row)
            else:
                skipped.setdefault(problem, []).append(row.line)
        if strict and skipped:
            line, reason = min((lines[0], reason) for reason, lines in skipped.items())
            raise ValueError(
                f"{self.report.path} line {line}: {reason}; --strict refuses the file on its "
                "first bad row (without it, bad rows are skipped with a summary)"
            )
        for reason, lines in skipped.items():
            for line in lines:
                self.report.skip(reason, line)
        self.report.total += len(kept) + sum(len(lines) for lines in skipped.values())
        self.report.used += len(kept)
        return kept

    def _check_enough(self, max_bad_fraction: float) -> None:
        report = self.report
        hint = ""
        if self.twins and any(reason.startswith(TWIN) for reason in report.skipped):
            hint = " (rows whose twin does not align are usable with mean or zero ablation)"
        if report.used == 0:
            raise ValueError(f"{report.summary()}; no usable rows{hint}")
        if report.n_skipped > max_bad_fraction * report.total:
            raise ValueError(
                f"{report.summary()}; {report.n_skipped / report.total:.0%} of the rows are "
                f"unusable, more than max_bad_fraction={max_bad_fraction:g} (raise it to "
                f"accept the file){hint}"
            )
        if report.n_skipped:
            warnings.warn(report.summary(), stacklevel=3)

    def rows(self, split: str) -> list[SvRow]:
        return list(self._rows[check_split(split)])

    def encoded(self, split: str) -> EncodedSplit:
        return self._encoded[check_split(split)]

    def identical_prefix_fraction(self, split: str) -> float:
        """With twins: the fraction of read positions whose clean and corrupted prefixes (the
        tokens up to and including the read position) are identical. Corrupted ablation scores
        exactly zero there, as nothing upstream differs."""
        encoded = self.encoded(split)
        if encoded.corrupted is None:
            raise ValueError("this task has no corrupted twins (twins=False)")
        differs = (encoded.clean != encoded.corrupted) & encoded.attention_mask
        # first differing position per example (n_pos when none)
        n_pos = differs.shape[1]
        first = torch.where(differs.any(1), differs.float().argmax(1), torch.tensor(n_pos))
        used = encoded.read_pos >= 0
        same = (encoded.read_pos < first[:, None]) & used
        return float(same.sum()) / max(1, int(used.sum()))

    def _encode(self, rows: list[SvRow]) -> EncodedSplit:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if not rows:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return EncodedSplit(empty, empty.bool(), empty, empty, empty, None, None)
        prefix = [tok.bos_token_id] if self.prepend_bos else []
        shift = len(prefix)
        sides = [row.sides(self.mode) for row in rows]
        clean = pad_sequences([prefix + list(read.ids) for read, _ in sides], pad)
        corrupted = None
        if self.twins:
            corrupted = pad_sequences([prefix + list(twin.ids) for _, twin in sides], pad)
        lengths = torch.tensor([len(read.ids) + shift for read, _ in sides])
        mask = torch.arange(clean.shape[1])[None, :] < lengths[:, None]
        read_pos = pad_sequences([[p + shift - 1 for p in read.verb_pos] for read, _ in sides], -1)
        target = pad_sequences([read.verb_ids for read, _ in sides], -1)
        # The foil is the twin's verb at the same slot: the verb form the model should not pick.
        foil = pad_sequences([twin.verb_ids for _, twin in sides], -1)
        lm_weight = None
        if self.verb_weight != 1.0:
            lm_weight = torch.ones(clean.shape)
            used = read_pos >= 0
            rows_index = torch.arange(len(rows))[:, None].expand_as(read_pos)
            lm_weight[rows_index[used], read_pos[used]] = self.verb_weight
        return EncodedSplit(clean, mask, read_pos, target, foil, corrupted, lm_weight)
