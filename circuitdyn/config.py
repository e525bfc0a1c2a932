"""`TuningConfig`: everything that defines a tuning run, as saved in the run's manifest.

Names of extension points (strategy, method, ablation, selection, policy, task) are checked
against their registries. Each field carries its help text in its metadata; the CLI builds the
``circuitdyn tune`` options from the fields, so a new field is a new option with its help and
default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from circuitdyn.activations import ABLATIONS
from circuitdyn.attribution import METHODS
from circuitdyn.ownership import POLICIES, ParameterPolicy
from circuitdyn.registry import Registry
from circuitdyn.selection import SELECTIONS
from circuitdyn.strategies import STRATEGIES
from circuitdyn.tasks import TASKS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
SCORE_DTYPES = ("float16", "float32")
SCORE_POSITIONS = ("all", "read")

# Presets: the settings a protocol fixes. "paper" is the authors' circuit-tuning protocol (from
# the code of arXiv 2502.06106): mean ablation, scores at the position before each verb, top-n
# node selection, their parameter map, SGD with momentum 0.9 and weight decay 1e-4, 100 warm-up
# steps, no clipping, lr 1e-3, batch 16. Their graph has no input / logits nodes; here those two
# are always in a top_nodes circuit and own no parameters under the "paper" policy, so the
# parameters tuned are the same. Their code keeps only the last head's W_O rows of a layer and one
# element of b_O: bugs, not reproduced ("paper" tunes every circuit head's W_O rows and b_O).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "ours": {},
    "paper": {
        "ablation": "mean",
        "score_positions": "read",
        "selection": "top_nodes",
        "policy": "paper",
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_steps": 100,
        "grad_clip": None,
        "lr": 1e-3,
        "batch_size": 16,
    },
}


def _option(default: Any, help: str, *, choices: Any = None) -> Any:
    """A config field with its CLI help (and its choices: a tuple or a `Registry`)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TuningConfig:
    """Everything that defines a tuning run; saved in the run's manifest (`to_dict`)."""

    protocol: str = _option(
        "ours",
        "a preset: 'paper' fixes the authors' protocol (mean ablation, read positions, top_nodes, "
        "their parameter map, SGD 0.9 / wd 1e-4, 100 warm-up steps, no clipping, lr 1e-3, "
        "batch 16)",
        choices=tuple(PROTOCOLS),
    )
    model: str = _option("default", "'default' (embedded), a TransformerLens name or a directory")
    task: str = _option("disagreement", "the task to tune on", choices=TASKS)
    task_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "options of the task's constructor (e.g. path= of an sv-jsonl file)"},
    )
    strategy: str = _option("circuit", "which parameters the updates tune", choices=STRATEGIES)
    top_n: int = _option(200, "circuit size: edges, or nodes for the top_nodes rule")
    top_n_final: int | None = _option(None, "if set, n moves linearly from top-n to this")
    selection: str = _option("top_edges", "circuit-selection rule", choices=SELECTIONS)
    absolute: bool = _option(True, "rank by |score| (else by the signed score)")
    research_every: int = _option(1, "K: re-search the circuit every K steps (strategy circuit)")
    record_every: int = _option(1, "attribute every this many steps for the other strategies")
    mlp_blocks: int = _option(1, "MLP nodes per layer: each MLP split into this many neuron blocks")
    method: str = _option("eap", "attribution method", choices=METHODS)
    ablation: str | None = _option(
        None, "what an ablated edge carries (none: the task's default)", choices=ABLATIONS
    )
    score_positions: str = _option(
        "all",
        "positions whose activations are ablated and scored: all, or only the read positions "
        "(the position before each verb, as the paper)",
        choices=SCORE_POSITIONS,
    )
    ig_steps: int = _option(5, "integrated-gradient steps (method eap-ig)")
    policy: str = _option("nodes", "parameters that belong to no node", choices=POLICIES)
    lora_rank: int = _option(
        8, "rank r of the LoRA adapters (strategy lora) on W_Q/W_K/W_V/W_O per head, W_in, W_out"
    )
    steps: int = _option(300, "optimizer steps")
    batch_size: int = _option(16, "examples per micro-batch")
    grad_accum: int = _option(1, "micro-batches per optimizer step")
    optimizer: str = _option("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = _option(1e-3, "peak learning rate")
    momentum: float = _option(0.9, "SGD momentum")
    betas: tuple[float, float] = _option((0.9, 0.999), "AdamW betas")
    weight_decay: float = _option(0.0, "weight decay (of the tuned entries only)")
    warmup_steps: int = _option(0, "linear warm-up steps")
    schedule: str = _option("constant", "learning-rate schedule after warm-up", choices=SCHEDULES)
    grad_clip: float | None = _option(1.0, "clip the gradient norm to this")
    eval_every: int = _option(25, "dev evaluation every this many steps")
    n_eval: int = _option(256, "examples per evaluation")
    eval_faithfulness: bool = _option(
        True, "measure the circuit's faithfulness at each evaluation (a patched run)"
    )
    checkpoint_every: int = _option(50, "checkpoint every this many steps")
    keep_checkpoints: int | None = _option(None, "keep only the newest k checkpoints (none: all)")
    score_dtype: str = _option("float16", "dtype of stored edge scores", choices=SCORE_DTYPES)
    seed: int = _option(0, "seed of data order, random circuits and initial RNG state")

    def __post_init__(self) -> None:
        self._apply_protocol()
        if self.ablation is None:
            self.ablation = TASKS[self.task].default_ablation
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if isinstance(choices, Registry):
                setattr(self, f.name, choices.check(value))
            elif choices is not None and value not in choices:
                raise ValueError(
                    f"TuningConfig.{f.name} must be one of {', '.join(choices)}, got {value!r}"
                )
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2:
            raise ValueError(f"TuningConfig.betas needs two numbers, got {self.betas}")
        positive = ("top_n", "research_every", "record_every", "steps", "batch_size", "grad_accum")
        for name in (
            *positive,
            "eval_every",
            "checkpoint_every",
            "n_eval",
            "ig_steps",
            "mlp_blocks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"TuningConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("top_n_final", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TuningConfig.{name} must be >= 1 or None, got {value}")
        if not self.lr > 0:
            raise ValueError(f"TuningConfig.lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TuningConfig.grad_clip must be > 0 or None, got {self.grad_clip}")

    def _apply_protocol(self) -> None:
        """Set what the protocol fixes; a field set to something else is an error."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"TuningConfig.protocol must be one of {', '.join(PROTOCOLS)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in PROTOCOLS[self.protocol].items():
            given = getattr(self, name)
            if given != defaults[name] and given != value:
                raise ValueError(
                    f"protocol {self.protocol!r} fixes {name}={value!r}, but {name}={given!r} was "
                    f"given; drop that option or use protocol 'ours'"
                )
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TuningConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(payload) - known
        if unknown:
            raise ValueError(f"unknown TuningConfig fields {sorted(unknown)}")
        payload = dict(payload)
        if "betas" in payload:  # JSON has no tuples
            payload["betas"] = tuple(payload["betas"])
        if isinstance(payload.get("policy"), dict):  # runs saved before policies had names
            policy = ParameterPolicy(**payload["policy"])
            names = [name for name in POLICIES if POLICIES[name] == policy]
            if not names:
                raise ValueError(f"the saved parameter policy {policy} has no registered name")
            payload["policy"] = names[0]
        return cls(**payload)

    def n_at(self, step: int) -> int:
        """Circuit size asked for at `step` (the optional linear schedule of n)."""
        if self.top_n_final is None or self.steps <= 1:
            return self.top_n
        frac = step / (self.steps - 1)
        return round(self.top_n + frac * (self.top_n_final - self.top_n))

    def lr_at(self, step: int) -> float:
        """Learning rate of update `step`: linear warm-up, then the schedule."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = [
    "OPTIMIZERS",
    "PROTOCOLS",
    "SCHEDULES",
    "SCORE_DTYPES",
    "SCORE_POSITIONS",
    "TuningConfig",
]
