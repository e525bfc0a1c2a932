"""Tasks: the `Task` contract and its implementations, and `load_task` to build one by name.

Names: ``agreement``, ``disagreement``, ``general`` (the embedded agreement language; see
`circuitdyn.tasks.agreement_tasks`), ``determiner``, ``selection``, ``copy`` (capabilities of
the same language that (dis)agreement does not target; see `circuitdyn.tasks.capabilities`;
`capability_tasks` builds those that go with a task) and ``sv-jsonl`` (the paper's file format
for models with their own tokenizer; see `circuitdyn.tasks.sv_jsonl`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from circuitdyn.registry import Registry
from circuitdyn.tasks.agreement_tasks import AgreementTask
from circuitdyn.tasks.base import Batch, Metric, Task, accuracy, lm_loss, logit_diff
from circuitdyn.tasks.capabilities import CAPABILITIES, CapabilityTask, capability_suite
from circuitdyn.tasks.sv_jsonl import SvJsonlTask
from circuitdyn.tasks.text import TextTask


@dataclass(frozen=True)
class TaskSpec:
    """How to build a task: ``build(tokenizer, model_cfg, seed, twins, **options) -> Task``
    (`model_cfg` is the model's config or None; `twins`: corrupted twins are needed). `general`,
    when set, builds the general-capability task that tuning evaluates beside it, from the same
    arguments. `capabilities`, when set, builds the capability tasks evaluated beside it, by name,
    from the same arguments (options ``n_train`` / ``n_dev`` / ``n_test`` size their splits).
    `needs_data`: the task reads a file (option ``path``, the CLI's ``--data``).
    `default_ablation`: the ablation used when none is chosen."""

    build: Callable[..., Task]
    general: Callable[..., Task] | None = None
    capabilities: Callable[..., dict[str, Task]] | None = None
    needs_data: bool = False
    default_ablation: str = "corrupted"


def _agreement_mode(mode: str) -> Callable[..., Task]:
    def build(tokenizer: Any, cfg: Any, seed: int, twins: bool, **options: Any) -> Task:
        if "mode" in options:
            raise ValueError(f"the task name {mode!r} already sets the mode; drop mode=")
        return AgreementTask(tokenizer, mode=mode, seed=seed, **options)

    return build


def _general_of_agreement(tokenizer: Any, cfg: Any, seed: int, twins: bool, **options: Any) -> Task:
    sizes = {k: v for k, v in options.items() if k in ("n_train", "n_dev", "n_test")}
    return AgreementTask(tokenizer, mode="general", seed=seed, **sizes)


def _capability(name: str) -> Callable[..., Task]:
    def build(tokenizer: Any, cfg: Any, seed: int, twins: bool, **options: Any) -> Task:
        if twins:
            raise ValueError(
                f"the {name!r} task has no corrupted twins: use ablation 'mean' or 'zero' "
                "(--ablation mean; load_task(..., twins=False))"
            )
        return CapabilityTask(tokenizer, capability=name, seed=seed, **options)

    return build


def _capabilities_of_agreement(
    tokenizer: Any, cfg: Any, seed: int, twins: bool, **options: Any
) -> dict[str, Task]:
    sizes = {k: v for k, v in options.items() if k in ("n_train", "n_dev", "n_test")}
    return dict(capability_suite(tokenizer, seed=seed, **sizes))


def _sv_jsonl(tokenizer: Any, cfg: Any, seed: int, twins: bool, **options: Any) -> Task:
    # Splits come from a stable hash of each row, so the seed does not apply.
    options.pop("general_data", None)
    if cfg is not None and "prepend_bos" not in options:
        options["prepend_bos"] = bool(getattr(cfg, "default_prepend_bos", True))
    return SvJsonlTask(tokenizer, twins=twins, **options)


def _general_of_sv_jsonl(tokenizer: Any, cfg: Any, seed: int, twins: bool, **options: Any) -> Task:
    """LM loss on a held-out text file (option ``general_data``), else on the non-verb tokens of
    the sv-jsonl file's own held-out splits."""
    path = options.pop("general_data", None)
    bos = options.get("prepend_bos", bool(getattr(cfg, "default_prepend_bos", True)))
    if path is not None:
        return TextTask(tokenizer, path=path, prepend_bos=bos)
    kept = {k: v for k, v in options.items() if k not in ("verb_weight", "strict")}
    with warnings.catch_warnings():  # the skipped rows were reported by the task itself
        warnings.simplefilter("ignore")
        return _sv_jsonl(tokenizer, cfg, seed, False, **kept, verb_weight=0.0)


TASKS: Registry[TaskSpec] = Registry("task")
TASKS.add(
    "agreement",
    TaskSpec(
        _agreement_mode("agreement"),
        general=_general_of_agreement,
        capabilities=_capabilities_of_agreement,
    ),
    help="subject-verb agreement in the embedded language",
)
TASKS.add(
    "disagreement",
    TaskSpec(
        _agreement_mode("disagreement"),
        general=_general_of_agreement,
        capabilities=_capabilities_of_agreement,
    ),
    help="subject-verb disagreement in the embedded language (the paper's tuning task)",
)
TASKS.add(
    "general",
    TaskSpec(_agreement_mode("general")),
    help="next-token loss on the non-verb tokens of the embedded language",
)
_CAPABILITY_HELP = {
    "determiner": "determiner-noun number agreement in the embedded language (these keys)",
    "selection": "the object classes verbs allow in the embedded language (opens the door)",
    "copy": "copying a sentence of the embedded language a second time (induction)",
}
for _name in CAPABILITIES:
    TASKS.add(
        _name, TaskSpec(_capability(_name), default_ablation="mean"), help=_CAPABILITY_HELP[_name]
    )
TASKS.add(
    "sv-jsonl",
    TaskSpec(_sv_jsonl, general=_general_of_sv_jsonl, needs_data=True, default_ablation="mean"),
    help="the paper's subject-verb JSONL files, for models with their own tokenizer",
)

__all__ = [
    "TASKS",
    "AgreementTask",
    "Batch",
    "CapabilityTask",
    "Metric",
    "SvJsonlTask",
    "Task",
    "TaskSpec",
    "TextTask",
    "accuracy",
    "capability_tasks",
    "general_task",
    "lm_loss",
    "load_task",
    "logit_diff",
]


def load_task(
    name: str, model_or_tokenizer: Any, *, seed: int = 0, twins: bool = True, **options: Any
) -> Task:
    """Build the task `name` (a `TASKS` name) for a model (a HookedTransformer; its tokenizer is
    used) or a tokenizer. `options` go to the task's constructor (`AgreementTask`,
    `CapabilityTask` or `SvJsonlTask`); for ``sv-jsonl``, ``prepend_bos`` defaults to the model's
    ``cfg.default_prepend_bos``. `twins`: the run needs corrupted twins (corrupted ablation);
    a file-based task then uses only rows whose twins align, and a task without twins
    (``determiner``, ``selection``, ``copy``) refuses (pass twins=False)."""
    spec = TASKS[name]
    cfg = getattr(model_or_tokenizer, "cfg", None)
    return spec.build(_tokenizer_of(model_or_tokenizer), cfg, seed, twins, **options)


def general_task(
    name: str, model_or_tokenizer: Any, *, seed: int = 0, **options: Any
) -> Task | None:
    """The general-capability task that goes with task `name`, or None when it has none."""
    spec = TASKS[name]
    if spec.general is None:
        return None
    cfg = getattr(model_or_tokenizer, "cfg", None)
    return spec.general(_tokenizer_of(model_or_tokenizer), cfg, seed, False, **options)


def capability_tasks(
    name: str, model_or_tokenizer: Any, *, seed: int = 0, **options: Any
) -> dict[str, Task]:
    """The capability tasks that go with task `name` (``{"determiner": ..., "selection": ...,
    "copy": ...}`` for the agreement tasks), or {} when it has none. Options ``n_train`` /
    ``n_dev`` / ``n_test`` size their splits; the others are the main task's and are ignored."""
    spec = TASKS[name]
    if spec.capabilities is None:
        return {}
    cfg = getattr(model_or_tokenizer, "cfg", None)
    return spec.capabilities(_tokenizer_of(model_or_tokenizer), cfg, seed, False, **options)


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
