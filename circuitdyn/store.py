"""`RunStore`: the on-disk record of one training run.

A run directory holds::

    manifest.json          format marker and version, package versions, score dtype, the graph
                           layout (source, destination and node names), and the caller's manifest
                           (config, model name and config, seed, ...). Written last at creation.
    graph.safetensors      ``edge_valid``: bool [n_src, n_dst], which (src, dst) pairs are edges.
    snapshots/step_<8-digit step>.safetensors
                           one file per recorded step: ``edge_scores`` (the valid entries of the
                           [n_src, n_dst] score matrix, row-major, in the store's score dtype),
                           ``edge_mask`` (the same entries of the circuit mask, bit-packed uint8),
                           ``node_scores`` (float32 [n_nodes]); the step's metrics are JSON in the
                           file's safetensors metadata.
    metrics.jsonl          one line per step, ``{"step": s, <metric>: value, ...}``: an index of the
                           metrics in the snapshot files, so a metrics table needs no tensor files.
    evals.jsonl            one line per dev evaluation, ``{"step": s, <metric>: value, ...}``.
    checkpoints/step_<8-digit step>.safetensors
                           model / optimizer / RNG tensors; the caller's JSON ``meta`` is in the
                           file's safetensors metadata.
    truncation.json        present only while `truncate_after` is under way: ``{"after": s}``.
    .lock                  held (flock) by the one process that writes.

Commit rule (crash safety): every tensor file is written to a temporary name (``.tmp-*``),
fsynced and renamed into place, so a file under its final name is always complete. A step exists
exactly when its snapshot file exists; the file carries the step's metrics, so one rename commits
everything about the step. ``metrics.jsonl`` is appended after the rename and is only an index
(not fsynced, as it can always be rebuilt): readers ignore a torn last line and any line whose snapshot is absent, and fall back to the
snapshot's own metadata for a committed step that has no line. ``evals.jsonl`` is append-only; a
torn last line is ignored on read. Truncation touches many files, so it commits first:
``truncation.json`` is written (atomically) before anything is deleted, readers treat everything
after its step as gone while it exists, and it is removed once the deletions are done. The first
write through a store (append, log_eval, save_checkpoint, truncate_after) takes the lock and
repairs what a killed writer left: it removes temporary files, finishes a pending truncation,
rewrites ``metrics.jsonl`` from the snapshots if it disagrees with them, and cuts a torn last
line from ``evals.jsonl``, so the next line starts clean. A SIGKILL at any moment therefore loses
at most the step being written; as the tensor files, evals.jsonl and the directory entries are
fsynced before a call returns, so does a power cut. Damage the commit rule cannot prevent (a
failing disk, a file copied in part or edited by hand) is found by `RunStore.verify`, which reads
every tensor file in full, and cleared by `RunStore.remove_damaged`.

Cost of durability: each fsync is a wait for the disk (a fraction of a millisecond on an idle
disk, several on a busy one). A step logged with its evaluation (``append(...,
evaluation=...)``, as `circuitdyn.recorder.CircuitRecorder` does) waits twice: the evaluation's
line is written before the snapshot, and the two files are fsynced at the same time; the rename
then commits the step and the directory's fsync makes the rename durable. Neither wait can go
without breaking the rules above: without the files' fsync a power cut could leave a step whose
snapshot is empty or torn under its final name, or a committed step without its evaluation;
without the directory's (or with it batched over several steps) a power cut could take back
steps whose calls had returned, as the rename is the commit. Rebuilding or verifying on open
would not help: the metrics index is rebuilt from the snapshots, but nothing else holds a
step's snapshot or evaluation, so what a power cut took back cannot be rebuilt.

It knows nothing of models or trainers and takes plain lists and tensors; its typed views
`RunStore.graph` and `RunStore.config` rebuild the run's `Graph` and `TuningConfig`, so readers
never parse names or read config keys themselves. Tensors go to safetensors and everything else to JSON; nothing is serialised as Python objects.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import importlib.metadata
import json
import os
import platform
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file as safetensors_save_file
from torch import Tensor

from circuitdyn.config import TuningConfig
from circuitdyn.graph import Graph

try:  # POSIX advisory locks; without them (Windows) a second writer is not detected.
    import fcntl
except ImportError:  # pragma: no cover - exercised only on non-POSIX systems
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "circuitdyn.RunStore"
FORMAT_VERSION = 1
_SNAPSHOT_FORMAT = "circuitdyn.RunStore.snapshot"
_CHECKPOINT_FORMAT = "circuitdyn.RunStore.checkpoint"

_MANIFEST = "manifest.json"
_GRAPH = "graph.safetensors"
_SNAPSHOTS = "snapshots"
_CHECKPOINTS = "checkpoints"
_METRICS = "metrics.jsonl"
_EVALS = "evals.jsonl"
_TRUNCATION = "truncation.json"
_LOCK = ".lock"
_TMP_PREFIX = ".tmp-"
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
# Everything a store may hold at its top level; overwrite=True deletes only these, so a wrong
# path cannot wipe someone's unrelated files.
_OWN_ENTRIES = frozenset(
    {_MANIFEST, _GRAPH, _SNAPSHOTS, _CHECKPOINTS, _METRICS, _EVALS, _TRUNCATION, _LOCK}
)

# Score dtypes a store can use, by the name recorded in the manifest: the torch dtype,
# safetensors' tag for it, and numpy's dtype (numpy has no bfloat16).
_SCORE_DTYPES: Mapping[str, tuple[torch.dtype, str, type[np.floating] | None]] = {
    "float16": (torch.float16, "F16", np.float16),
    "bfloat16": (torch.bfloat16, "BF16", None),
    "float32": (torch.float32, "F32", np.float32),
    "float64": (torch.float64, "F64", np.float64),
}
_VERSIONED_PACKAGES = ("circuitdyn", "torch", "numpy", "safetensors", "transformer-lens", "pandas")


class StoreError(ValueError):
    """A run directory that is damaged, incomplete or not a RunStore. The message names the file
    and the problem."""


class StoreLockedError(RuntimeError):
    """Another process (or another RunStore object) is already writing to this run."""


@dataclass(frozen=True, eq=False)
class Snapshot:
    """The circuit at one training step.

    ``edge_scores`` is float32 [n_src, n_dst] (0 where ``edge_valid`` is False; values went through
    the store's score dtype, so they carry its rounding). ``edge_mask`` is bool [n_src, n_dst], the
    circuit's edges. ``node_scores`` is float32 [n_nodes]. ``metrics`` are the step's training
    metrics as passed to `RunStore.append`.
    """

    step: int
    edge_scores: Float[Tensor, "n_src n_dst"]
    edge_mask: Bool[Tensor, "n_src n_dst"]
    node_scores: Float[Tensor, " n_nodes"]
    metrics: dict[str, float]


@dataclass(frozen=True)
class StoreCheck:
    """What `RunStore.verify` found on disk, every snapshot and checkpoint file read in full.

    ``damaged``: (file, one-line reason) for each file that cannot be read back completely and
    correctly. ``snapshot_steps`` / ``checkpoint_steps``: steps whose file is intact, ascending.
    ``intact_through``: the largest step t such that the snapshots of steps 0..t all exist and
    are intact (-1 when step 0's is missing or damaged); a trainer's steps are contiguous from 0,
    so it may resume after any intact checkpoint up to this step.
    """

    damaged: tuple[tuple[Path, str], ...]
    snapshot_steps: tuple[int, ...]
    checkpoint_steps: tuple[int, ...]
    intact_through: int

    @property
    def ok(self) -> bool:
        """True when nothing is damaged and the snapshots are contiguous from step 0."""
        last = self.snapshot_steps[-1] if self.snapshot_steps else -1
        return not self.damaged and self.intact_through == last


class _Writer:
    """The write side of a store: the held lock and the open append handles of the JSONL files."""

    def __init__(self, directory: Path, lock: IO[bytes]) -> None:
        self.directory = directory
        self.lock = lock
        self.metrics: IO[bytes] | None = None
        self.evals: IO[bytes] | None = None

    def open_logs(self) -> None:
        # Unbuffered, so each line reaches the file in one write() and fsync sees it.
        self.metrics = open(self.directory / _METRICS, "ab", buffering=0)
        self.evals = open(self.directory / _EVALS, "ab", buffering=0)

    def close_logs(self) -> None:
        for handle in (self.metrics, self.evals):
            if handle is not None:
                handle.close()
        self.metrics = self.evals = None

    def close(self) -> None:
        self.close_logs()
        self.lock.close()  # closing the descriptor releases the flock


class RunStore:
    """One run directory: manifest, per-step circuit snapshots and metrics, dev evaluations and
    checkpoints. Make one with `RunStore.create` or `RunStore.open`, not the constructor.

    Any number of processes may read a run, even while it is written; a reader sees the steps that
    were committed when it opened (call `refresh` to see newer ones). One process writes: the
    first write call takes an exclusive lock on the directory, released by `close` (or when the
    object is garbage-collected, or the process dies).

    Attributes: ``manifest`` (the caller's run description given to `create`), ``versions``
    (package versions at creation), ``created`` (UTC, ISO 8601), ``format_version``,
    ``score_dtype``, ``src_names`` / ``dst_names`` / ``node_names`` (tuples), ``n_edges`` (number
    of valid edges), ``directory``; typed views ``graph`` (`Graph`) and ``config``
    (`TuningConfig`).
    """

    def __init__(self, directory: Path, header: dict[str, Any], edge_valid: Tensor) -> None:
        graph = header["graph"]
        self.directory = directory
        self.manifest: dict[str, Any] = header["run"]
        self.format_version: int = header["format_version"]
        self.created: str = header.get("created", "")
        self.versions: dict[str, str | None] = header.get("versions", {})
        self.score_dtype, self._score_tag, self._score_numpy = _SCORE_DTYPES[header["score_dtype"]]
        self.src_names: tuple[str, ...] = tuple(graph["src_names"])
        self.dst_names: tuple[str, ...] = tuple(graph["dst_names"])
        self.node_names: tuple[str, ...] = tuple(graph["node_names"])
        self._edge_valid = edge_valid
        # Flat row-major positions of the valid entries: the order of the stored score vectors.
        self._valid_index = torch.nonzero(edge_valid.reshape(-1)).squeeze(1)
        self._valid_index_np = self._valid_index.numpy()
        self.n_edges = int(self._valid_index.numel())
        self._edge_names: tuple[str, ...] | None = None
        self._edge_position: dict[str, int] | None = None
        self._writer: _Writer | None = None
        # The step after which a truncation is under way (nothing later counts), or None.
        self._cutoff: int | None = self._pending_truncation()
        self._steps: list[int] = self._scan_steps()

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        manifest: dict[str, Any],
        src_names: Sequence[str],
        dst_names: Sequence[str],
        edge_valid: Bool[Tensor, "n_src n_dst"],
        node_names: Sequence[str],
        score_dtype: torch.dtype = torch.float16,
        overwrite: bool = False,
    ) -> RunStore:
        """Make a new, empty run directory and return it, ready to append.

        ``manifest`` is the caller's JSON-serialisable description of the run (config, model name
        and config, seed, ...); the store adds its format marker, package versions and the graph
        layout beside it. ``edge_valid`` is bool [len(src_names), len(dst_names)]. Edge scores are
        stored in ``score_dtype`` (float16 halves the disk cost of float32; use float32 for exact
        values). A non-empty ``directory`` is an error unless ``overwrite`` is True, and even then
        only a directory holding nothing but a store's own files is replaced.
        """
        directory = Path(directory)
        dtype_name = _dtype_name(score_dtype)
        edge_valid = _check_layout(src_names, dst_names, edge_valid, node_names)
        try:
            manifest_json = json.dumps(manifest, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"manifest is not plain JSON: {error}") from error
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _package_versions(),
            "score_dtype": dtype_name,
            "graph": {
                "n_src": len(src_names),
                "n_dst": len(dst_names),
                "n_edges": int(edge_valid.sum()),
                "src_names": list(src_names),
                "dst_names": list(dst_names),
                "node_names": list(node_names),
            },
            "run": json.loads(manifest_json),
        }

        lock = _prepare_directory(directory, overwrite=overwrite)
        try:
            (directory / _SNAPSHOTS).mkdir()
            (directory / _CHECKPOINTS).mkdir()
            _atomic_write(
                directory / _GRAPH, safetensors_bytes({"edge_valid": edge_valid.contiguous()})
            )
            # The manifest goes last: a directory without one is a creation that did not finish.
            _atomic_write(directory / _MANIFEST, (json.dumps(header, indent=2) + "\n").encode())
            store = cls(directory, header, edge_valid)
            store._writer = _Writer(directory, lock)
            store._writer.open_logs()
        except BaseException:
            lock.close()
            raise
        return store

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> RunStore:
        """Open an existing run directory for reading (and, on the first write call, writing).

        Raises FileNotFoundError for a missing directory and `StoreError`, naming the file and the
        problem, for a directory that is not a RunStore or whose manifest or graph is damaged.
        """
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"no run directory at {directory}")
        if not directory.is_dir():
            raise StoreError(f"{directory} is a file, not a run directory")
        header = _read_manifest(directory / _MANIFEST)
        edge_valid = _read_edge_valid(directory / _GRAPH, header["graph"])
        return cls(directory, header, edge_valid)

    def close(self) -> None:
        """Release the write lock and the open log files (reading keeps working)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Re-list the committed steps, to see steps a writer in another process added since."""
        self._cutoff = self._pending_truncation()
        self._steps = self._scan_steps()

    def __repr__(self) -> str:
        span = f"{self._steps[0]}..{self._steps[-1]}" if self._steps else "none"
        return (
            f"RunStore({str(self.directory)!r}, steps={span} ({len(self._steps)}), "
            f"edges={self.n_edges}, score_dtype={_dtype_name(self.score_dtype)})"
        )

    # ------------------------------------------------------------------ typed views

    @cached_property
    def graph(self) -> Graph:
        """The run's `Graph`, rebuilt from its saved layout; StoreError when the layout is not a
        circuitdyn graph (a store made by hand with other names)."""
        try:
            graph = Graph.from_names(self.src_names, self.dst_names)
        except ValueError as error:
            raise StoreError(
                f"{self.directory}: the saved layout is not a graph: {error}"
            ) from None
        if not torch.equal(graph.edge_valid, self._edge_valid):
            raise StoreError(f"{self.directory}: the saved edge_valid is not that of {graph}")
        return graph

    @cached_property
    def config(self) -> TuningConfig:
        """The run's `TuningConfig` (from the manifest's ``config``); StoreError when the run
        has none or it does not parse."""
        payload = self.manifest.get("config")
        if not isinstance(payload, dict):
            raise StoreError(f"{self.directory}: the manifest holds no tuning config")
        try:
            return TuningConfig.from_dict(payload)
        except (TypeError, ValueError) as error:
            raise StoreError(
                f"{self.directory}: the manifest's config is invalid: {error}"
            ) from None

    # ------------------------------------------------------------------ the graph layout

    @property
    def edge_valid(self) -> Bool[Tensor, "n_src n_dst"]:
        """Which (src, dst) pairs are edges (a copy: the store's own layout cannot be changed)."""
        return self._edge_valid.clone()

    @property
    def edge_names(self) -> tuple[str, ...]:
        """Names ``"{src}->{dst}"`` of the valid edges, in row-major order of [n_src, n_dst]:
        the column order of ``scores(edges=...)``-style flat arrays."""
        if self._edge_names is None:
            rows, cols = np.divmod(self._valid_index_np, len(self.dst_names))
            self._edge_names = tuple(
                f"{self.src_names[r]}->{self.dst_names[c]}"
                for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
            )
        return self._edge_names

    def edge_position(self, edge: str) -> int:
        """Index of ``edge`` in `edge_names` (and in the stored flat score vectors)."""
        if self._edge_position is None:
            self._edge_position = {name: i for i, name in enumerate(self.edge_names)}
        position = self._edge_position.get(edge)
        if position is None:
            raise KeyError(self._unknown_edge_message(edge))
        return position

    def _unknown_edge_message(self, edge: str) -> str:
        src, sep, dst = edge.partition("->")
        if sep and src in self.src_names and dst in self.dst_names:
            return f"{edge!r} is not an edge of this graph (edge_valid is False for that pair)"
        close = difflib.get_close_matches(edge, self.edge_names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown edge {edge!r} (edges are named like 'a0.h1->a2.h3<q>'){hint}"

    # ------------------------------------------------------------------ writing

    def append(
        self,
        step: int,
        *,
        edge_scores: Float[Tensor, "n_src n_dst"],
        edge_mask: Bool[Tensor, "n_src n_dst"],
        node_scores: Float[Tensor, " n_nodes"],
        metrics: Mapping[str, float],
        evaluation: Mapping[str, float] | None = None,
    ) -> None:
        """Record the circuit at training step ``step`` (>= 0, larger than every recorded step;
        call `truncate_after` first to rewrite history when resuming).

        ``edge_scores``: signed scores [n_src, n_dst], any float dtype or device; entries where
        ``edge_valid`` is False are ignored. ``edge_mask``: bool [n_src, n_dst], the circuit's
        edges (must be False off the valid edges). ``node_scores``: [n_nodes]. ``metrics``:
        scalars, e.g. the training loss (nats) or the learning rate. Writes one file of about
        ``n_edges * score_dtype.itemsize + n_edges / 8 + 4 * n_nodes`` bytes plus one JSONL line.

        ``evaluation``: a dev evaluation of this step to log with it, as `log_eval` would. Its
        line goes to ``evals.jsonl`` before the snapshot is written and is fsynced together
        with the snapshot's file, before the rename that commits the step, so a committed step
        always has its evaluation, and both are durable when the call returns, as after
        `log_eval` then `append`, with one wait for the disk fewer.
        """
        writer = self._ensure_writer()
        step = _check_step(step)
        if self._steps and step <= self._steps[-1]:
            raise ValueError(
                f"step {step} is not after the last recorded step {self._steps[-1]}; steps are "
                "appended in increasing order (call truncate_after() first to record again)"
            )
        metrics = _clean_metrics(metrics, "metrics")
        evaluated = None if evaluation is None else _clean_metrics(evaluation, "evaluation")
        tensors = self._encode_snapshot(edge_scores, edge_mask, node_scores)
        metadata = {
            "format": _SNAPSHOT_FORMAT,
            "step": str(step),
            "metrics": json.dumps(metrics),
        }
        data = safetensors_bytes(tensors, metadata=metadata)
        synced_with = None
        if evaluated is not None:
            assert writer.evals is not None
            _append_line(writer.evals, {"step": step, **evaluated}, durable=False)
            synced_with = writer.evals
        # The rename inside _atomic_write commits the step; the index line follows it. The
        # evaluation's line is durable before the rename: its fsync runs beside the snapshot
        # file's, and the rename waits for both.
        _atomic_write(self._snapshot_path(step), data, sync_also=synced_with)
        self._steps.append(step)
        assert writer.metrics is not None
        # No fsync: the index is rebuilt from the (fsynced) snapshots whenever it disagrees with
        # them, so durability here would only cost time (about a third of an append).
        _append_line(writer.metrics, {"step": step, **metrics}, durable=False)

    def _encode_snapshot(
        self,
        edge_scores: Tensor,
        edge_mask: Tensor,
        node_scores: Tensor,
    ) -> dict[str, Tensor]:
        """Validate one step's tensors and turn them into the stored flat vectors."""
        shape = (len(self.src_names), len(self.dst_names))
        for name, value in (("edge_scores", edge_scores), ("edge_mask", edge_mask)):
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of shape {shape}, got {got}")
        if not edge_scores.is_floating_point():
            raise ValueError(f"edge_scores must be floating point, got {edge_scores.dtype}")
        if edge_mask.dtype != torch.bool:
            raise ValueError(f"edge_mask must be bool, got {edge_mask.dtype}")
        if not isinstance(node_scores, Tensor) or tuple(node_scores.shape) != (
            len(self.node_names),
        ):
            got = tuple(node_scores.shape) if isinstance(node_scores, Tensor) else node_scores
            raise ValueError(f"node_scores must have shape ({len(self.node_names)},), got {got}")

        # Done in numpy: single-threaded, it costs ~0.1 ms, while torch's intra-op threads made
        # the same work take 5-30 ms at the 90th percentile on a busy 2-core machine.
        full = _as_numpy(edge_scores).reshape(-1)[self._valid_index_np]
        if self._score_numpy is None:  # bfloat16: a torch cast (on 32k elements, not threaded)
            flat = torch.from_numpy(full).to(self.score_dtype)
            stored = flat.to(torch.float32).numpy()
        else:
            with np.errstate(over="ignore"):  # overflow is reported below, with advice
                stored = full.astype(self._score_numpy)
            flat = torch.from_numpy(stored)
        overflow = np.isinf(stored) & np.isfinite(full)
        if overflow.any():
            raise ValueError(
                f"{int(overflow.sum())} edge scores overflow {self.score_dtype} (largest "
                f"|score| {float(np.abs(full).max()):.4g}); create the store with "
                "score_dtype=torch.float32"
            )
        mask = edge_mask.detach().to("cpu").numpy().reshape(-1)
        mask_valid = mask[self._valid_index_np]
        stray = np.count_nonzero(mask) - np.count_nonzero(mask_valid)
        if stray:
            raise ValueError(f"edge_mask selects {stray} (src, dst) pairs that are not edges")
        return {
            "edge_scores": flat,
            "edge_mask": torch.from_numpy(np.packbits(mask_valid)),
            "node_scores": node_scores.detach().to("cpu", torch.float32).contiguous(),
        }

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one dev evaluation made at training step ``step`` (e.g. loss in nats, accuracy,
        faithfulness). Any number per step, in any order relative to `append`."""
        writer = self._ensure_writer()
        step = _check_step(step)
        record = {"step": step, **_clean_metrics(metrics, "metrics")}
        assert writer.evals is not None
        _append_line(writer.evals, record, durable=True)

    def save_checkpoint(
        self,
        step: int,
        *,
        tensors: Mapping[str, Tensor],
        meta: Any,
        keep: int | None = None,
    ) -> None:
        """Save a checkpoint for resuming after step ``step``.

        ``tensors``: flat name -> tensor (model state dict, the tensors of `flatten_state` of the
        optimizer state, RNG states), any device; saved as they are. ``meta``: any JSON (e.g. the
        optimizer skeleton from `flatten_state`, the data position). ``keep``: if given, delete
        all but the ``keep`` newest checkpoints once this one is committed.
        """
        self._ensure_writer()
        step = _check_step(step)
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        try:
            meta_json = json.dumps(meta)
        except (TypeError, ValueError) as error:
            raise ValueError(f"checkpoint meta is not plain JSON: {error}") from error
        prepared: dict[str, Tensor] = {}
        storages: set[int] = set()
        for name, value in tensors.items():
            if not isinstance(name, str) or not isinstance(value, Tensor):
                raise ValueError(
                    f"checkpoint tensors must map str to Tensor; {name!r} is {type(value).__name__}"
                )
            value = value.detach().to("cpu").contiguous()
            # safetensors refuses tensors that share memory (tied weights, views); copy those.
            pointer = value.untyped_storage().data_ptr()
            if pointer in storages:
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
            prepared[name] = value
        metadata = {"format": _CHECKPOINT_FORMAT, "step": str(step), "meta": meta_json}
        path = self._checkpoint_path(step)
        # Written by safetensors straight to the temporary file: a checkpoint can be gigabytes,
        # too large to build in memory first.
        with _atomic_target(path) as temporary:
            temporary.touch()  # created with the process's umask, like every other file
            mode = temporary.stat().st_mode
            safetensors_save_file(prepared, temporary, metadata=metadata)
            os.chmod(temporary, mode)  # safetensors makes its files owner-only
        if keep is not None:
            for old in self.checkpoint_steps()[:-keep]:
                self._checkpoint_path(old).unlink(missing_ok=True)
            _fsync_dir(path.parent)

    def truncate_after(self, step: int) -> None:
        """Forget everything recorded after ``step``: snapshots, metrics, evaluations and
        checkpoints of later steps (``step=-1`` forgets everything). Used to resume from a
        checkpoint, after which `append` continues at ``step + 1``."""
        writer = self._ensure_writer()
        step = _check_step(step, minimum=-1)
        # The commit point: from here on readers see the run as truncated, and if this process
        # dies before the deletions are done, the next writer finishes them.
        _atomic_write(self.directory / _TRUNCATION, json.dumps({"after": step}).encode())
        self._cutoff = step
        # The logs are replaced by rename, so the append handles must point at the new files.
        writer.close_logs()
        try:
            self._finish_truncation(step)
        finally:
            writer.open_logs()

    def _finish_truncation(self, step: int) -> None:
        """Delete what a committed truncation after ``step`` dropped; idempotent."""
        for folder in (self.directory / _CHECKPOINTS, self.directory / _SNAPSHOTS):
            for old in reversed(_scan_step_files(folder)):
                if old > step:
                    (folder / f"step_{old:08d}.safetensors").unlink()
            _fsync_dir(folder)
        self._steps = self._scan_steps()
        self._rewrite_metrics_index()
        _atomic_write(self.directory / _EVALS, _jsonl_bytes(self._read_evals()))
        (self.directory / _TRUNCATION).unlink()
        _fsync_dir(self.directory)
        self._cutoff = None

    def _ensure_writer(self) -> _Writer:
        """Become the run's single writer: take the lock and repair what a killed writer left."""
        if self._writer is not None:
            return self._writer
        writer = _Writer(self.directory, _lock(self.directory))
        try:
            for folder in (
                self.directory,
                self.directory / _SNAPSHOTS,
                self.directory / _CHECKPOINTS,
            ):
                for entry in folder.iterdir():
                    if entry.name.startswith(_TMP_PREFIX):
                        entry.unlink()
            self.refresh()
            if self._cutoff is not None:
                self._finish_truncation(self._cutoff)
            if not self._metrics_index_consistent():
                self._rewrite_metrics_index()
            evals_path = self.directory / _EVALS
            records, torn = _read_jsonl(evals_path, strict=True)
            if torn:  # cut the torn line, so that the next line does not join it
                _atomic_write(evals_path, _jsonl_bytes(records))
            writer.open_logs()
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        return writer

    # ------------------------------------------------------------------ verifying

    def verify(self) -> StoreCheck:
        """Read every snapshot and checkpoint file completely (tensors, shapes and dtypes against
        the manifest, format marker, step and metadata JSON) and report what is intact. Refreshes
        the list of steps first; a file that a concurrent writer removes meanwhile is skipped.
        Costs one full read of the run's tensor files (checkpoints one tensor at a time)."""
        self.refresh()
        damaged: list[tuple[Path, str]] = []
        intact: dict[str, list[int]] = {_SNAPSHOTS: [], _CHECKPOINTS: []}
        for folder, steps in ((_SNAPSHOTS, self._steps), (_CHECKPOINTS, self.checkpoint_steps())):
            for step in steps:
                path, problem = self._step_file_problem(folder, step)
                if problem is None:
                    intact[folder].append(step)
                elif path.exists():
                    damaged.append((path, problem))
        intact_through = -1
        for step in intact[_SNAPSHOTS]:
            if step != intact_through + 1:
                break
            intact_through = step
        return StoreCheck(
            damaged=tuple(damaged),
            snapshot_steps=tuple(intact[_SNAPSHOTS]),
            checkpoint_steps=tuple(intact[_CHECKPOINTS]),
            intact_through=intact_through,
        )

    def remove_damaged(self, check: StoreCheck) -> None:
        """Delete the files that ``check`` (from `verify`) found damaged and that are still
        present and still damaged (a file rewritten since is kept), then rewrite the metrics
        index so that no line refers to a deleted snapshot. Takes the write lock; idempotent.
        ValueError for a path that is not one of this run's snapshot or checkpoint files."""
        writer = self._ensure_writer()
        targets = []
        for path, _ in check.damaged:
            match = _STEP_FILE.match(path.name)
            folder = path.parent.name
            if (
                match is None
                or folder not in (_SNAPSHOTS, _CHECKPOINTS)
                or path.parent.resolve() != (self.directory / folder).resolve()
            ):
                raise ValueError(f"{path} is not a snapshot or checkpoint file of {self.directory}")
            targets.append((folder, int(match.group(1))))
        removed = False
        for folder, step in targets:
            if (self.directory / folder / f"step_{step:08d}.safetensors").exists():
                path, problem = self._step_file_problem(folder, step)
                if problem is not None:
                    path.unlink()
                    removed = True
        if not removed:
            return
        for folder in (_SNAPSHOTS, _CHECKPOINTS):
            _fsync_dir(self.directory / folder)
        self._steps = self._scan_steps()
        if not self._metrics_index_consistent():
            # The index is replaced by rename, so the append handle must point at the new file.
            writer.close_logs()
            try:
                self._rewrite_metrics_index()
            finally:
                writer.open_logs()

    def _step_file_problem(self, folder: str, step: int) -> tuple[Path, str | None]:
        """The path of step ``step``'s file in ``folder`` (snapshots or checkpoints) and, after
        reading it completely, why it is damaged (one line, without the path; a missing file is
        a problem too), or None if it is intact."""
        if folder == _SNAPSHOTS:
            path = self._snapshot_path(step)
            read = self.snapshot
        else:
            path = self._checkpoint_path(step)

            def read(step: int) -> None:
                with self._open_checkpoint(step) as (handle, _):
                    for name in handle.keys():
                        handle.get_tensor(name)  # one at a time: checkpoints can be large

        try:
            read(step)
        except StoreError as error:
            return path, " ".join(str(error).removeprefix(f"{path}: ").split())
        return path, None

    # ------------------------------------------------------------------ reading snapshots

    @property
    def steps(self) -> list[int]:
        """The committed steps, ascending (a copy)."""
        return list(self._steps)

    @property
    def last_step(self) -> int | None:
        """The newest committed step, or None for an empty run."""
        return self._steps[-1] if self._steps else None

    def snapshot(self, step: int) -> Snapshot:
        """The circuit recorded at ``step`` (float32 scores, 0 off the valid edges)."""
        with self._open_snapshot(step) as (handle, metadata):
            flat = handle.get_tensor("edge_scores")
            bits = handle.get_tensor("edge_mask")
            nodes = handle.get_tensor("node_scores")
        shape = (len(self.src_names), len(self.dst_names))
        scores = np.zeros(shape[0] * shape[1], dtype=np.float32)
        scores[self._valid_index_np] = _as_float32(flat)
        mask = np.zeros(shape[0] * shape[1], dtype=bool)
        mask[self._valid_index_np] = self._unpack_mask(bits)
        return Snapshot(
            step=step,
            edge_scores=torch.from_numpy(scores.reshape(shape)),
            edge_mask=torch.from_numpy(mask.reshape(shape)),
            node_scores=nodes,
            metrics=self._snapshot_metrics(metadata, step),
        )

    def iter_snapshots(self, steps: Iterable[int] | None = None) -> Iterator[Snapshot]:
        """The snapshots of ``steps`` (default: all), one at a time."""
        for step in self._select_steps(steps):
            yield self.snapshot(step)

    def edge_trajectory(
        self, edge: str, steps: Iterable[int] | None = None
    ) -> Float[np.ndarray, " n_steps"]:
        """Score of one edge (e.g. ``"a0.h1->a2.h3<q>"``) at each of ``steps`` (default: all),
        float32. Reads one element per snapshot file."""
        position = self.edge_position(edge)
        selected = self._select_steps(steps)
        out = np.empty(len(selected), dtype=np.float32)
        for i, step in enumerate(selected):
            with self._open_snapshot(step) as (handle, _):
                value = handle.get_slice("edge_scores")[position : position + 1]
            out[i] = float(value[0])
        return out

    def scores(
        self,
        steps: Iterable[int] | None = None,
        edges: Sequence[str] | None = None,
    ) -> Float[np.ndarray, "n_steps ..."]:
        """Edge scores over steps, float32: [n_steps, n_src, n_dst] (0 off the valid edges), or
        [n_steps, len(edges)] when ``edges`` names edges (``edges=store.edge_names`` gives every
        valid edge in ``n_edges / (n_src * n_dst)`` of the dense memory). One file per step is
        read at a time."""
        return self._stack("edge_scores", steps, edges, np.float32)

    def masks(
        self,
        steps: Iterable[int] | None = None,
        edges: Sequence[str] | None = None,
    ) -> Bool[np.ndarray, "n_steps ..."]:
        """Circuit membership over steps, bool, shaped like `scores`."""
        return self._stack("edge_mask", steps, edges, np.bool_)

    def node_scores(
        self, steps: Iterable[int] | None = None
    ) -> Float[np.ndarray, "n_steps n_nodes"]:
        """Node scores over steps, float32 [n_steps, n_nodes] in the order of `node_names`."""
        selected = self._select_steps(steps)
        out = np.empty((len(selected), len(self.node_names)), dtype=np.float32)
        for i, step in enumerate(selected):
            with self._open_snapshot(step) as (handle, _):
                out[i] = handle.get_tensor("node_scores").numpy()
        return out

    def _stack(
        self,
        name: str,
        steps: Iterable[int] | None,
        edges: Sequence[str] | None,
        dtype: type[np.generic],
    ) -> np.ndarray:
        selected = self._select_steps(steps)
        if isinstance(edges, str):
            raise TypeError("edges must be a list of edge names, not one string")
        columns = None if edges is None else np.array([self.edge_position(e) for e in edges], int)
        n_cells = len(self.src_names) * len(self.dst_names)
        width = n_cells if columns is None else len(columns)
        out = np.zeros((len(selected), width), dtype=dtype)
        for i, step in enumerate(selected):
            with self._open_snapshot(step) as (handle, _):
                stored = handle.get_tensor(name)
            values = self._unpack_mask(stored) if name == "edge_mask" else _as_float32(stored)
            if columns is None:
                out[i, self._valid_index_np] = values
            else:
                out[i] = values[columns]
        if columns is None:
            return out.reshape(len(selected), len(self.src_names), len(self.dst_names))
        return out

    def _unpack_mask(self, bits: Tensor) -> Bool[np.ndarray, " n_edges"]:
        return np.unpackbits(bits.numpy(), count=self.n_edges).astype(bool)

    def _select_steps(self, steps: Iterable[int] | None) -> list[int]:
        if steps is None:
            return list(self._steps)
        selected = [int(step) for step in steps]
        for step in selected:
            self._require_step(step)
        return selected

    def _require_step(self, step: int) -> None:
        i = bisect.bisect_left(self._steps, step)
        if i == len(self._steps) or self._steps[i] != step:
            span = (
                f"steps {self._steps[0]}..{self._steps[-1]} ({len(self._steps)} recorded)"
                if self._steps
                else "no steps"
            )
            raise KeyError(f"no snapshot for step {step} in {self.directory}; the run has {span}")

    @contextlib.contextmanager
    def _open_snapshot(self, step: int) -> Iterator[tuple[Any, dict[str, str]]]:
        """Open one snapshot file lazily, check it against the manifest, and yield the handle and
        its metadata. Any damage becomes a `StoreError` naming the file."""
        self._require_step(step)
        path = self._snapshot_path(step)
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                self._check_snapshot(path, step, handle, metadata)
                yield handle, metadata
        except FileNotFoundError as error:
            raise StoreError(
                f"{path}: missing; the run changed since it was opened (truncated?), call refresh()"
            ) from error
        except SafetensorError as error:
            raise StoreError(f"{path}: damaged snapshot file ({error})") from error

    def _check_snapshot(self, path: Path, step: int, handle: Any, metadata: dict[str, str]) -> None:
        if metadata.get("format") != _SNAPSHOT_FORMAT or metadata.get("step") != str(step):
            raise StoreError(
                f"{path}: not the snapshot of step {step} (format {metadata.get('format')!r}, "
                f"step {metadata.get('step')!r})"
            )
        expected = {
            "edge_scores": ([self.n_edges], self._score_tag),
            "edge_mask": ([(self.n_edges + 7) // 8], "U8"),
            "node_scores": ([len(self.node_names)], "F32"),
        }
        for name, (shape, tag) in expected.items():
            if name not in handle.keys():
                raise StoreError(f"{path}: no tensor {name!r}")
            tensor = handle.get_slice(name)
            if list(tensor.get_shape()) != shape or tensor.get_dtype() != tag:
                raise StoreError(
                    f"{path}: {name} is {tensor.get_dtype()} {list(tensor.get_shape())}, but the "
                    f"manifest says {tag} {shape}"
                )

    def _snapshot_metrics(self, metadata: dict[str, str], step: int) -> dict[str, float]:
        try:
            metrics = json.loads(metadata["metrics"])
        except (KeyError, json.JSONDecodeError) as error:
            metrics = error
        if not isinstance(metrics, dict):
            raise StoreError(f"{self._snapshot_path(step)}: unreadable metrics ({metrics!r})")
        return metrics

    def _snapshot_path(self, step: int) -> Path:
        return self.directory / _SNAPSHOTS / f"step_{step:08d}.safetensors"

    def _scan_steps(self) -> list[int]:
        return self._before_cutoff(_scan_step_files(self.directory / _SNAPSHOTS))

    def _before_cutoff(self, steps: list[int]) -> list[int]:
        return steps if self._cutoff is None else [s for s in steps if s <= self._cutoff]

    def _pending_truncation(self) -> int | None:
        path = self.directory / _TRUNCATION
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StoreError(f"{path}: not valid JSON ({error})") from error
        after = record.get("after") if isinstance(record, dict) else None
        if type(after) is not int:
            raise StoreError(f"{path}: no int 'after' (the step a truncation keeps up to)")
        return after

    # ------------------------------------------------------------------ metrics and evaluations

    def metrics_frame(self) -> pd.DataFrame:
        """Training metrics, one row per committed step: a ``step`` column, then one column per
        metric name (NaN where a step lacks it)."""
        return _frame(self._metrics_records())

    def evals_frame(self) -> pd.DataFrame:
        """Dev evaluations, one row per `log_eval` call, in the order logged: a ``step`` column,
        then one column per metric name."""
        return _frame(self._read_evals())

    def _metrics_records(self) -> list[dict[str, Any]]:
        """One record per committed step, from the index where it has the step, else from the
        snapshot's own metadata (a writer killed between the two, or a damaged index)."""
        records, _ = _read_jsonl(self.directory / _METRICS, strict=False)
        by_step = {record["step"]: record for record in records}
        out = []
        for step in self._steps:
            record = by_step.get(step)
            if record is None:
                with self._open_snapshot(step) as (_, metadata):
                    record = {"step": step, **self._snapshot_metrics(metadata, step)}
            out.append(record)
        return out

    def _metrics_index_consistent(self) -> bool:
        records, damaged = _read_jsonl(self.directory / _METRICS, strict=False)
        return not damaged and [record["step"] for record in records] == self._steps

    def _rewrite_metrics_index(self) -> None:
        _atomic_write(self.directory / _METRICS, _jsonl_bytes(self._metrics_records()))

    def _read_evals(self) -> list[dict[str, Any]]:
        records, _ = _read_jsonl(self.directory / _EVALS, strict=True)
        if self._cutoff is not None:
            records = [record for record in records if record["step"] <= self._cutoff]
        return records

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_steps(self) -> list[int]:
        """Steps with a committed checkpoint, ascending."""
        return self._before_cutoff(_scan_step_files(self.directory / _CHECKPOINTS))

    def latest_checkpoint(self) -> int | None:
        """The newest checkpoint's step, or None when there is none."""
        steps = self.checkpoint_steps()
        return steps[-1] if steps else None

    def load_checkpoint(
        self, step: int, device: str | torch.device = "cpu"
    ) -> tuple[dict[str, Tensor], Any]:
        """The tensors and meta saved by `save_checkpoint` at ``step``, tensors on ``device``."""
        if not self._checkpoint_path(step).exists():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; "
                f"checkpoints: {self.checkpoint_steps()}"
            )
        with self._open_checkpoint(step, device) as (handle, meta):
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return tensors, meta

    @contextlib.contextmanager
    def _open_checkpoint(
        self, step: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[Any, Any]]:
        """Open one checkpoint file lazily, check its format marker and step, and yield the handle
        and the parsed meta. Any damage becomes a `StoreError` naming the file."""
        path = self._checkpoint_path(step)
        try:
            with safe_open(path, framework="pt", device=str(device)) as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != _CHECKPOINT_FORMAT or metadata.get("step") != str(
                    step
                ):
                    raise StoreError(f"{path}: not the checkpoint of step {step}")
                try:
                    meta = json.loads(metadata["meta"])
                except (KeyError, json.JSONDecodeError) as error:
                    raise StoreError(f"{path}: unreadable checkpoint meta ({error})") from error
                yield handle, meta
        except FileNotFoundError as error:
            raise StoreError(f"{path}: missing; the run changed (truncated?)") from error
        except SafetensorError as error:
            raise StoreError(f"{path}: damaged checkpoint file ({error})") from error

    def _checkpoint_path(self, step: int) -> Path:
        return self.directory / _CHECKPOINTS / f"step_{step:08d}.safetensors"


# ---------------------------------------------------------------------- nested state <-> tensors

_TENSOR, _NDARRAY, _TUPLE, _DICT = "$tensor", "$ndarray", "$tuple", "$dict"


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (an optimizer's ``state_dict()``, RNG states, ...) into tensors with
    dotted names (``"{prefix}.state.0.exp_avg"``) for safetensors and a JSON skeleton for the rest.

    Keeps what JSON alone would lose: non-string dict keys (an optimizer's parameter ids), tuples
    (``betas``) and numpy arrays (``np.random.get_state()``). `unflatten_state` inverts it.
    """
    tensors: dict[str, Tensor] = {}

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        name = ".".join((prefix, *path) if prefix else path)
        if isinstance(value, (Tensor, np.ndarray)):
            if not name:
                raise ValueError("flatten_state: a bare tensor needs a prefix to be named by")
            if name in tensors:
                raise ValueError(f"flatten_state: two tensors would share the name {name!r}")
            if isinstance(value, np.ndarray):
                tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
                return {_NDARRAY: name}
            tensors[name] = value
            return {_TENSOR: name}
        if isinstance(value, dict):
            if all(isinstance(key, str) and not key.startswith("$") for key in value):
                return {key: walk(item, (*path, key)) for key, item in value.items()}
            pairs = []
            for key, item in value.items():
                if key is not None and not isinstance(key, (str, int, float)):
                    raise TypeError(f"flatten_state: key {key!r} at {name!r} is not a JSON scalar")
                pairs.append([key, walk(item, (*path, str(key)))])
            return {_DICT: pairs}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(item, (*path, str(i))) for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [walk(item, (*path, str(i))) for i, item in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"flatten_state: cannot store {type(value).__name__} at {name!r}")

    return tensors, walk(state, ())


def unflatten_state(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """Rebuild the nested state that `flatten_state` split into ``tensors`` and ``skeleton``."""

    def build(node: Any) -> Any:
        if isinstance(node, list):
            return [build(item) for item in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((tag, value),) = node.items()
            if tag in (_TENSOR, _NDARRAY):
                if value not in tensors:
                    raise KeyError(f"unflatten_state: no tensor named {value!r}")
                return tensors[value] if tag == _TENSOR else tensors[value].numpy()
            if tag == _TUPLE:
                return tuple(build(item) for item in value)
            if tag == _DICT:
                return {key: build(item) for key, item in value}
        return {key: build(item) for key, item in node.items()}

    return build(skeleton)


# ---------------------------------------------------------------------- files


def strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of a checkpoint under ``prefix.`` (e.g. ``model``), with the prefix removed."""
    head = f"{prefix}."
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}


def _fsync_dir(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to ``path``, so that
    ``path`` is always either absent, the old file, or the whole new file."""
    temporary = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write(path: Path, data: bytes, *, sync_also: IO[bytes] | None = None) -> None:
    """Write ``data`` to ``path`` as `_atomic_target` does: to a temporary file, fsynced (through
    the descriptor that wrote it) and renamed into place, then the directory fsynced.
    ``sync_also``: another open file fsynced at the same time as the temporary one, and also
    before the rename (see `_fsync_together`)."""
    temporary = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            _fsync_together(handle.fileno(), None if sync_also is None else sync_also.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_together(first: int, second: int | None) -> None:
    """fsync the descriptor ``first`` and, if given, ``second``, returning when both are durable
    (raising the first failure). The two run at once, ``second`` in a helper thread (fsync
    releases the GIL): each is mostly a wait for the disk, and on a journaling filesystem two
    concurrent fsyncs often share one journal commit, so this costs less than one after the
    other. Nothing is made durable later than by two sequential fsyncs."""
    if second is None:
        os.fsync(first)
        return
    failures: list[BaseException] = []

    def sync_second() -> None:
        try:
            os.fsync(second)
        except BaseException as error:  # re-raised in the calling thread
            failures.append(error)

    helper = threading.Thread(target=sync_second, name="RunStore-fsync", daemon=True)
    helper.start()
    try:
        os.fsync(first)
    finally:
        helper.join()
    if failures:
        raise failures[0]


def _append_line(handle: IO[bytes], record: dict[str, Any], *, durable: bool) -> None:
    """Append one JSON line (and fsync it if ``durable``). A crash mid-write leaves a line
    without its newline, which readers skip and the next writer cuts."""
    data = memoryview((json.dumps(record) + "\n").encode())
    while data:
        data = data[handle.write(data) :]
    if durable:
        os.fsync(handle.fileno())


def _jsonl_bytes(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def _read_jsonl(path: Path, *, strict: bool) -> tuple[list[dict[str, Any]], bool]:
    """The records of a JSONL file, and whether the file needs rewriting: it ends in a torn line
    (text after the last newline, left by a killed writer; skipped), or, if not ``strict``, has
    bad lines (skipped; the caller can rebuild the file). If ``strict``, a bad complete line is a
    `StoreError`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    lines = data.split(b"\n")
    damaged = lines.pop() != b""
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
        elif strict:
            raise StoreError(f"{path}: line {number} is not a JSON record with an int 'step'")
        else:
            damaged = True
    return records, damaged


def _scan_step_files(folder: Path) -> list[int]:
    """The steps of the ``step_N.safetensors`` files in ``folder``, ascending."""
    if not folder.is_dir():
        raise StoreError(f"{folder}: missing; the run directory is damaged")
    steps = []
    for entry in os.scandir(folder):
        match = _STEP_FILE.match(entry.name)
        if match:
            steps.append(int(match.group(1)))
    steps.sort()
    if len(set(steps)) != len(steps):
        raise StoreError(f"{folder}: two files for the same step")
    return steps


def _lock(directory: Path) -> IO[bytes]:
    handle = open(directory / _LOCK, "ab")
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreLockedError(
                f"{directory} is being written by another process or RunStore object "
                f"(lock {_LOCK} is held)"
            ) from None
    return handle


def _prepare_directory(directory: Path, *, overwrite: bool) -> IO[bytes]:
    """Make ``directory`` an empty, locked home for a new store and return the held lock."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    entries = sorted(entry.name for entry in directory.iterdir())
    if entries and not overwrite:
        raise FileExistsError(
            f"{directory} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); "
            "pass overwrite=True to replace a run stored there"
        )
    foreign = [
        name for name in entries if name not in _OWN_ENTRIES and not name.startswith(_TMP_PREFIX)
    ]
    if foreign:
        raise FileExistsError(
            f"{directory} holds files that are not part of a run ({', '.join(foreign[:5])}); "
            "refusing to delete them even with overwrite=True"
        )
    lock = _lock(directory)
    try:
        for name in entries:
            path = directory / name
            if name == _LOCK:
                continue
            if path.is_dir():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()
            else:
                path.unlink()
    except BaseException:
        lock.close()
        raise
    return lock


# ---------------------------------------------------------------------- manifest and validation


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise StoreError(
            f"{path}: missing; {path.parent} is not a RunStore run directory "
            "(or its creation was interrupted)"
        )
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise StoreError(f"{path}: format marker is {found!r}, expected {FORMAT!r}: not a RunStore")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: format_version {version!r}; this circuitdyn reads up to {FORMAT_VERSION}"
        )
    graph = header.get("graph")
    names = ("src_names", "dst_names", "node_names")
    if not isinstance(graph, dict) or not all(isinstance(graph.get(key), list) for key in names):
        raise StoreError(f"{path}: 'graph' lacks src_names, dst_names or node_names")
    if header.get("score_dtype") not in _SCORE_DTYPES:
        raise StoreError(f"{path}: unknown score_dtype {header.get('score_dtype')!r}")
    if not isinstance(header.get("run"), dict):
        raise StoreError(f"{path}: 'run' (the run's manifest) is missing")
    return header


def _read_edge_valid(path: Path, graph: dict[str, Any]) -> Bool[Tensor, "n_src n_dst"]:
    if not path.exists():
        raise StoreError(f"{path}: missing; the run directory is damaged")
    try:
        with safe_open(path, framework="pt") as handle:
            if "edge_valid" not in handle.keys():
                raise StoreError(f"{path}: no tensor 'edge_valid'")
            edge_valid = handle.get_tensor("edge_valid")
    except SafetensorError as error:
        raise StoreError(f"{path}: damaged ({error})") from error
    shape = (len(graph["src_names"]), len(graph["dst_names"]))
    if edge_valid.dtype != torch.bool or tuple(edge_valid.shape) != shape:
        raise StoreError(
            f"{path}: edge_valid is {edge_valid.dtype} {tuple(edge_valid.shape)}, but the manifest "
            f"names {shape[0]} sources and {shape[1]} destinations"
        )
    if "n_edges" in graph and int(edge_valid.sum()) != graph["n_edges"]:
        raise StoreError(
            f"{path}: {int(edge_valid.sum())} valid edges, manifest says {graph['n_edges']}"
        )
    return edge_valid


def _check_layout(
    src_names: Sequence[str],
    dst_names: Sequence[str],
    edge_valid: Tensor,
    node_names: Sequence[str],
) -> Bool[Tensor, "n_src n_dst"]:
    for label, names in (
        ("src_names", src_names),
        ("dst_names", dst_names),
        ("node_names", node_names),
    ):
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"{label} must be a list of strings")
        if len(set(names)) != len(names):
            raise ValueError(f"{label} has repeated names")
    shape = (len(src_names), len(dst_names))
    if not isinstance(edge_valid, Tensor) or edge_valid.dtype != torch.bool:
        raise ValueError("edge_valid must be a bool tensor")
    if tuple(edge_valid.shape) != shape:
        raise ValueError(
            f"edge_valid has shape {tuple(edge_valid.shape)}, but there are {shape[0]} src_names "
            f"and {shape[1]} dst_names"
        )
    return edge_valid.detach().to("cpu").contiguous()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, (candidate, _, _) in _SCORE_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"score_dtype must be one of {list(_SCORE_DTYPES)}, got {dtype}")


def _as_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU numpy view (or copy) of a float tensor; bfloat16, which numpy lacks, as float32."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def _as_float32(tensor: Tensor) -> Float[np.ndarray, "..."]:
    return _as_numpy(tensor).astype(np.float32, copy=False)


def _check_step(step: int, minimum: int = 0) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < minimum:
        what = "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
        raise ValueError(f"step must be {what}, got {step!r}")
    return int(step)


def _clean_metrics(metrics: Mapping[str, float], label: str) -> dict[str, float]:
    """Metrics as a plain dict of floats (accepting ints, numpy and 0-d torch scalars)."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or key == "step":
            raise ValueError(f"{label}: names must be strings other than 'step', got {key!r}")
        try:
            clean[key] = float(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{label}: {key!r} is not a number ({value!r})") from error
    return clean


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd  # deferred: writers (the training loop) never need pandas

    if not records:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    return pd.DataFrame.from_records(records)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RunStore",
    "Snapshot",
    "StoreCheck",
    "StoreError",
    "StoreLockedError",
    "flatten_state",
    "strip_prefix",
    "unflatten_state",
]
