"""Shared test setup: runtime shape checking of circuitdyn, and the seeded tiny models and
batches every test module builds on.

Runtime checking: before anything imports circuitdyn, tests/shape_checks.py installs an import
hook that decorates the package's functions, classes and methods with
``@jaxtyped(typechecker=beartype)``, so each call made by the tests checks its tensor
annotations (``Float[Tensor, "batch pos"]``, dimension names bound consistently across the
arguments and the return value) and its other annotations. ``CIRCUITDYN_TYPECHECK=0`` turns it
off; tests that deliberately pass ill-typed values to test circuitdyn's own validation use the
`no_typecheck` fixture. Subprocesses (notebook kernels, the replication's workers, killed-run
tests) run unchecked.

Models: `make_tiny_model` builds small random HookedTransformers (float64 by default) whose
weights are drawn from one seeded generator, large enough to make them clearly nonlinear;
keyword arguments pick the architecture variant. `make_tiny_batch` builds clean / corrupted
token batches. Both are plain functions behind session-scoped fixtures, so module-scoped
fixtures can use them too; every call returns a fresh object.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TYPECHECK = os.environ.get("CIRCUITDYN_TYPECHECK", "1") != "0"
if TYPECHECK:
    import shape_checks

    shape_checks.install("circuitdyn")  # before anything imports circuitdyn

import torch  # noqa: E402

# The test models are tiny: one intra-op thread is faster than two contending ones, and timings
# stay steady on shared cores (library code never changes the thread count).
torch.set_num_threads(1)
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from circuitdyn.tasks.base import Batch  # noqa: E402

if TYPECHECK and not hasattr(Batch.select, "__wrapped__"):  # the hook must have applied
    raise RuntimeError("tests/shape_checks.py did not instrument circuitdyn")

VOCAB = 20


def tiny_model(
    *,
    normalization: str | None = "LN",
    positions: str = "standard",
    attn_only: bool = False,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 32,
    act_fn: str = "gelu",
    dtype: torch.dtype = torch.float64,
    weight_std: float = 0.3,
    seed: int = 0,
    **extra,
) -> HookedTransformer:
    """A random model: 2 layers of 4 heads, d_model 32, d_mlp 64, vocabulary 20, context 16.

    Every matrix is drawn N(0, weight_std^2) and every vector N(0, 0.1^2) from one generator
    seeded with `seed`, in parameter order, so the same arguments give the same weights.
    `extra` goes to HookedTransformerConfig (e.g. ``n_key_value_heads``, ``gated_mlp``)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=None if attn_only else 2 * d_model,
        n_ctx=16,
        d_vocab=VOCAB,
        act_fn=act_fn,
        normalization_type=normalization,
        positional_embedding_type=positions,
        attn_only=attn_only,
        dtype=dtype,
        seed=seed,
        **extra,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            std = weight_std if param.ndim > 1 else 0.1
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
    return model.eval()


def tiny_batch(
    n: int = 3, pos: int = 8, *, seed: int = 0, pad_first: int = 2, corrupt_at: int = 2
) -> Batch:
    """Random clean tokens and a corrupted twin that differs at position `corrupt_at` in every
    example; the first example right-padded by `pad_first` tokens (0: no padding); one read
    position at each example's last real token, with a target and a different foil token."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, pos), generator=generator)
    corrupted = clean.clone()
    corrupted[:, corrupt_at] = (
        clean[:, corrupt_at] + 1 + torch.randint(0, VOCAB - 2, (n,), generator=generator)
    ) % VOCAB
    mask = torch.ones(n, pos, dtype=torch.bool)
    if pad_first:
        mask[0, pos - pad_first :] = False
    lengths = mask.sum(1)
    target = torch.randint(0, VOCAB, (n, 1), generator=generator)
    foil = (target + 1 + torch.randint(0, VOCAB - 1, (n, 1), generator=generator)) % VOCAB
    return Batch(
        clean=clean,
        corrupted=corrupted,
        attention_mask=mask,
        read_pos=(lengths - 1)[:, None],
        target=target,
        foil=foil,
    )


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., HookedTransformer]:
    """Factory of seeded tiny models: ``make_tiny_model(normalization="RMS", ...)``."""
    return tiny_model


@pytest.fixture(scope="session")
def make_tiny_batch() -> Callable[..., Batch]:
    """Factory of seeded tiny batches: ``make_tiny_batch(4, seed=3, pad_first=0)``."""
    return tiny_batch


@pytest.fixture
def model() -> HookedTransformer:
    """The default tiny model (LayerNorm, float64), fresh for each test."""
    return tiny_model()


@pytest.fixture
def batch() -> Batch:
    """The default tiny batch (3 examples of 8 tokens, the first padded by 2)."""
    return tiny_batch()


@pytest.fixture
def no_typecheck() -> Iterator[None]:
    """Run a test with runtime type checking off: for tests of circuitdyn's own errors on
    ill-typed input, which the checker would otherwise pre-empt."""
    if not TYPECHECK:
        yield
        return
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


@pytest.fixture(scope="session")
def replication_dir(tmp_path_factory) -> Path:
    """One quick replication per test session, shared by the replication and notebook tests."""
    from circuitdyn.replicate import replicate

    out = tmp_path_factory.mktemp("replication")
    replicate(out, quick=True, progress=False)
    return out


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory) -> Path:
    """The 1-process reference run the torchrun tests compare with (`torchrun_runs.TUNE`),
    tuned once per session."""
    from torchrun_runs import TUNE

    from circuitdyn.cli import main

    out = tmp_path_factory.mktemp("one_process") / "run"
    assert main([*TUNE, "--out", str(out)]) == 0
    return out
