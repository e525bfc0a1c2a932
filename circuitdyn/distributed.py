"""Data parallelism under ``torchrun``: one `DistContext` per process, passed explicitly.

``torchrun --nproc-per-node N`` starts N copies of a command and tells each its ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; `DistContext.from_environment` joins them into one
``torch.distributed`` process group (gloo on CPU, NCCL on CUDA, each rank on
``cuda:LOCAL_RANK``). Outside torchrun it returns the single-process context, whose operations
are the identity, so the library has one code path.

How circuit-tuning splits the work (`circuitdyn.tuning`): every rank reads the same global
stream of batches and keeps its own contiguous rows of each batch (`DistContext.shard`), so N
ranks see exactly the examples one process sees with the same ``--batch-size``. Attribution
scores are summed over each rank's examples and all-reduced, so every rank divides the same
global sum by the same count and selects the same circuit; the model is wrapped in
`DistributedDataParallel`, whose backward averages the gradients (the local losses are scaled
so that the average is the global loss); the parameter masks are applied after that
all-reduce, so frozen entries keep an exactly zero gradient. Only rank 0 writes the run store
and evaluates; the other ranks read checkpoints from it when resuming.

Failures: the process group has a timeout (`timeout_s`), so a rank waiting for a dead peer
raises instead of hanging, and torchrun stops every rank when one exits with an error. Errors
every rank detects alike (bad options) are raised as the error on rank 0 and as `PeerError`
(printed by nobody) on the others, so the user reads one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from circuitdyn.scores import Scores
from circuitdyn.tasks.base import Batch

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 600.0


class PeerError(RuntimeError):
    """Raised on ranks other than 0 for an error that rank 0 reports to the user."""


class PeerLostError(RuntimeError):
    """A collective failed: another process of the job died or stopped answering."""


@contextmanager
def _collective(what: str, rank: int) -> Iterator[None]:
    """Name the likely cause when a collective fails (a peer died: the backend says
    "connection reset" or times out)."""
    try:
        yield
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise PeerLostError(
            f"rank {rank} lost another process during {what} ({first}); torchrun's summary "
            "names the rank that failed first; fix it and rerun with --resume"
        ) from error


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def fail(message: str, kind: type[Exception] = ValueError) -> Exception:
    """The error to raise for a problem every rank sees alike: `kind` on rank 0 (the user
    reads it), `PeerError` elsewhere (silent)."""
    return kind(message) if env_rank() == 0 else PeerError(message)


@dataclass(frozen=True)
class DistContext:
    """This process's place among the ranks of a data-parallel job.

    ``world_size == 1`` (no process group) is the plain single-process run: every collective
    is the identity there."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the caller's default device
    backend: str | None = None
    _group: Any = field(default=None, repr=False, compare=False)

    # ---- setup ------------------------------------------------------------------------------
    @classmethod
    def from_environment(
        cls, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> DistContext:
        """Join the torchrun job this process belongs to (``WORLD_SIZE`` set), or return the
        single-process context. `backend`: ``auto`` (NCCL when CUDA is available, else gloo),
        ``gloo`` or ``nccl``; `timeout_s`: how long a collective waits for a peer (s)."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        if backend not in BACKENDS:
            raise fail(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        cuda = torch.cuda.is_available()
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        available = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available() and cuda}
        if not dist.is_available() or not available[backend]:
            other = [name for name, ok in available.items() if ok]
            raise fail(
                f"--backend {backend} is not available on this machine"
                + (f"; use --backend {other[0]}" if other else " (torch built without it)")
            )
        if timeout_s <= 0:
            raise fail(f"--dist-timeout must be positive, got {timeout_s}")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, local, device, backend, dist.group.WORLD)

    def close(self) -> None:
        """Leave the process group (the single-process context has none)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- data -------------------------------------------------------------------------------
    def check_divides(self, batch_size: int, what: str = "--batch-size") -> None:
        """A batch of `batch_size` examples must split evenly over the ranks."""
        if batch_size % self.world_size:
            raise fail(
                f"{what} {batch_size} does not split over {self.world_size} processes; use a "
                f"multiple of {self.world_size} (or --nproc-per-node dividing {batch_size})"
            )

    def shard(self, batch: Batch) -> Batch:
        """This rank's contiguous rows of `batch` (the whole batch on one process)."""
        if not self.distributed:
            return batch
        self.check_divides(batch.size, "a batch of")
        per = batch.size // self.world_size
        return batch.select(slice(self.rank * per, (self.rank + 1) * per))

    # ---- collectives ------------------------------------------------------------------------
    def collective(self, what: str) -> AbstractContextManager[None]:
        """Name a lost peer (`PeerLostError`) when the collectives inside fail, e.g. the
        gradient all-reduce of DDP's backward; nothing on one process."""
        return _collective(what, self.rank) if self.distributed else nullcontext()

    def sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over the ranks (in place; returned for chaining). gloo reduces CPU
        tensors and NCCL CUDA ones: the tensor visits the backend's device if needed."""
        if not self.distributed:
            return tensor
        home = self.device if self.device is not None else tensor.device
        moved = tensor.to(home)
        with _collective("an all-reduce", self.rank):
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def check_same(self, value: Any, what: str) -> None:
        """Every rank must pass the same JSON-serialisable `value` (e.g. its options)."""
        if not self.distributed:
            return
        mine = json.dumps(value, sort_keys=True, default=str)
        gathered: list[Any] = [None] * self.world_size
        with _collective("the option check", self.rank):
            dist.all_gather_object(gathered, mine)
        differing = [rank for rank, text in enumerate(gathered) if text != gathered[0]]
        if differing:
            raise fail(
                f"{what} differ across processes (ranks {differing} disagree with rank 0); "
                "start every rank with the same command line"
            )

    def mean_scores(self, scores: Scores) -> Scores:
        """The mean over every rank's examples of per-rank mean `scores` (each rank's
        ``meta["n_examples"]`` weighs it); the same `Scores` on every rank."""
        if not self.distributed:
            return scores
        n_local = float(scores.meta["n_examples"])
        summed = self.sum(scores.edges.double() * n_local)
        n = self.sum(torch.tensor(n_local, dtype=torch.float64))
        return Scores(scores.graph, summed / n, scores.meta | {"n_examples": int(n)})

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only and let the others wait for it; an error raised there is
        raised on every rank (the original on rank 0, `PeerError` elsewhere) instead of leaving
        the others blocked in the next collective."""
        if not self.distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as caught:  # re-raised below, after the others have heard of it
                error = caught
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        with _collective("a broadcast from rank 0", self.rank):
            dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise PeerError(f"rank 0 failed: {message[0]}")
        return result

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (picklable) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        with _collective("a broadcast from rank 0", self.rank):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- models -----------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in `DistributedDataParallel` (the model itself on one process). Buffers are
        not synchronised at each forward: TransformerLens's buffers are constants."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = (
            [self.device] if self.device is not None and self.device.type == "cuda" else None
        )
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def no_sync(self, wrapped: torch.nn.Module, last: bool) -> AbstractContextManager[Any]:
        """Skip the gradient all-reduce for a micro-batch that is not the step's `last`."""
        if last or not self.distributed:
            return nullcontext()
        return wrapped.no_sync()


SINGLE = DistContext()
"""The single-process context (immutable)."""

__all__ = [
    "BACKENDS",
    "DEFAULT_TIMEOUT_S",
    "SINGLE",
    "DistContext",
    "PeerError",
    "PeerLostError",
    "env_rank",
    "fail",
]
