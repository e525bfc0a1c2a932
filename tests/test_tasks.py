"""Tasks on the agreement language and the sv-jsonl format: batches, targets, splits, losses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from circuitdyn.tasks import TASKS, AgreementTask, SvJsonlTask, Task, load_task
from circuitdyn.tasks.agreement import NOUNS, generate_splits
from circuitdyn.tasks.base import Batch, lm_loss, logit_diff
from circuitdyn.tasks.sv_jsonl import read_sv_jsonl, sv_records, write_sv_jsonl
from circuitdyn.tasks.word_tokenizer import build_word_tokenizer, word_ids

SIZES = {"n_train": 120, "n_dev": 40, "n_test": 40}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def agreement(tokenizer) -> AgreementTask:
    return load_task("agreement", tokenizer, seed=5, **SIZES)


def _all(task: Task, split: str) -> Batch:
    """The whole split as one batch (seed 0 order)."""
    return next(task.batches(split, 10_000, seed=0))


def test_tasks_implement_the_protocol(tokenizer, agreement: AgreementTask) -> None:
    assert TASKS.names() == [
        "agreement",
        "disagreement",
        "general",
        "determiner",
        "selection",
        "copy",
        "sv-jsonl",
    ]
    assert TASKS["sv-jsonl"].default_ablation == "mean"  # as the paper
    with pytest.raises(ValueError, match="unknown task 'magic': choose one of agreement"):
        load_task("magic", tokenizer)
    assert isinstance(agreement, Task) and agreement.name == "agreement"
    for name in ("disagreement", "general"):
        task = load_task(name, tokenizer, seed=5, **SIZES)
        assert isinstance(task, Task) and task.name == name
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope", tokenizer)
    with pytest.raises(ValueError, match="model with a tokenizer"):
        load_task("agreement", object())


def test_batches_are_right_padded_with_a_correct_mask(tokenizer, agreement: AgreementTask) -> None:
    pairs = agreement.pairs("train")
    lengths = {p.clean.text: len(p.clean) for p in pairs}
    seen = 0
    for batch in agreement.batches("train", 32, seed=1):
        assert batch.clean.shape == batch.corrupted.shape == batch.attention_mask.shape
        real = batch.attention_mask.sum(dim=1)
        assert int(real.max()) == batch.clean.shape[1]  # trimmed to the longest example
        for row in range(batch.size):
            n = int(real[row])
            assert bool(batch.attention_mask[row, :n].all())
            assert not bool(batch.attention_mask[row, n:].any())
            assert bool((batch.clean[row, n:] == tokenizer.pad_token_id).all())
            assert int(batch.clean[row, 0]) == tokenizer.bos_token_id
            text = tokenizer.decode(batch.clean[row, :n].tolist(), skip_special_tokens=True)
            assert lengths[text] == n
        seen += batch.size
    assert seen == len(pairs) == SIZES["n_train"]


def test_through_last_read_cuts_only_columns_after_every_read(agreement: AgreementTask) -> None:
    batch = next(agreement.batches("dev", 16, seed=0))
    cut = batch.through_last_read()
    width = int(batch.read_pos.max()) + 1
    assert width < batch.clean.shape[1]  # sentences go on after their verbs
    assert cut.clean.shape == cut.corrupted.shape == cut.attention_mask.shape == (16, width)
    for name in ("clean", "corrupted", "attention_mask"):
        assert torch.equal(getattr(cut, name), getattr(batch, name)[:, :width]), name
    for name in ("read_pos", "target", "foil"):
        assert torch.equal(getattr(cut, name), getattr(batch, name)), name
    assert cut.through_last_read() is cut  # nothing left to cut
    slots = {name: getattr(batch, name)[:, :0] for name in ("read_pos", "target", "foil")}
    text = dataclasses.replace(batch, **slots)  # plain text: no read positions, nothing cut
    assert text.through_last_read() is text


def test_batch_order_is_seeded_and_covers_every_example_once(agreement: AgreementTask) -> None:
    def order(seed: int) -> list[list[int]]:
        return [b.clean[:, :6].tolist() for b in agreement.batches("dev", 16, seed=seed)]

    assert order(3) == order(3)
    assert order(3) != order(4)
    rows = [tuple(r) for batch in agreement.batches("dev", 7, seed=2) for r in batch.clean.tolist()]
    assert len(rows) == SIZES["n_dev"]


def test_agreement_targets_foils_and_corruption(tokenizer, agreement: AgreementTask) -> None:
    batch = _all(agreement, "test")
    used = batch.read_mask
    verbs = batch.clean.gather(1, (batch.read_pos + 1).clamp(min=0))
    assert bool((verbs == batch.target)[used].all())  # target = the verb that follows
    # Every read verb agrees with the main subject, which the corruption flips.
    by_text = {p.clean.text: p for p in agreement.pairs("test")}
    noun_ids = set(word_ids(tokenizer, [w for pair in NOUNS for w in pair]))
    for row in range(batch.size):
        n = int(batch.attention_mask[row].sum())
        pair = by_text[tokenizer.decode(batch.clean[row, :n].tolist(), skip_special_tokens=True)]
        main = [v for v in pair.clean.verbs if v.main]
        k = int(used[row].sum())
        assert k == len(main)
        assert batch.read_pos[row, :k].tolist() == [v.position - 1 for v in main]
        assert batch.foil[row, :k].tolist() == word_ids(tokenizer, [v.alternative for v in main])
        changed = (batch.clean[row] != batch.corrupted[row]).nonzero()[:, 0].tolist()
        assert pair.clean.subjects[0] in changed
        assert set(batch.read_pos[row, :k].add(1).tolist()) <= set(changed)
        assert int(batch.clean[row, pair.clean.subjects[0]]) in noun_ids


def test_disagreement_reverses_target_and_foil(tokenizer, agreement: AgreementTask) -> None:
    disagreement = load_task("disagreement", tokenizer, seed=5, **SIZES)
    good, bad = _all(agreement, "train"), _all(disagreement, "train")
    assert torch.equal(good.read_pos, bad.read_pos)
    assert torch.equal(good.target, bad.foil) and torch.equal(good.foil, bad.target)
    # Clean tokens differ exactly at the verbs (all of them, read or not).
    for g, b in zip(agreement.pairs("train"), disagreement.pairs("train"), strict=True):
        differ = [
            i for i, (x, y) in enumerate(zip(g.clean.words, b.clean.words, strict=True)) if x != y
        ]
        assert differ == [v.position for v in g.clean.verbs]
        # The corrupted twin disagrees with its own (flipped) subject.
        assert b.corrupted == g.corrupted.disagreeing()
    verbs = bad.clean.gather(1, (bad.read_pos + 1).clamp(min=0))
    assert bool((verbs == bad.target)[bad.read_mask].all())


def test_metric_is_the_logit_difference(tokenizer, agreement: AgreementTask) -> None:
    batch = _all(agreement, "dev")
    logits = torch.zeros(batch.size, batch.clean.shape[1], len(tokenizer))
    rows = torch.arange(batch.size)[:, None].expand_as(batch.read_pos)
    used = batch.read_mask
    logits[rows[used], batch.read_pos[used], batch.target[used]] = 2.0
    logits[rows[used], batch.read_pos[used], batch.foil[used]] = -1.0
    assert torch.allclose(agreement.metric(logits, batch), torch.full((batch.size,), 3.0))
    assert torch.equal(agreement.metric(logits, batch), logit_diff(logits, batch))


def test_general_loss_skips_verbs_and_reads_every_verb(tokenizer) -> None:
    general = load_task("general", tokenizer, seed=5, **SIZES)
    batch = _all(general, "test")
    pairs = {p.clean.text: p for p in general.pairs("test")}
    for row in range(batch.size):
        n = int(batch.attention_mask[row].sum())
        pair = pairs[tokenizer.decode(batch.clean[row, :n].tolist(), skip_special_tokens=True)]
        predicting_verbs = {v.position - 1 for v in pair.clean.verbs}
        assert int(batch.read_mask[row].sum()) == len(pair.clean.verbs)
        for t in range(n):
            assert float(batch.lm_weight[row, t]) == (0.0 if t in predicting_verbs else 1.0)
    # The loss is the mean cross-entropy over non-verb next tokens.
    torch.manual_seed(0)
    logits = torch.randn(batch.size, batch.clean.shape[1], len(tokenizer))
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch.clean[:, 1:].reshape(-1),
        reduction="none",
    ).view(batch.size, -1)
    keep = batch.attention_mask[:, 1:] & (batch.lm_weight[:, :-1] > 0)
    assert torch.allclose(general.loss(logits, batch), nll[keep].mean(), atol=1e-5)
    with pytest.raises(ValueError, match="verb_weight"):
        load_task("general", tokenizer, verb_weight=2.0, **SIZES)


def test_verb_weight_and_attractor_filter(tokenizer) -> None:
    task = load_task("disagreement", tokenizer, seed=5, verb_weight=4.0, **SIZES)
    batch = _all(task, "train")
    assert batch.lm_weight is not None
    assert bool((batch.lm_weight[batch.read_mask.any(1)].max(dim=1).values == 4.0).all())
    picked = batch.lm_weight.gather(1, batch.read_pos.clamp(min=0))[batch.read_mask]
    assert bool((picked == 4.0).all())
    assert torch.equal(task.loss(torch.zeros(*batch.clean.shape, len(tokenizer)), batch).view(1),
                       torch.tensor([lm_loss(torch.zeros(*batch.clean.shape, len(tokenizer)), batch)]))  # fmt: skip
    attractor = load_task("agreement", tokenizer, seed=5, attractor=True, **SIZES)
    for split in ("train", "dev", "test"):
        pairs = attractor.pairs(split)
        assert 0 < len(pairs) < SIZES[f"n_{split}"]
        assert all(any(v.attractor and v.main for v in p.clean.verbs) for p in pairs)
        assert all(all(v.attractor for v in attractor.read_verbs(p.clean)) for p in pairs)


def test_task_splits_are_disjoint(tokenizer, agreement: AgreementTask) -> None:
    texts = {
        split: {s.text for p in agreement.pairs(split) for s in (p.clean, p.corrupted)}
        for split in ("train", "dev", "test")
    }
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    other_seed = load_task("agreement", tokenizer, seed=6, **SIZES)
    other_test = {p.clean.text for p in other_seed.pairs("test")}
    assert not other_test & texts["train"]


# -- sv-jsonl ----------------------------------------------------------------------------------


def _write_splits(tmp_path: Path, tokenizer) -> dict[str, Path]:
    splits = generate_splits({"train": 30, "dev": 10, "test": 10}, seed=11)
    return {
        name: write_sv_jsonl(tmp_path / f"{name}.jsonl", sv_records(pairs, tokenizer))
        for name, pairs in splits.items()
    }


def test_sv_jsonl_round_trip_and_modes(tmp_path: Path, tokenizer) -> None:
    files = _write_splits(tmp_path, tokenizer)
    record = json.loads(files["train"].read_text().splitlines()[0])
    assert set(record) == {
        "clean_text", "corr_text", "clean_verb_pos", "corr_verb_pos",
        "clean_verb_ids", "corr_verb_ids", "clean_verbs", "corr_verbs",
    }  # fmt: skip
    disagree = load_task("sv-jsonl", tokenizer, **files)
    agree = load_task("sv-jsonl", tokenizer, mode="agreement", **files)
    assert isinstance(disagree, SvJsonlTask) and disagree.name == "sv-jsonl"
    d, a = _all(disagree, "train"), _all(agree, "train")
    assert torch.equal(d.clean, a.corrupted) and torch.equal(d.corrupted, a.clean)
    assert torch.equal(d.target, a.foil) and torch.equal(d.foil, a.target)
    for batch in (d, a):
        assert bool((batch.clean[:, 0] == tokenizer.bos_token_id).all())
        verbs = batch.clean.gather(1, (batch.read_pos + 1).clamp(min=0))
        assert bool((verbs == batch.target)[batch.read_mask].all())
    # The agreement-language tasks and sv-jsonl agree on tokens and targets of a sentence.
    row = disagree.rows("train")[0]
    assert [tokenizer.bos_token_id, *row.clean.ids] == tokenizer(row.clean_text)["input_ids"]
    # Without BOS, positions are the file's own (read at verb_pos - 1).
    no_bos = _all(load_task("sv-jsonl", tokenizer, prepend_bos=False, **files), "train")
    assert torch.equal(no_bos.read_pos[no_bos.read_mask] + 1, d.read_pos[d.read_mask])


def test_sv_jsonl_single_file_is_hash_split(tmp_path: Path, tokenizer) -> None:
    files = _write_splits(tmp_path, tokenizer)
    lines = [line for f in files.values() for line in f.read_text().splitlines()]
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    task = SvJsonlTask(tokenizer, path=tmp_path / "all.jsonl", n_train=5)
    sizes = {s: len(task.rows(s)) for s in ("train", "dev", "test")}
    assert sizes["train"] == 5 and sizes["dev"] > 0 and sizes["test"] > 0
    texts = {s: {r.clean_text for r in task.rows(s)} for s in ("train", "dev", "test")}
    assert not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]


def test_sv_jsonl_keeps_rows_for_what_the_run_needs(tmp_path: Path, tokenizer) -> None:
    good = sv_records(generate_splits({"train": 40}, seed=2)["train"], tokenizer)
    rows = [json.dumps(r) for r in good]
    wrong_id = dict(good[1], clean_verb_ids=[tokenizer.bos_token_id])
    out_of_range = dict(good[2], clean_verb_pos=[99], corr_verb_pos=[99])
    missing = {k: v for k, v in good[3].items() if k != "corr_verbs"}
    longer = dict(good[4], corr_text=good[4]["corr_text"] + " red")  # the twin does not align
    unchanged = dict(good[6], corr_verb_ids=good[6]["clean_verb_ids"])
    rows[1], rows[2], rows[3], rows[4], rows[6] = map(
        json.dumps, (wrong_id, out_of_range, missing, longer, unchanged)
    )
    rows[5] = "{not json"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    parsed, broken = read_sv_jsonl(path, tokenizer)
    assert broken == {
        "verb id is not the token at its position": [2],
        "verb position out of range": [3],
        "missing fields": [4],
        "bad JSON": [6],
        "verb not changed": [7],
    }
    assert [r.line for r in parsed] == [1, 5, *range(8, 41)]
    assert parsed[1].twin_problem == "texts tokenize to different lengths"

    # Corrupted ablation needs aligned twins: line 5 is skipped; mean / zero ablation use it.
    with pytest.warns(UserWarning, match=r"34 of 40 rows used; skipped .*twin does not align"):
        twins = SvJsonlTask(tokenizer, path=path, twins=True, max_bad_fraction=0.2)
    with pytest.warns(UserWarning, match="35 of 40 rows used"):
        single = SvJsonlTask(tokenizer, path=path, twins=False, max_bad_fraction=0.2)
    assert twins.report.skipped["bad JSON"] == [6]
    lines = {r.line for s in ("train", "dev", "test") for r in single.rows(s)}
    assert 5 in lines and 5 not in {r.line for s in ("train", "dev", "test") for r in twins.rows(s)}
    assert single.encoded("train").corrupted is None
    # Refused: above the threshold (with the summary), and on the first bad row when strict.
    with pytest.raises(ValueError, match=r"34 of 40 rows used.*more than max_bad_fraction=0.1"):
        SvJsonlTask(tokenizer, path=path)
    with pytest.raises(ValueError, match="line 2: verb id is not the token"):
        SvJsonlTask(tokenizer, path=path, strict=True)


def test_identical_prefix_fraction(tmp_path: Path, tokenizer) -> None:
    records = sv_records(generate_splits({"train": 60}, seed=3)["train"], tokenizer)
    path = write_sv_jsonl(tmp_path / "sv.jsonl", records)
    task = SvJsonlTask(tokenizer, path=path, mode="agreement")
    encoded = task.encoded("train")
    # Independently: a read position is blind when no token up to it differs.
    blind = total = 0
    for clean, corrupted, reads in zip(
        encoded.clean.tolist(), encoded.corrupted.tolist(), encoded.read_pos.tolist(), strict=True
    ):
        for r in (r for r in reads if r >= 0):
            total += 1
            blind += clean[: r + 1] == corrupted[: r + 1]
    assert task.identical_prefix_fraction("train") == pytest.approx(blind / total)
    assert 0 < blind < total  # the first verb is blind, later ones are not


def test_sv_records_with_a_gpt2_style_byte_level_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pairs = generate_splits({"train": 300}, seed=0)["train"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [s.text for p in pairs for s in (p.clean, p.clean.disagreeing())]
    core.train_from_iterator(texts, trainer)
    bpe = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    records = sv_records(pairs[:40], bpe)
    assert len(records) > 20  # verbs split into several tokens are left out
    for record in records:
        tokens = bpe.convert_ids_to_tokens(bpe(record["clean_text"])["input_ids"])
        for pos, verb in zip(record["clean_verb_pos"], record["clean_verbs"], strict=True):
            assert tokens[pos] == "Ġ" + verb  # positions index the text's own tokens, no BOS
    path = write_sv_jsonl(tmp_path / "bpe.jsonl", records)
    parsed, broken = read_sv_jsonl(path, bpe)
    assert len(parsed) == len(records) and not broken
    assert all(row.twin_problem is None for row in parsed)
