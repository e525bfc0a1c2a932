"""Model loading and saving, the shipped default model's quality, and pretraining's code path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from circuitdyn.cli import main
from circuitdyn.models import (
    DEFAULT_MODEL_DIR,
    ModelUnavailableError,
    default_device,
    load_model,
    save_model,
)
from circuitdyn.pretrain import heldout_metrics, pretrain
from circuitdyn.tasks import load_task
from circuitdyn.tasks.agreement_tasks import AgreementTask
from circuitdyn.tasks.word_tokenizer import (
    build_word_tokenizer,
    load_word_tokenizer,
    save_word_tokenizer,
)


@pytest.fixture(scope="module")
def model():
    return load_model("default", device="cpu")


def test_default_model_loads_offline_with_its_tokenizer(model) -> None:
    assert model.cfg.n_layers >= 2 and model.cfg.n_heads >= 4
    assert model.cfg.normalization_type == "LN"
    assert model.cfg.positional_embedding_type == "standard"
    assert model.cfg.device in ("cpu", torch.device("cpu"))
    assert not model.training
    tokens = model.to_tokens("the keys to the cabinet are red .")
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert model.to_string(tokens[0, 1:]) == "the keys to the cabinet are red ."
    assert all(p.requires_grad for p in model.parameters())
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    assert default_device().type in ("cpu", "cuda")


def count_agreement(model, n: int, seed: int) -> dict[str, float]:
    """Held-out agreement counted sentence by sentence from the text alone: at the word before
    each verb, does the verb's correct form outscore its other-number form?"""
    task = AgreementTask(model.tokenizer, mode="general", n_train=0, n_dev=0, n_test=n, seed=seed)
    correct, attractor_correct, diffs = [], [], []
    vocab = model.tokenizer.get_vocab()
    by_length: dict[int, list] = {}  # one forward pass per sentence length
    for pair in task.pairs("test"):
        by_length.setdefault(len(pair.clean.words), []).append(pair.clean)
    for length, sentences in by_length.items():
        tokens = torch.cat([model.to_tokens(sentence.text) for sentence in sentences])
        assert tokens.shape[1] == length  # word-level: token i is word i
        with torch.no_grad():
            logits = model(tokens)
        for row, sentence in enumerate(sentences):
            for verb in sentence.verbs:
                at = logits[row, verb.position - 1]
                diff = float(at[vocab[verb.form]] - at[vocab[verb.alternative]])
                diffs.append(diff)
                correct.append(diff > 0)
                if verb.attractor:
                    attractor_correct.append(diff > 0)
    return {
        "accuracy": sum(correct) / len(correct),
        "attractor_accuracy": sum(attractor_correct) / len(attractor_correct),
        "logit_diff": sum(diffs) / len(diffs),
        "n_verbs": len(correct),
        "n_attractor_verbs": len(attractor_correct),
    }


def test_default_model_agrees_on_held_out_sentences(model) -> None:
    counted = count_agreement(model, n=300, seed=1)
    assert counted["n_attractor_verbs"] > 60
    assert counted["accuracy"] >= 0.99
    assert counted["attractor_accuracy"] >= 0.99
    assert counted["logit_diff"] > 2.0
    # heldout_metrics (what pretrain reports) gives the same numbers on the same sentences.
    metrics = heldout_metrics(model, n=300, seed=1)
    for key in ("accuracy", "attractor_accuracy", "n_verbs", "n_attractor_verbs"):
        assert metrics[key] == counted[key], key
    assert metrics["logit_diff"] == pytest.approx(counted["logit_diff"], rel=1e-5)
    for name in ("determiner", "selection", "copy"):
        assert metrics[f"{name}_accuracy"] >= 0.99, name


def test_default_model_prefers_agreement_over_disagreement(model) -> None:
    task = load_task("disagreement", model, n_train=0, n_dev=0, n_test=100, seed=2)
    batch = next(task.batches("test", 100))
    with torch.no_grad():
        assert float(task.metric(model(batch.clean), batch).mean()) < -2.0


def test_loading_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_model("default", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_save_and_load_a_model_directory(model, tmp_path: Path) -> None:
    save_model(model, tmp_path / "copy")
    assert {p.name for p in (tmp_path / "copy").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer",
    }
    again = load_model(tmp_path / "copy", device="cpu")
    tokens = model.to_tokens(["the dogs near the door sleep .", "my key is old ."])
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))
    half = load_model(tmp_path / "copy", device="cpu", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def _tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size, bos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


def test_tiny_local_gpt2_matches_hugging_face_logits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_pretrained"):
        load_model("gpt2", hf_model=_tiny_gpt2(8), tokenizer=build_word_tokenizer())
    tokenizer = load_word_tokenizer(save_word_tokenizer(build_word_tokenizer(), tmp_path / "tok"))
    hf = _tiny_gpt2(len(tokenizer))
    tokens = torch.tensor([tokenizer("the keys to the cabinet are red .")["input_ids"]])
    with torch.no_grad():
        expected = hf(tokens).logits
    in_memory = load_model("gpt2", device="cpu", hf_model=hf, tokenizer=tokenizer)
    assert (in_memory.cfg.n_layers, in_memory.cfg.d_model) == (2, 32)
    hf.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    from_dir = load_model(tmp_path / "tiny", device="cpu")  # its tokenizer is found there too
    assert from_dir.tokenizer is not None
    with torch.no_grad():
        for tl_model in (in_memory, from_dir):
            assert torch.allclose(tl_model(tokens), expected, atol=1e-4)
    # Weights are not folded or centred: the LayerNorm weights are parameters.
    assert "blocks.0.ln1.w" in dict(from_dir.named_parameters())
    # A converted model saves and reloads in circuitdyn's own format.
    save_model(from_dir, tmp_path / "tl")
    with torch.no_grad():
        assert torch.allclose(
            load_model(tmp_path / "tl", device="cpu")(tokens), expected, atol=1e-4
        )


def test_unknown_and_unreachable_models_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown model 'no-such-model-xyz'"):
        load_model("no-such-model-xyz")
    # Offline mode makes the hub fail at once instead of retrying for half a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError) as error:
        load_model("gpt2")
    message = str(error.value)
    assert "could not be downloaded" in message
    assert "HF_HOME" in message and "load_model('default')" in message


def test_load_model_keeps_the_deprecation_warning_local() -> None:
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model("default", device="cpu")
    assert not [w for w in caught if "deprecated" in str(w.message)]
    assert warnings.filters == filters  # nothing was silenced for the caller


def test_pretrain_quick_run_writes_a_loadable_model(tmp_path: Path) -> None:
    metrics = pretrain(tmp_path / "m", steps=8, batch_size=16, n_eval=40, progress=False, seed=3)
    assert set(metrics) >= {"accuracy", "attractor_accuracy", "lm_loss_non_verb", "wall_time_s"}
    assert set(metrics) >= {"determiner_accuracy", "selection_accuracy", "copy_accuracy"}
    record = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert record["training"]["steps"] == 8
    model = load_model(tmp_path / "m", device="cpu")
    # The recorded held-out numbers are those of the saved weights, measured again.
    again_metrics = heldout_metrics(model, n=40, seed=3)
    for key, value in again_metrics.items():
        assert record["heldout"][key] == pytest.approx(value, rel=1e-6), key
    assert (
        load_word_tokenizer(tmp_path / "m" / "tokenizer").get_vocab() == model.tokenizer.get_vocab()
    )
    # Same seed, same weights.
    pretrain(tmp_path / "m2", steps=8, batch_size=16, n_eval=40, progress=False, seed=3)
    again = load_model(tmp_path / "m2", device="cpu")
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_pretrain_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["pretrain", "--out", str(out), "--steps", "3", "--batch-size", "8", "--n-eval", "20"]
    assert main([*argv, "--seed", "1"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert f"circuitdyn pretrain --out {out} --seed 1 --steps 3 --batch-size 8" in record["command"]
    assert record["training"]["seed"] == 1 and record["training"]["steps"] == 3
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_pretraining_learns_the_language(tmp_path: Path) -> None:
    # Agreement is learned abruptly after a few hundred steps; at 1500 it is near perfect
    # (about 1-3 minutes on 2 CPU cores; OMP_NUM_THREADS=1 is fastest for this tiny model).
    metrics = pretrain(tmp_path / "m", steps=1500, n_eval=300, progress=False)
    assert metrics["lm_loss_non_verb"] < 3.4
    assert metrics["accuracy"] > 0.95
    assert metrics["attractor_accuracy"] > 0.9
