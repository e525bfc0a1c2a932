"""The authors' protocol as a preset, and their parameter map as a policy."""

import pytest
import torch

from circuitdyn.circuit import Circuit
from circuitdyn.cli import main
from circuitdyn.config import PROTOCOLS, TuningConfig
from circuitdyn.graph import Graph
from circuitdyn.ownership import parameter_masks
from circuitdyn.store import RunStore
from circuitdyn.tuning import tune


def test_paper_map_tunes_whole_qkv_layers_and_mlp_sides(model):
    graph = Graph.from_model(model)  # 2 layers x 4 heads, d_model 32, d_head 8, d_mlp 64
    circuit = Circuit.from_edges(graph, ["a0.h1->a1.h0<q>", "a1.h2->logits", "input->m0"])
    paper = parameter_masks(model, circuit, "paper")
    ours = parameter_masks(model, circuit, "nodes")
    for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
        assert bool(paper[f"blocks.1.attn.{name}"].all()), name  # every head of layer 1
        assert not bool(paper[f"blocks.0.attn.{name}"].any()), name
    head0 = torch.zeros(4, dtype=torch.bool)
    head0[0] = True
    assert torch.equal(ours["blocks.1.attn.W_Q"].any(dim=(1, 2)), head0)  # ours: head 0's rows
    assert not bool(ours["blocks.1.attn.W_K"].any())
    # Outputs: W_O rows of each circuit head (a0.h1 and a1.h2), and b_O of their layers.
    for layer, head in ((0, 1), (1, 2)):
        rows = paper[f"blocks.{layer}.attn.W_O"].any(dim=(1, 2))
        assert rows.tolist() == [h == head for h in range(4)]
        assert bool(paper[f"blocks.{layer}.attn.b_O"].all())
    # m0 has an edge into it and none out: its input side only.
    assert bool(paper["blocks.0.mlp.W_in"].all()) and bool(paper["blocks.0.mlp.b_in"].all())
    assert not bool(paper["blocks.0.mlp.W_out"].any()) and not bool(
        paper["blocks.0.mlp.b_out"].any()
    )
    assert bool(ours["blocks.0.mlp.W_out"].all())  # ours: a node owns both sides


def test_paper_map_with_mlp_blocks(model):
    graph = Graph.from_model(model, mlp_blocks=4)
    circuit = Circuit.from_edges(graph, ["input->m1.b01", "m1.b03->logits"])
    paper = parameter_masks(model, circuit, "paper")
    columns = paper["blocks.1.mlp.W_in"].any(dim=0)
    rows = paper["blocks.1.mlp.W_out"].any(dim=1)
    assert columns.tolist() == [16 <= i < 32 for i in range(64)]
    assert rows.tolist() == [48 <= i < 64 for i in range(64)]


def test_preset_fixes_its_settings_and_refuses_others():
    config = TuningConfig(protocol="paper")
    for name, value in PROTOCOLS["paper"].items():
        assert getattr(config, name) == value, name
    assert TuningConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"fixes weight_decay=0\.0001"):
        TuningConfig(protocol="paper", weight_decay=0.5)


def test_paper_preset_runs_and_is_a_cli_option(tmp_path, capsys):
    settings = dict(
        task_options={"n_train": 32, "n_dev": 16, "n_test": 16},
        top_n=6,
        steps=2,
        eval_every=2,
        n_eval=8,
        mlp_blocks=4,
    )
    tune(TuningConfig(protocol="paper", **settings), tmp_path / "run", progress=False)
    store = RunStore.open(tmp_path / "run")
    assert store.config.selection == "top_nodes" and store.config.policy == "paper"
    nodes = store.metrics_frame()["n_nodes"]
    assert (nodes == 6 + 2).all()  # 6 heads / MLP blocks, input and logits
    code = main(
        ["tune", "--protocol", "paper", "--ablation", "corrupted", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "fixes ablation='mean'" in err
