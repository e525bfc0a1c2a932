"""Tasks: the `Task` contract and its implementations, and `load_task` to build one by name.

Names: ``agreement``, ``disagreement``, ``general`` (the embedded agreement language; see
`circuitdyn.tasks.agreement_tasks`) and ``sv-jsonl`` (the paper's file format for models with
their own tokenizer; see `circuitdyn.tasks.sv_jsonl`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from circuitdyn.registry import Registry
from circuitdyn.tasks.agreement_tasks import AgreementTask
from circuitdyn.tasks.base import Batch, Metric, Task, accuracy, lm_loss, logit_diff
from circuitdyn.tasks.sv_jsonl import SvJsonlTask


@dataclass(frozen=True)
class TaskSpec:
    """How to build a task: ``build(tokenizer, model_cfg, seed, **options) -> Task`` (`model_cfg`
    is the model's config or None). `general`, when set, builds the general-capability task that
    tuning evaluates beside it, from the same arguments. `needs_data`: the task reads a file
    (option ``path``, the CLI's ``--data``)."""

    build: Callable[..., Task]
    general: Callable[..., Task] | None = None
    needs_data: bool = False


def _agreement_mode(mode: str) -> Callable[..., Task]:
    def build(tokenizer: Any, cfg: Any, seed: int, **options: Any) -> Task:
        if "mode" in options:
            raise ValueError(f"the task name {mode!r} already sets the mode; drop mode=")
        return AgreementTask(tokenizer, mode=mode, seed=seed, **options)

    return build


def _general_of_agreement(tokenizer: Any, cfg: Any, seed: int, **options: Any) -> Task:
    sizes = {k: v for k, v in options.items() if k in ("n_train", "n_dev", "n_test")}
    return AgreementTask(tokenizer, mode="general", seed=seed, **sizes)


def _sv_jsonl(tokenizer: Any, cfg: Any, seed: int, **options: Any) -> Task:
    # Splits come from a stable hash of each row, so the seed does not apply.
    if cfg is not None and "prepend_bos" not in options:
        options["prepend_bos"] = bool(getattr(cfg, "default_prepend_bos", True))
    return SvJsonlTask(tokenizer, **options)


TASKS: Registry[TaskSpec] = Registry("task")
TASKS.add(
    "agreement",
    TaskSpec(_agreement_mode("agreement"), general=_general_of_agreement),
    help="subject-verb agreement in the embedded language",
)
TASKS.add(
    "disagreement",
    TaskSpec(_agreement_mode("disagreement"), general=_general_of_agreement),
    help="subject-verb disagreement in the embedded language (the paper's tuning task)",
)
TASKS.add(
    "general",
    TaskSpec(_agreement_mode("general")),
    help="next-token loss on the non-verb tokens of the embedded language",
)
TASKS.add(
    "sv-jsonl",
    TaskSpec(_sv_jsonl, needs_data=True),
    help="the paper's subject-verb JSONL files, for models with their own tokenizer",
)

__all__ = [
    "TASKS",
    "AgreementTask",
    "Batch",
    "Metric",
    "SvJsonlTask",
    "Task",
    "TaskSpec",
    "accuracy",
    "general_task",
    "lm_loss",
    "load_task",
    "logit_diff",
]


def load_task(name: str, model_or_tokenizer: Any, *, seed: int = 0, **options: Any) -> Task:
    """Build the task `name` (a `TASKS` name) for a model (a HookedTransformer; its tokenizer is
    used) or a tokenizer. `options` go to the task's constructor (`AgreementTask` or
    `SvJsonlTask`); for ``sv-jsonl``, ``prepend_bos`` defaults to the model's
    ``cfg.default_prepend_bos``."""
    spec = TASKS[name]
    return spec.build(
        _tokenizer_of(model_or_tokenizer), getattr(model_or_tokenizer, "cfg", None), seed, **options
    )


def general_task(
    name: str, model_or_tokenizer: Any, *, seed: int = 0, **options: Any
) -> Task | None:
    """The general-capability task that goes with task `name`, or None when it has none."""
    spec = TASKS[name]
    if spec.general is None:
        return None
    return spec.general(
        _tokenizer_of(model_or_tokenizer), getattr(model_or_tokenizer, "cfg", None), seed, **options
    )


def _tokenizer_of(model_or_tokenizer: Any) -> PreTrainedTokenizerBase:
    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None)
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    raise ValueError(
        "load_task needs a model with a tokenizer (model.tokenizer) or a Hugging Face tokenizer, "
        f"got {type(model_or_tokenizer).__name__}"
    )
