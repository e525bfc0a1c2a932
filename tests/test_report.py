"""The analysis pipeline and the HTML report on small synthetic runs of a tiny model: tables,
key numbers, the report's structure, and every figure checked (`figure_check`). The report in a
browser: tests/test_browser.py."""

from __future__ import annotations

import html
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from figure_check import assert_trace_equals, check_figures, trace_named
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn import analysis as A
from circuitdyn.analysis.pipeline import (
    FIGURE_CAPTIONS,
    analyze_run,
    comparison,
    run_figures,
    write_tables,
)
from circuitdyn.graph import Graph
from circuitdyn.report import build_report
from circuitdyn.store import RunStore

STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from circuitdyn.models import DEFAULT_MODEL_DIR, save_model
    from circuitdyn.tasks.word_tokenizer import load_word_tokenizer

    tokenizer = load_word_tokenizer(DEFAULT_MODEL_DIR / "tokenizer")
    cfg = HookedTransformerConfig(
        n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, d_vocab=len(tokenizer),
        n_ctx=48, act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny"), model


def make_run(
    path, model_dir, *, strategy="circuit", top_n=4, seed=0, model_name=None, stop=None
) -> RunStore:
    """A run of STEPS steps: random top-n circuits and scores, dev evaluations at 0, 3 and STEPS
    (dev metric rising with top_n) and test evaluations at 0 and STEPS, logged as separate
    records as `circuitdyn.tuning` logs them, checkpoints after updates 2 and 5 (weights
    drifting). ``stop``: the run is killed before step ``stop`` (no final evaluation)."""
    directory, model = model_dir
    graph = Graph.from_model(model)
    config = {
        "task": "agreement",
        "task_options": {"n_train": 8, "n_dev": 16, "n_test": 4},
        "seed": 0,
        "strategy": strategy,
        "top_n": top_n,
        "steps": STEPS,
    }
    store = RunStore.create(
        path,
        manifest={"config": config, "model_name": model_name or str(directory)},
        src_names=graph.src_names,
        dst_names=graph.dst_names,
        edge_valid=graph.edge_valid,
        node_names=graph.node_names,
    )
    rng = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(STEPS if stop is None else stop):
        scores = torch.randn(graph.n_src, graph.n_dst, generator=rng).where(graph.edge_valid, 0.0)
        flat = scores[graph.edge_valid].abs()
        mask = torch.zeros_like(graph.edge_valid)
        chosen = flat.argsort(descending=True)[:top_n]
        selected = torch.zeros_like(flat, dtype=torch.bool)
        selected[chosen] = True
        mask[graph.edge_valid] = selected
        attributed = step != 4  # one unattributed step
        if not attributed:
            scores = torch.full_like(scores, float("nan"))
        store.append(
            step,
            edge_scores=scores,
            edge_mask=mask,
            node_scores=graph.node_scores(scores),
            metrics={
                "loss": 5.0 - step * 0.1,
                "metric": 0.1 * step,
                "attributed": float(attributed),
            },
        )
        if step % 3 == 0:
            store.log_eval(step, {"dev_metric": step * top_n / 10, "general_loss": 5.0})
        if step == 0:
            store.log_eval(0, {"test_metric": 0.0, "test_accuracy": 0.5})
        for value in state.values():
            if value.is_floating_point() and value.ndim > 1:
                value.add_(0.01 * torch.randn(value.shape, generator=rng))
        if step in (2, 5):
            store.save_checkpoint(
                step, tensors={f"model.{k}": v for k, v in state.items()}, meta={}
            )
    if stop is None:
        store.log_eval(STEPS, {"dev_metric": STEPS * top_n / 10, "general_loss": 4.5})
        store.log_eval(STEPS, {"test_metric": top_n / 10, "test_accuracy": 0.75})
    store.close()
    return store


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("runs")
    return [
        make_run(root / "small", model_dir, top_n=2, seed=1),
        make_run(root / "large", model_dir, top_n=6, seed=2),
        make_run(root / "full", model_dir, strategy="full", top_n=6, seed=3),
    ]


@pytest.fixture(scope="module")
def analyses(runs):
    return [analyze_run(RunStore.open(r.directory), model=False) for r in runs]


def test_analyze_writes_the_tables(runs, tmp_path):
    store = runs[0]
    out = tmp_path / "tables"
    result = analyze_run(RunStore.open(store.directory), max_checkpoints=2)
    written = write_tables(result, out)
    for name in (
        "churn",
        "sizes",
        "edge_trends",
        "node_events",
        "stable_core",
        "head_roles",
        "weight_changes",
        "membership_flows",
    ):
        assert written[name] == out / f"{name}.csv" and written[name].exists(), name
    churn = pd.read_csv(out / "churn.csv")
    pd.testing.assert_frame_equal(churn, A.churn(store), check_dtype=False)
    membership = pd.read_csv(out / "node_membership.csv", index_col="node")
    assert membership.shape == (len(store.node_names), STEPS)
    summary = json.loads((out / "summary.json").read_text())
    numbers = summary["summary"]
    assert numbers["steps_recorded"] == STEPS and numbers["attributed_steps"] == STEPS - 1
    assert (numbers["status"], numbers["last_step"], numbers["planned_steps"]) == (
        "finished",
        STEPS - 1,
        STEPS,
    )
    # The final evaluation's dev and test records are merged: both are finite.
    assert numbers["final_dev_metric"] == pytest.approx(STEPS * 2 / 10)
    assert numbers["final_test_metric"] == pytest.approx(0.2)
    assert numbers["first_test_accuracy"] == 0.5 and numbers["final_eval_step"] == STEPS
    assert summary["notes"] == []
    roles = pd.read_csv(out / "head_roles.csv")
    assert sorted(roles["step"].unique()) == [-1, 2, 5]


def test_analyze_without_model(analyses, tmp_path):
    written = write_tables(analyses[0], tmp_path / "nomodel")
    assert "head_roles" not in written and not (tmp_path / "nomodel" / "head_roles.csv").exists()
    notes = json.loads(written["summary"].read_text())["notes"]
    assert any("not requested" in n for n in notes)


def test_unloadable_model_is_a_note(tmp_path, model_dir):
    store = make_run(tmp_path / "lost", model_dir, model_name="no-such-model-xyz")
    result = analyze_run(RunStore.open(store.directory))
    assert "head_roles" not in result.tables and "weight_changes" not in result.tables
    assert any("'no-such-model-xyz' cannot be loaded" in n for n in result.notes)


def test_unexpected_errors_propagate(runs, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(A, "head_roles", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        analyze_run(RunStore.open(runs[0].directory), max_checkpoints=1)


def test_partial_run_says_so(tmp_path, model_dir):
    store = make_run(tmp_path / "killed", model_dir, stop=4)
    result = analyze_run(RunStore.open(store.directory), model=False)
    expected = f"partial run: steps 0..3 of {STEPS} recorded"
    assert result.notes[0].startswith(expected)
    numbers = result.summary
    assert (numbers["status"], numbers["last_step"], numbers["planned_steps"]) == (
        "partial",
        3,
        STEPS,
    )
    assert numbers["final_eval_step"] == 3 and numbers["final_dev_metric"] == pytest.approx(1.2)
    text = build_report([store.directory], tmp_path / "killed.html", model=False).read_text()
    assert text.count(expected) == 2  # at the top of the page and in the run's section


def test_final_metrics_are_finite(runs, analyses):
    """The final evaluation is read at step == config.steps with its dev and test records
    merged, so the final-metrics table, its bars and the intrinsic dimension hold numbers."""
    tables, figs, numbers = comparison(analyses)
    finals = tables["final_evals"].set_index("run")
    np.testing.assert_allclose(finals["dev_metric"], [1.2, 3.6, 3.6])
    np.testing.assert_allclose(finals["general_loss"], [4.5] * 3)
    np.testing.assert_allclose(finals["test_metric"], [0.2, 0.6, 0.6])
    np.testing.assert_allclose(finals["initial_test_accuracy"], [0.5] * 3)
    assert finals["final_step"].tolist() == [STEPS] * 3
    assert finals["status"].tolist() == ["finished"] * 3
    bars = figs["final_bars"]
    assert [t.name for t in bars.data] == ["dev_metric", "general_loss"]
    np.testing.assert_allclose(bars.data[0].y, [1.2, 3.6, 3.6])
    idim = figs["intrinsic_dimension_circuit"]
    np.testing.assert_allclose(idim.data[0].y, [1.2, 3.6])  # top_n 2 and 6
    assert numbers["intrinsic_dimension_circuit"]["saturation_n"] == 6


def test_progress_bars(runs, tmp_path, capsys):
    result = analyze_run(RunStore.open(runs[0].directory), model=False, progress=True)
    write_tables(result, tmp_path / "bars", progress=True)
    err = capsys.readouterr().err
    assert f"analyze {result.label}" in err and "tables" in err
    result = analyze_run(RunStore.open(runs[0].directory), model=False)
    assert capsys.readouterr().err == ""  # silent by default


def test_single_run_report(runs, analyses, tmp_path):
    path = build_report([runs[0].directory], tmp_path / "one.html", model=False)
    text = path.read_text()
    figs = run_figures(analyses[0])
    assert text.count('class="cd-plot"') == len(figs)
    for name in figs:  # every figure has its caption
        assert html.escape(FIGURE_CAPTIONS[name]) in text, name
    assert "Comparison of runs" not in text and "partial run" not in text
    assert "mean_jaccard_edges_prev" in text and "Stable core" in text
    assert not re.search(r"<script[^>]+src=", text)  # everything inline: works offline
    assert '<details class="run"' in text and " open>" in text  # one run: open
    assert "state before update t" in text  # the step convention is stated once


def test_comparison_report(runs, tmp_path):
    out = build_report([r.directory for r in runs], tmp_path / "cmp.html", max_checkpoints=1)
    text = out.read_text()
    assert "Comparison of runs" in text
    assert "Final dev metric versus circuit size (circuit)" in text  # top_n 2 and 6
    assert text.count("<h2") == 1 and text.count('<details class="run"') == len(runs)
    assert text.index("Comparison of runs") < text.index('<details class="run"')  # comparison first
    assert "<td>3.6</td>" in text  # the final dev metric in the comparison table, not "–"
    toc = text[text.index('<nav class="toc">') : text.index("</nav>")]
    assert toc.count("<ul>") == 1 + 1 + len(runs)  # nested: comparison and each run have entries


def test_every_report_figure_draws_its_table(runs, analyses):
    """Every figure of the report has data in every trace and titled axes, and the comparison's
    curves and bars hold the tables' numbers (the NaN final evaluation drew empty bars)."""
    check_figures({k: v for r in analyses for k, v in run_figures(r).items()})
    tables, figs, _ = comparison(analyses)
    check_figures(figs)
    curves = tables["strategy_curves"]
    fig = figs["curves_dev_metric"]
    for group, rows in curves.dropna(subset=["dev_metric"]).groupby("group", sort=False):
        trace = trace_named(fig, group)
        assert_trace_equals(trace, x=rows["step"].to_numpy(), y=rows["dev_metric"].to_numpy())


def test_report_figures_are_compact(runs, tmp_path):
    """Figures are stored as JSON without the template and with float32 arrays, drawn lazily."""
    path = build_report([runs[0].directory], tmp_path / "small.html", model=False)
    text = path.read_text()
    from plotly.offline import get_plotlyjs

    assert len(text) - len(get_plotlyjs()) < 600_000
    assert '"dtype":"f8"' not in text and "IntersectionObserver" in text
