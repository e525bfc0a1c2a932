"""The paper's data end to end: every command on an sv-jsonl file with a few percent of each
defect kind, with a model that has its own byte-level BPE tokenizer (trained here, no hub)."""

import json

import pytest
from sv_fixtures import DEFECTS, defective_sv_file, save_bpe_model

from circuitdyn.cli import main
from circuitdyn.store import RunStore


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paper")
    model_dir, tokenizer = save_bpe_model(folder / "model")
    where = defective_sv_file(folder / "sv.jsonl", tokenizer)
    return {"model": str(model_dir), "data": str(folder / "sv.jsonl"), "where": where}


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _data(paper_data, task="sv-jsonl"):
    return ["--model", paper_data["model"], "--task", task, "--data", paper_data["data"]]


def test_defect_rows_are_skipped_with_a_summary(paper_data):
    assert all(len(lines) >= 2 for lines in paper_data["where"].values())
    assert set(paper_data["where"]) == set(DEFECTS)


def test_attribute_evaluate_on_the_paper_format(paper_data, tmp_path, capsys):
    scores = tmp_path / "s.json"
    args = ["attribute", *_data(paper_data), "--n-examples", "16", "--out", str(scores)]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    # mean ablation by default: rows whose twin does not align are used, broken rows are not
    assert "394 of 400 rows used" in err
    for line in paper_data["where"]["verb not changed"]:
        assert str(line) in err
    assert json.loads(scores.read_text())["meta"]["ablation"] == "mean"

    code, out, err = _run(
        ["evaluate", "--scores", str(scores), *_data(paper_data), "--n-examples", "16"], capsys
    )
    assert code == 0, err
    assert "mean ablation" in out and "CPR" in out

    # Corrupted ablation uses only aligned twins and says how many read positions cannot score.
    args = [*args[:-2], "--ablation", "corrupted", "--out", str(tmp_path / "c.json")]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    assert "388 of 400 rows used" in err and "twin does not align" in err
    assert "identical clean and corrupted prefixes" in err


def test_tune_analyze_report_on_the_paper_format(paper_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["tune", *_data(paper_data), "--top-n", "10", "--steps", "3", "--batch-size", "4"]
    args += ["--eval-every", "2", "--n-eval", "8", "--score-positions", "read", "--out", str(run)]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    store = RunStore.open(run)
    assert store.config.ablation == "mean" and store.config.score_positions == "read"
    rows = store.manifest["data_rows"]
    assert (rows["used"], rows["total"]) == (394, 400)
    assert rows["skipped"]["bad JSON"] == paper_data["where"]["bad JSON"]
    assert "general_loss" in store.evals_frame()  # LM loss on the held-out non-verb tokens

    code, _, err = _run(["analyze", str(run), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, _, err = _run(["report", str(run), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0, err
    assert (tmp_path / "r.html").stat().st_size > 10_000


def test_general_data_file(paper_data, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the dog near the tree sees {i} birds ." for i in range(60)))
    run = tmp_path / "run"
    args = ["tune", *_data(paper_data), "--top-n", "10", "--steps", "1", "--batch-size", "4"]
    args += ["--n-eval", "8", "--general-data", str(text), "--out", str(run)]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    assert RunStore.open(run).config.task_options["general_data"] == str(text)


def test_strict_and_threshold_refuse_the_file_in_one_line(paper_data, tmp_path, capsys):
    out = ["--out", str(tmp_path / "s.json")]
    code, _, err = _run(["attribute", *_data(paper_data), "--strict", *out], capsys)
    where = paper_data["where"]
    # With mean ablation (sv-jsonl's default) rows whose twin does not align are usable.
    broken = ("verb not changed", "wrong verb id", "bad JSON")
    first = min(line for kind in broken for line in where[kind])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"line {first}:" in err and "--strict" in err
    code, _, err = _run(
        ["attribute", *_data(paper_data), "--max-bad-fraction", "0.005", *out], capsys
    )
    assert code == 2 and "more than max_bad_fraction=0.005" in err.strip().splitlines()[-1]


def test_replicate_on_the_paper_format(paper_data, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["replicate", "--quick", "--model", paper_data["model"], "--data", paper_data["data"]]
    code, _, err = _run([*args, "--workers", "1", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    arms = {row["arm"]: row for row in summary["arms"]}
    assert {"circuit", "circuit-paper", "fixed", "random-matched", "lora", "full"} <= set(arms)
    assert 0.0 <= arms["circuit"]["test_accuracy"] <= 1.0
    # The file has no held-out capabilities: forgetting is the held-out LM loss alone.
    assert "cap_mean_change" not in arms["circuit"]
    assert (out / "report.html").stat().st_size > 10_000


def test_paper_protocol_on_the_paper_format(paper_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["tune", *_data(paper_data), "--protocol", "paper", "--top-n", "4", "--steps", "2"]
    code, _, err = _run([*args, "--n-eval", "8", "--eval-every", "2", "--out", str(run)], capsys)
    assert code == 0, err
    config = RunStore.open(run).config
    assert (config.ablation, config.score_positions, config.policy) == ("mean", "read", "paper")
