"""Circuit formation: the recorder (in a plain PyTorch loop, during pretraining, across saved
checkpoints), the formation analyses on stores with known answers, the figure and the commands'
one-line errors."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from figure_check import assert_trace_equals, check_figure, trace_named
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from circuitdyn import analysis as A
from circuitdyn import recorder as recorder_module
from circuitdyn.activations import mean_activations
from circuitdyn.attribution import attribute
from circuitdyn.cli import main
from circuitdyn.evaluate import faithfulness
from circuitdyn.graph import Graph
from circuitdyn.models import load_model
from circuitdyn.plots import formation_figure
from circuitdyn.pretrain import pretrain
from circuitdyn.recorder import (
    RECORDING_KIND,
    CircuitRecorder,
    check_probe,
    checkpoint_steps,
    step_from_name,
    track_checkpoints,
)
from circuitdyn.selection import select
from circuitdyn.store import RunStore
from circuitdyn.tasks import load_task
from circuitdyn.tasks.base import lm_loss, logit_diff
from circuitdyn.tasks.word_tokenizer import (
    build_word_tokenizer,
    load_word_tokenizer,
    save_word_tokenizer,
)

SMALL_TASK = {"n_train": 16, "n_dev": 16, "n_test": 0}
RECORD = {"n_eval": 8, "batch_size": 8, "top_n": 20, "task_options": SMALL_TASK}
PRETRAIN = {"steps": 20, "batch_size": 8, "n_eval": 20, "progress": False, "seed": 1}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The default model is tiny: on a shared 2-core machine torch's intra-op threads only wait
    # for each other (a training step took over 1 s with 2 threads under load). Put back after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------------------------------------
# analyses with known answers
# ---------------------------------------------------------------------------------------------
STEPS = [0, 10, 20, 30, 40, 50, 60, 70]
MEMBER = pd.DataFrame(
    [
        [0, 1, 1, 1, 0, 0, 0, 1],  # a: emerges at 10, leaves at 40
        [1, 0, 1, 0, 1, 0, 1, 0],  # b: flickers, never emerges
        [0, 0, 0, 0, 0, 1, 1, 1],  # c: emerges at 50, in the final circuit
        [0, 0, 0, 0, 0, 0, 0, 0],  # d: never in
        [1, 1, 1, 0, 0, 1, 1, 1],  # e: emerges at 0, out for two snapshots only
    ],
    index=pd.Index(list("abcde"), name="edge"),
    columns=STEPS,
).astype(bool)


def test_emergence_and_exit_steps_follow_the_window():
    table = A.emergence_steps(MEMBER, window=3).set_index("edge")
    assert list(A.emergence_steps(MEMBER, window=3)["edge"]) == ["e", "a", "c", "b", "d"]
    assert table["emergence_step"].dropna().to_dict() == {"e": 0, "a": 10, "c": 50}
    assert table.loc["a", "exit_step"] == 40
    assert table["exit_step"].isna().sum() == 4  # e is out for 2 < 3 snapshots
    assert table["order"].dropna().to_dict() == {"e": 1, "a": 2, "c": 3}
    assert table.loc["b", "first_step"] == 0 and pd.isna(table.loc["d", "first_step"])
    assert table["in_final"].to_dict() == {"a": True, "b": False, "c": True, "d": False, "e": True}
    assert table.loc["b", "fraction"] == 0.5
    shorter = A.emergence_steps(MEMBER, window=2).set_index("edge")
    assert shorter.loc["e", "exit_step"] == 30 and shorter.loc["a", "exit_step"] == 40
    single = A.emergence_steps(MEMBER, window=1).set_index("edge")
    assert single.loc["b", "emergence_step"] == 0 and single.loc["b", "exit_step"] == 10
    raster = A.emergence_raster(MEMBER, A.emergence_steps(MEMBER, window=3))
    assert list(raster.index) == ["e", "a", "c"] and raster.dtypes.unique() == [np.int8]


def test_changes_near_a_step():
    near = A.changes_near(A.emergence_steps(MEMBER, window=3), step=45, window=5)
    assert near[["edge", "event", "step", "offset"]].values.tolist() == [
        ["a", "exit", 40, -5],
        ["c", "emerge", 50, 5],
    ]


def test_phase_transition_of_known_curves():
    steps = np.arange(0, 1001, 25)
    sigmoid = pd.DataFrame({"step": steps, "dev_accuracy": 1 / (1 + np.exp(-(steps - 500) / 40))})
    found = A.phase_transition(sigmoid)
    assert found.step == 500 and found.method == "steepest"
    assert found.before < 0.2 and found.after > 0.8 and found.rise > 0.6
    assert found.slope == pytest.approx(1 / 160, rel=0.05)  # the logistic's slope at its centre
    jump = pd.DataFrame({"step": steps, "dev_accuracy": (steps >= 300).astype(float)})
    jump.loc[jump["step"] == 600, "dev_accuracy"] = 0.4  # one outlier does not move it
    change = A.phase_transition(jump, method="changepoint")
    assert change.step == 300 and change.before == 0.0
    noisy = sigmoid.assign(dev_accuracy=sigmoid["dev_accuracy"] + 0.03 * np.sin(steps))
    assert abs(A.phase_transition(noisy, smooth=5).step - 500) <= 25
    with pytest.raises(ValueError, match="at least 2"):
        A.phase_transition(sigmoid.head(1))


def test_faithfulness_onset_ignores_undefined_ratios():
    evals = pd.DataFrame(
        {
            "step": [0, 10, 20, 30, 40, 50],
            "dev_metric": [0.01, 0.5, 2.0, 4.0, 5.0, 5.0],
            "dev_metric_empty": [0.0, 0.0, 0.1, 0.0, 0.0, 0.0],
            "faithfulness": [3.0, 0.95, 0.5, 0.85, 0.7, 0.9],
        }
    )
    masked = A.masked_faithfulness(evals)
    assert np.isnan(masked["faithfulness_masked"].iloc[0])  # |gap| 0.01 < 10% of 5
    assert A.faithfulness_onset(evals) == 10
    assert A.faithfulness_onset(evals, min_gap=0.2) == 30
    assert A.faithfulness_onset(evals, window=2) is None
    assert A.faithfulness_onset(evals, 0.99) is None
    assert A.faithfulness_onset(evals.drop(columns="faithfulness")) is None


def _store_with_masks(path: Path, graph: Graph, members: dict[int, list[str]]) -> RunStore:
    """A run without a config whose circuit at each step is the given edges."""
    store = RunStore.create(
        path,
        manifest={},
        src_names=graph.src_names,
        dst_names=graph.dst_names,
        edge_valid=graph.edge_valid,
        node_names=graph.node_names,
    )
    for step, edges in members.items():
        mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
        for edge in edges:
            mask[graph.edge_index(edge)] = True
        store.append(
            step,
            edge_scores=mask.float(),
            edge_mask=mask,
            node_scores=torch.zeros(len(graph.node_names)),
            metrics={},
        )
    return store


def test_emergence_of_edges_and_nodes_of_a_store(tmp_path, make_tiny_model):
    graph = Graph.from_model(make_tiny_model())
    early, late, brief = "input->a0.h0<q>", "a1.h2->logits", "a0.h3->m1"
    members = {
        0: [early],
        5: [early, brief],
        10: [early, late],
        15: [early, late],
        20: [early, late],
    }
    store = _store_with_masks(tmp_path / "run", graph, members)
    edges = A.circuit_emergence(store, window=2).set_index("edge")
    assert edges.loc[early, "emergence_step"] == 0 and edges.loc[late, "emergence_step"] == 10
    assert pd.isna(edges.loc[brief, "emergence_step"]) and edges.loc[brief, "first_step"] == 5
    assert edges["emergence_step"].notna().sum() == 2 and len(edges) == graph.n_edges
    nodes = A.circuit_emergence(store, unit="nodes", window=2).set_index("node")
    assert nodes.loc["a0.h0", "emergence_step"] == 0 and nodes.loc["a1.h2", "emergence_step"] == 10
    assert pd.isna(nodes.loc["a0.h3", "emergence_step"])
    tables = A.formation_tables(store, window=2)  # no evaluations: no transition, no onset
    assert tables.transition is None and tables.onset is None
    assert list(tables.raster.index) == [early, late]
    summary = A.formation_summary(tables)
    assert summary["n_emerged"] == 2 and summary["n_initial"] == 1  # early is in from step 0
    assert summary["first_to_emerge"] == [late] and summary["first_emergence_step"] == 10
    assert summary["n_final"] == 2 and summary["median_emergence"] == 10
    assert "transition_step" not in summary


# ---------------------------------------------------------------------------------------------
# the recorder in a plain training loop
# ---------------------------------------------------------------------------------------------
def _train(model, task, steps: int, recorder: CircuitRecorder | None = None) -> None:
    """A plain PyTorch loop whose batches are drawn with the global RNG; the recorder is
    called between backward and the optimizer step (the gradients must survive it)."""
    batches = list(task.batches("train", 8, seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model.blocks[0].eval()  # a mixed train / eval state must be kept as it is
    for step in range(steps):
        batch = batches[int(torch.randint(len(batches), (1,)))]
        optimizer.zero_grad()
        lm_loss(model(batch.clean), batch).backward()
        if recorder is not None and step % 2 == 0:
            grads = [p.grad for p in model.parameters()]
            rng = torch.get_rng_state()
            evaluation = recorder.record(model, step, {"lr": 1e-3})
            assert {"dev_metric", "dev_accuracy", "faithfulness"} <= evaluation.keys()
            assert all(
                a is b for a, b in zip(grads, [p.grad for p in model.parameters()], strict=True)
            )
            assert torch.equal(rng, torch.get_rng_state())
            assert model.training and not model.blocks[0].training and model.blocks[1].training
        optimizer.step()


def test_recorder_leaves_the_training_unchanged_and_resumes(tmp_path):
    task = load_task("agreement", load_model("default", device="cpu"), **SMALL_TASK)
    weights = []
    for use_recorder in (False, True):
        torch.manual_seed(0)
        random.seed(0)
        model = load_model("default", device="cpu")
        recorder = None
        if use_recorder:
            recorder = CircuitRecorder(tmp_path / "run", model, steps=6, **RECORD)
        _train(model, task, 6, recorder)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        if recorder is not None:
            recorder.record(model, 6)
            recorder.close()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    store = RunStore.open(tmp_path / "run")
    assert store.steps == [0, 2, 4, 6] and store.manifest["kind"] == RECORDING_KIND
    assert store.config.top_n == 20 and store.config.task == "agreement"
    assert store.metrics_frame()["n_edges"].tolist() == [20.0] * 4
    assert A.run_progress(store).status == "finished"
    assert A.evals_by_step(store)["dev_accuracy"].between(0, 1).all()

    # Resuming: the training restarts at step 4; the recorder forgets steps 4 and 6.
    model = load_model("default", device="cpu")
    with pytest.raises(ValueError, match="other settings"):
        CircuitRecorder(tmp_path / "run", model, resume=True, **{**RECORD, "top_n": 10, "steps": 6})
    with CircuitRecorder(tmp_path / "run", model, resume=True, steps=6, **RECORD) as recorder:
        with pytest.raises(ValueError, match="not after the last recorded step"):
            recorder.record(model, 4)
        recorder.rewind(4)
        assert recorder.last_step == 2
        recorder.record(model, 4)
    assert RunStore.open(tmp_path / "run").steps == [0, 2, 4]


@pytest.mark.parametrize(
    ("method", "ablation"), [("eap", "corrupted"), ("eap", "mean"), ("eap-ig", "zero")]
)
def test_recorded_numbers_are_those_of_attribute_and_faithfulness(tmp_path, method, ablation):
    """The recorder shares passes between attribution and evaluation; its numbers must still
    be those of `attribute` and `faithfulness` on the probe set."""
    model = load_model("default", device="cpu")
    options = {**RECORD, "method": method, "ablation": ablation, "ig_steps": 2}
    with CircuitRecorder(tmp_path / "run", model, steps=1, **options) as recorder:
        evaluation = recorder.record(model, 0)
        snapshot = recorder.store.snapshot(0)
        probe, graph, metric = recorder.probe, recorder.graph, recorder.task.metric
        means = None
        if recorder.reference is not None:
            means = mean_activations(model, graph, recorder.reference)
    scores = attribute(
        model, graph, probe, metric, method=method, ablation=ablation, steps=2, means=means
    )
    torch.testing.assert_close(snapshot.edge_scores, scores.edges, rtol=1e-4, atol=1e-6)
    circuit = select(scores, 20).circuit
    assert torch.equal(snapshot.edge_mask, circuit.mask)
    expected = faithfulness(model, graph, circuit, probe, metric, ablation=ablation, means=means)
    assert evaluation["faithfulness"] == pytest.approx(expected.value, rel=1e-4)
    assert evaluation["dev_metric_empty"] == pytest.approx(expected.m_empty, rel=1e-4, abs=1e-5)
    assert evaluation["dev_metric"] == pytest.approx(expected.m_full, rel=1e-5)


@pytest.mark.parametrize(("ablation", "mlp_blocks"), [("corrupted", 1), ("zero", 2)])
def test_recorder_shortcuts_record_the_same_numbers(tmp_path, monkeypatch, ablation, mlp_blocks):
    """The recorder's EAP pass runs with the parameters not requiring grad and its backward
    pass stops at layer 0's query, key and value rather than at the embedding; what it records
    is bit for bit what the full pass with trainable parameters gives, and every parameter's
    requires_grad flag is as before."""
    model = load_model("default", device="cpu")
    model.W_pos.requires_grad_(False)  # a frozen parameter stays frozen, the others trainable
    flags = [p.requires_grad for p in model.parameters()]
    options = {**RECORD, "ablation": ablation, "mlp_blocks": mlp_blocks}
    stops = []
    original = recorder_module._backward_inputs

    def spy(first, embedding):
        stops.append(original(first, embedding))
        return stops[-1]

    runs = {}
    for name in ("shortcuts", "full"):
        if name == "full":  # the pass as it was: trainable parameters, back to the embedding
            monkeypatch.setattr(recorder_module, "_backward_inputs", lambda first, leaf: [leaf])
            monkeypatch.setattr(recorder_module, "_frozen_parameters", lambda m: nullcontext())
        else:
            monkeypatch.setattr(recorder_module, "_backward_inputs", spy)
        with CircuitRecorder(tmp_path / name, model, steps=1, **options) as recorder:
            runs[name] = (recorder.record(model, 0), recorder.store.snapshot(0))
        assert [p.requires_grad for p in model.parameters()] == flags
    assert stops and all(len(inputs) == 3 for inputs in stops)  # q, k and v, not the embedding
    (evaluation, snapshot), (full_evaluation, full_snapshot) = runs["shortcuts"], runs["full"]
    assert json.dumps(evaluation) == json.dumps(full_evaluation)  # NaN equal to NaN
    for field in ("edge_scores", "edge_mask", "node_scores"):
        assert torch.equal(getattr(snapshot, field), getattr(full_snapshot, field)), field
    assert snapshot.edge_scores.abs().sum() > 0


def test_cutting_the_probe_after_its_reads_records_the_same_numbers(tmp_path, monkeypatch):
    """Records run the probe only through its last read position; scores, circuit and
    evaluation are those of the whole probe, to float rounding."""
    model = load_model("default", device="cpu")
    runs, widths = {}, {}
    for name in ("cut", "whole"):
        if name == "whole":
            monkeypatch.setattr(recorder_module, "_cut_is_exact", lambda *args: False)
        with CircuitRecorder(tmp_path / name, model, steps=1, **RECORD) as recorder:
            runs[name] = (recorder.record(model, 0), recorder.store.snapshot(0))
            assert recorder.store.manifest["probe"]["cut_after_last_read"] == (name == "cut")
            widths[name] = recorder._probe_on(model, torch.device("cpu"))[0][0].clean.shape[1]
    assert widths["cut"] < widths["whole"]
    (evaluation, snapshot), (whole_evaluation, whole_snapshot) = runs["cut"], runs["whole"]
    torch.testing.assert_close(
        snapshot.edge_scores, whole_snapshot.edge_scores, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        snapshot.node_scores, whole_snapshot.node_scores, rtol=1e-5, atol=1e-6
    )
    assert torch.equal(snapshot.edge_mask, whole_snapshot.edge_mask)
    assert evaluation.keys() == whole_evaluation.keys()
    for key, value in whole_evaluation.items():
        assert evaluation[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_probe_is_cut_only_for_a_causal_model_whose_metric_reads_at_the_reads():
    model = load_model("default", device="cpu")
    batch = next(load_task("agreement", model, **SMALL_TASK).batches("dev", 8))
    assert batch.through_last_read() is not batch
    assert recorder_module._cut_is_exact(model, batch, logit_diff)

    def last_column(logits, batch):  # reads past the read positions
        return logits[:, -1, 0]

    def column_20(logits, batch):  # fails on a cut batch
        return logits[:, 20, 0]

    assert not recorder_module._cut_is_exact(model, batch, last_column)
    assert not recorder_module._cut_is_exact(model, batch, column_20)
    model.cfg.attention_dir = "bidirectional"  # later tokens would change the reads
    assert not recorder_module._cut_is_exact(model, batch, logit_diff)


def test_probe_set_errors_name_the_source_and_the_fix():
    model = load_model("default", device="cpu")
    batches = load_task("agreement", model, **SMALL_TASK).batches("dev", 4)
    probe = [dataclasses.replace(batch, corrupted=None) for batch in batches]
    with pytest.raises(ValueError, match=r"probe\.jsonl: the probe set has no corrupted tokens"):
        check_probe(probe, "corrupted", where="probe.jsonl")
    with pytest.raises(ValueError, match="use ablation 'mean' or 'zero'"):
        CircuitRecorder("unused", model, probe=probe, steps=1, **RECORD)
    with pytest.raises(ValueError, match="needs reference examples"):
        check_probe(probe, "mean")
    check_probe(probe, "zero")


# ---------------------------------------------------------------------------------------------
# pretraining with recording, checkpoints, track
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """A short pretraining run with and one without recording (models saved every 10 steps)."""
    root = tmp_path_factory.mktemp("pretrain")
    record = {"n_eval": 8, "batch_size": 8, "top_n": 20}
    pretrain(root / "plain", **PRETRAIN)
    options = {"record_every": 5, "record": record, "save_every": 10, "checkpoint_every": 10}
    pretrain(root / "run", **PRETRAIN, **options)
    return {"root": root, "plain": root / "plain", "run": root / "run", "options": options}


def test_pretraining_with_recording_gives_the_same_model(pretrained):
    plain = load_file(pretrained["plain"] / "model.safetensors")
    recorded = load_file(pretrained["run"] / "model" / "model.safetensors")
    assert plain.keys() == recorded.keys()
    assert all(torch.equal(plain[k], recorded[k]) for k in plain)
    store = RunStore.open(pretrained["run"])
    assert store.steps == [0, 5, 10, 15, 20] and store.manifest["source"]["kind"] == "pretrain"
    assert store.checkpoint_steps() == [9, 19]
    assert store.manifest["model_name"] == str(
        (pretrained["run"] / "models" / "step_00000000").resolve()
    )
    saved = sorted(p.name for p in (pretrained["run"] / "models").iterdir())
    assert saved == ["step_00000000", "step_00000010", "step_00000020"]
    tables = A.formation_tables(store, window=2)
    assert tables.transition is not None and len(tables.curve) == 5
    fig = formation_figure(
        tables.curve,
        tables.raster,
        emergence=tables.emergence,
        transition=tables.transition.step,
        near=5,
        onset=tables.onset,
    )
    check_figure(fig)
    assert_trace_equals(trace_named(fig, "edge in the circuit"), z=tables.raster.to_numpy())
    accuracy = trace_named(fig, "dev accuracy (fraction)")
    assert_trace_equals(accuracy, y=tables.curve["dev_accuracy"].to_numpy())


def test_pretraining_resumes_to_the_same_run(pretrained):
    resumed = pretrained["root"] / "resumed"
    shutil.copytree(pretrained["run"], resumed)
    shutil.rmtree(resumed / "model")
    with RunStore.open(resumed) as store:  # as if killed after update 9
        store.truncate_after(9)
    pretrain(resumed, **PRETRAIN, **pretrained["options"], resume=True)
    first, again = RunStore.open(pretrained["run"]), RunStore.open(resumed)
    assert again.steps == first.steps
    assert np.array_equal(first.scores(), again.scores())
    assert np.array_equal(first.masks(), again.masks())
    assert first.evals_frame().equals(again.evals_frame())
    a = load_file(pretrained["run"] / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_track_checkpoints_written_during_pretraining(pretrained, tmp_path, capsys):
    models = pretrained["run"] / "models"
    out = tmp_path / "track"
    probe = ["--n-probe", "8", "--batch-size", "8", "--top-n", "20", "--seed", "1"]
    probe += [f"--task-option=n_{split}=8" for split in ("train", "dev", "test")]
    first_two = [str(models / "step_00000000"), str(models / "step_00000010")]
    assert main(["track", *first_two, "--out", str(out), *probe]) == 0
    assert main(["track", str(models / "step_*"), "--out", str(out), *probe, "--resume"]) == 0
    assert "recorded 3 checkpoints" in capsys.readouterr().out
    store = RunStore.open(out)
    assert store.steps == [0, 10, 20]
    # The recording of the pretraining run saw the same weights at those steps.
    recorded = RunStore.open(pretrained["run"])
    np.testing.assert_allclose(store.scores([20]), recorded.scores([20]), rtol=1e-4, atol=1e-6)

    # Bad input: one line naming the file and the fix.
    bad = tmp_path / "bad"
    assert main(["track", str(models / "nothing_*"), "--out", str(bad)]) == 2
    one_line_error(capsys, "nothing_*", "matches nothing")
    assert main(["track", *reversed(first_two), "--out", str(bad)]) == 2
    one_line_error(capsys, "step_00000000", "does not come after step 10", "training order")
    assert main(["track", *first_two, "--steps", "5,5", "--out", str(bad)]) == 2
    one_line_error(capsys, "step 5 does not come after step 5")
    other = tmp_path / "step_00000030"
    shutil.copytree(models / "step_00000020", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "d_model": 32}))
    assert main(["track", *first_two, str(other), "--out", str(bad)]) == 2
    one_line_error(capsys, str(other), "architecture differs", "d_model", "one training run")
    unnamed = tmp_path / "final"
    shutil.copytree(models / "step_00000020", unnamed)
    assert main(["track", *first_two, str(unnamed), "--out", str(bad)]) == 2
    one_line_error(capsys, "final: no step in the name", "--steps")
    assert main(["track", *first_two, "--out", str(out)]) == 2
    one_line_error(capsys, "already holds a run", "--resume or --overwrite")


def test_track_hugging_face_checkpoints(tmp_path):
    """A series saved with save_pretrained, named like Pythia's revisions (``...-step1000``)."""
    tokenizer = load_word_tokenizer(save_word_tokenizer(build_word_tokenizer(), tmp_path / "tok"))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=1)
    hf = GPT2LMHeadModel(GPT2Config(**{**config.to_dict(), "vocab_size": len(tokenizer)}))
    for step in (1000, 0):  # written out of order: the glob is sorted by step
        hf.save_pretrained(tmp_path / f"tiny-step{step}")
        tokenizer.save_pretrained(tmp_path / f"tiny-step{step}")
        with torch.no_grad():
            for param in hf.parameters():
                param.add_(0.1 * torch.randn_like(param))
    store = track_checkpoints([tmp_path / "tiny-step*"], tmp_path / "run", **RECORD)
    assert store.steps == [0, 1000] and store.graph.n_layers == 2
    assert store.manifest["source"]["checkpoints"][0].endswith("tiny-step0")
    assert store.metrics_frame()["n_edges"].tolist() == [20.0, 20.0]


def test_step_names():
    assert step_from_name("run/models/step_00000150") == 150
    assert step_from_name("checkpoint-500") == 500 and step_from_name("global_step20") == 20
    assert step_from_name("pythia-70m-step3000") == 3000 and step_from_name("1000") == 1000
    assert step_from_name("pythia-70m") is None
    assert checkpoint_steps([Path("a"), Path("b")], [0, 7]) == [0, 7]


def test_pretrain_command_records_and_refuses_to_replace(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), "--steps", "4", "--batch-size", "8"]
    argv += ["--n-eval", "20", "--n-probe", "8", "--top-n", "10"]
    assert main([*argv, "--record-every", "2"]) == 0
    capsys.readouterr()  # the progress bar
    assert RunStore.open(out).steps == [0, 2, 4]
    assert (out / "model" / "model.safetensors").is_file()
    assert "--record-every 2" in json.loads((out / "model" / "metrics.json").read_text())["command"]
    assert main([*argv, "--record-every", "2"]) == 2
    one_line_error(capsys, "already holds a run", "--resume or --overwrite")
    assert main([*argv, "--resume"]) == 2
    one_line_error(capsys, "add --record-every")
    assert main([*argv, "--record-every", "2", "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*argv[:4], "5", *argv[5:], "--record-every", "2", "--resume"]) == 2
    one_line_error(capsys, "other settings", "steps")
