"""The `circuitdyn` command end to end on the embedded model (small settings), and its errors:
every bad input ends with exit status 2 and one line naming the problem and the fix."""

import dataclasses
import json
import os
import tempfile

import pytest

from circuitdyn.attribution import METHODS
from circuitdyn.cli import build_parser, main
from circuitdyn.cli import tune as tune_cli
from circuitdyn.config import TuningConfig
from circuitdyn.store import RunStore

TUNE = ["tune", "--top-n", "20", "--steps", "3", "--batch-size", "8", "--eval-every", "2"]
TUNE += ["--n-eval", "16", "--checkpoint-every", "2"]


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert "error:" in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_attribute_then_evaluate(tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert (
        main(["attribute", "--task", "agreement", "--n-examples", "16", "--out", str(scores)]) == 0
    )
    payload = json.loads(scores.read_text())
    assert len(payload["edges"]) == 262 and payload["meta"]["method"] == "eap"
    curve = tmp_path / "curve.json"
    args = ["evaluate", "--scores", str(scores), "--task", "agreement", "--n-examples", "16"]
    assert main([*args, "--out", str(curve)]) == 0
    assert "CPR" in capsys.readouterr().out
    written = json.loads(curve.read_text())
    assert written["curve"][-1]["fraction"] == 1.0
    assert written["curve"][-1]["faithfulness"] == pytest.approx(1.0)  # the full circuit


def test_tune_resume_and_overwrite(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    assert main([*TUNE, *out]) == 0
    assert "circuit run of 3 steps" in capsys.readouterr().out
    assert RunStore.open(tmp_path / "run").steps == [0, 1, 2]
    # An existing run is neither silently extended nor replaced.
    assert main([*TUNE, *out]) == 2
    one_line_error(capsys, "already holds a run", "use --resume or --overwrite")
    assert main([*TUNE[:4], "4", *TUNE[5:], *out, "--resume"]) == 0
    assert RunStore.open(tmp_path / "run").steps == [0, 1, 2, 3]
    assert main([*TUNE[:4], "2", *TUNE[5:], *out, "--overwrite"]) == 0
    assert RunStore.open(tmp_path / "run").steps == [0, 1]


def test_tune_options_come_from_the_config_and_registries(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TuningConfig):
        if f.name != "task_options":
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: 200)" in text and "(default: adamw)" in text
    assert "eap-ig: gradient averaged" in text  # registry help
    actions = {
        a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["tune"]._actions
    }
    assert actions["method"].choices == METHODS.names()
    args = build_parser().parse_args(
        ["tune", "--out", "x", "--grad-clip", "none", "--no-absolute", "--betas", "0.8", "0.9"]
    )
    config = tune_cli.config_from_args(args)
    assert config.grad_clip is None and config.absolute is False and config.betas == (0.8, 0.9)


def test_unknown_choice_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["tune", "--strategy", "magic", "--out", str(tmp_path / "r")])


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "s.json")
    assert main(["attribute", "--model", str(tmp_path / "nowhere"), "--out", out]) == 2
    one_line_error(capsys, "nowhere")
    assert main(["attribute", "--task", "sv-jsonl", "--out", out]) == 2
    one_line_error(capsys, "--data FILE")
    assert main(["attribute", "--task", "sv-jsonl", "--data", "missing.jsonl", "--out", out]) == 2
    one_line_error(capsys, "missing.jsonl")
    assert main(["attribute", "--data", "x.jsonl", "--out", out]) == 2
    one_line_error(capsys, "takes no --data")
    assert main(["evaluate", "--scores", str(tmp_path / "none.json")]) == 2
    one_line_error(capsys, "no such file", "circuitdyn attribute")
    assert main(["analyze", str(tmp_path)]) == 2
    one_line_error(capsys, "not a run directory")
    assert main([*TUNE, "--steps", "0", "--out", str(tmp_path / "r0")]) == 2
    one_line_error(capsys, "steps must be >= 1")


def _read_only_dir(tmp_path):
    """A folder this process cannot write to (root ignores permission bits: /sys then)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            with tempfile.NamedTemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no read-only folder available to this process")


def test_read_only_out_fails_before_computing(tmp_path, capsys, monkeypatch):
    locked = _read_only_dir(tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(tune_cli, "tune", must_not_run)
    assert main([*TUNE, "--out", os.path.join(locked, "run")]) == 2
    one_line_error(capsys, "not writable", "choose another --out")


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_cli, "tune", interrupted)
    assert main([*TUNE, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; continue with: circuitdyn tune" in err and "--resume" in err
    resume_command = err.split("continue with: circuitdyn ")[1].split()
    # The hint is a command line that parses to the same configuration.
    again = tune_cli.config_from_args(build_parser().parse_args(resume_command))
    assert again == tune_cli.config_from_args(build_parser().parse_args([*TUNE, "--out", "x"]))
