"""FSDP2 for models that do not fit one device: shard a HookedTransformer block by block, lay
the circuit's parameter masks out like the shards, and gather a full checkpoint.

Usage (one process per device, e.g. ``torchrun --nproc-per-node N script.py``)::

    torch.distributed.init_process_group("nccl")  # "gloo" on CPU
    model = shard_blocks(load_model(...))  # fully_shard per blocks[i], then the root
    optimizer = make_optimizer(model.parameters(), "adamw", lr=1e-4)  # after sharding
    masks = parameter_masks(model, circuit, include_frozen=False)  # full-shape, plain
    ablated = ablated_sources(model, graph, batch, "corrupted", None)
    scores, logits, loss = eap_with_loss(model, graph, batch, metric, loss_fn, ablated)
    loss.backward()  # the gradients are reduce-scattered (averaged over ranks)
    restrict_gradients(dict(model.named_parameters()), masks)  # masks follow the shards
    masked_step(optimizer, dict(model.named_parameters()), masks)
    state = full_state_dict(model)  # the whole model on rank 0 (CPU), {} elsewhere
    optim = full_optimizer_state_dict(optimizer)  # the unsharded layout on rank 0, {} elsewhere

Each rank keeps 1/N of every parameter, gradient and optimizer moment (``DTensor`` sharded on
dim 0, the head axis of ``W_Q``/``W_K``/``W_V``/``W_O``); a block's full weights exist only while
that block runs forward or backward. Parameter names do not change, so `parameter_masks`,
`restrict_gradients` and `masked_step` work as they are: `shard_like` gives each full-shape
mask the parameter's placements, without communication.

Limits (measured with torch 2.13, TransformerLens 3.x, CPU/gloo, 2 processes):

* Works, bit-identical to the unsharded model in float32: forward, ``loss.backward()``,
  ``model.hooks(fwd_hooks=..., bwd_hooks=...)``, ``run_with_cache`` (full activations on every
  rank), `eap_with_loss` then ``loss.backward()`` (two backward passes through one graph),
  `attribute` (``eap``, ``eap-ig``, ``exact``; corrupted and mean ablation), ``clip_grad_norm_`` (its norm is a replicated DTensor; ``float()``
  works), masked AdamW steps (frozen entries and their moments unchanged bit for bit).
* Attribution runs on the shards: its forward hooks (`circuitdyn.activations.source_hooks`:
  ``W_O``, ``W_out``) and gradient hooks (``W_Q/W_K/W_V``, ``W_in``, ``ln1.w``) read a block's
  weights while it runs forward or backward, when FSDP has all-gathered that block. (Hooks that
  captured ``attn.W_O`` when they were built, before the forward, failed with ``aten.bmm.default
  got mixed torch.Tensor and DTensor``; circuitdyn's no longer do.)
* Outside forward/backward, ``blocks[i].attn.W_Q`` etc. are sharded ``DTensor``s: direct weight
  reads (``model.W_Q`` stacks, ``state_dict()``, weight analysis) get shards, and
  ``model.generate`` fails (``aten.index.Tensor got mixed torch.Tensor and DTensor``: it calls
  ``model.embed`` outside the root's forward); all work inside `gathered`. Use
  `full_state_dict` for checkpoints.
* Weight processing (``fold_layer_norm``, ``center_writing_weights``...) must happen before
  sharding; ``cfg.n_devices > 1`` is refused. LoRA adapters (`circuitdyn.lora`) attached
  *before* sharding work (their factors are sharded with their block; gradients identical).
* bf16 (``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``)
  runs on gloo once ``cfg.dtype`` is bf16 (`shard_blocks` sets it: TransformerLens's norms
  cast their output to ``cfg.dtype``, else ``mat1 and mat2 must have the same dtype``); the
  loss equals a bf16 unsharded model's; EAP scores differ from float32 by ~7% of the largest.
* Memory (8 layers, d_model 512, d_mlp 2048, vocab 8192, 34M parameters, AdamW, 2 ranks):
  parameters + gradients + AdamW moments per rank 513 MiB unsharded, 256 MiB sharded (exactly
  1/N); activations are not sharded, so peak RSS for a 4 x 128-token step fell only from 1662
  to ~1550 MiB. Building the model on every rank first costs the full weights per rank:
  build on the meta device and use `load_full_state_dict` (rank 0 alone holds the weights).
* FSDP warns that the root returns a view (the logits): an in-place op on it would skip the
  pre-backward hook; circuitdyn never modifies logits in place.
* Gradients are averaged over ranks (reduce-scatter): give each rank its own slice of the data
  and a per-rank mean loss, as with DDP.
* Circuit-tuning (``circuitdyn tune --fsdp`` / ``tune(..., fsdp=True)``, 2 ranks, 12 steps,
  grad-accum 2, AdamW): the same circuit at every step as one unsharded process, scores within
  1e-6, final weights within 3e-6 (DDP: 8e-6), AdamW moments within 3e-9; also with mean
  ablation, faithfulness evaluation, ``eap-ig`` + ``fixed`` + SGD. Gradient accumulation
  reduce-scatters every micro-batch (``set_requires_gradient_sync(False)`` would keep full
  gradients on every rank until the last one).
* In tuning every step, attributed or not, holds only one block's full weights at a time
  (attribution, `mean_activations` and `faithfulness` included); `gathered` is for code that
  reads weights outside a forward pass.
* Checkpoints: `full_state_dict` and `full_optimizer_state_dict` give rank 0 exactly the
  tensors, names and optimizer layout (integer ids, ``param_groups``) of an unsharded run;
  `load_full_state_dict` (``from_rank0=False``) and `load_full_optimizer_state_dict` put a full
  checkpoint that every rank read back into the shards. A run resumes across launches (plain
  6 steps then ``--fsdp`` to 12, and the reverse) to the same circuits and weights (1e-5).
* Forward passes are collective, so every rank must run each evaluation (each evaluates all
  the examples: no speed-up, rank 0 logs). A model passed to ``tune(..., fsdp=True)`` stays
  sharded afterwards (its class is ``FSDPHookedTransformer``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without distributed support: nothing is ever sharded
    DTensor = None  # type: ignore[assignment,misc]

_RESHARD_AFTER_FORWARD = "_circuitdyn_reshard_after_forward"  # set on the root by shard_blocks


def shard_like(mask: Tensor, like: Tensor) -> Tensor:
    """`mask` (the full shape of `like`) laid out as `like`: unchanged for a plain tensor, and
    for a `DTensor` the DTensor with the same mesh and placements (each rank splits its copy of
    the full mask: no communication). A mask that already is a DTensor is returned as is."""
    if DTensor is None or not isinstance(like, DTensor) or isinstance(mask, DTensor):
        return mask
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(like.shape)}")
    return distribute_tensor(mask, like.device_mesh, like.placements, src_data_rank=None)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a `DTensor` (sharded by FSDP2 or another API)."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def shard_blocks(
    model: nn.Module,
    mesh=None,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
) -> nn.Module:
    """Shard `model` (a HookedTransformer) with FSDP2 in place: ``fully_shard`` on each of
    ``model.blocks``, then on the root (embeddings, final norm, unembedding). Returns `model`
    (its class becomes ``FSDPHookedTransformer``; parameter names are unchanged).

    Args:
        mesh: a 1-D `DeviceMesh`; default: every rank of the default process group, on the
            model's device type (``init_device_mesh(device_type, (world_size,))``).
        reshard_after_forward: free each block's gathered weights after its forward (less
            memory, one more all-gather in backward) - FSDP's default.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 compute,
            float32 gradient reduction); default: compute in the parameters' dtype. Its
            ``param_dtype`` becomes ``model.cfg.dtype`` (TransformerLens's norms cast their
            output to it); the stored parameters keep their dtype.

    Call it after any weight processing and before building the optimizer.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_blocks needs torch.distributed.init_process_group() first")
    if is_sharded(model):
        raise ValueError("shard_blocks: the model is already sharded")
    cfg = getattr(model, "cfg", None)
    blocks = getattr(model, "blocks", None)
    if cfg is None or not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"shard_blocks needs a HookedTransformer, got {type(model).__name__}")
    if getattr(cfg, "n_devices", 1) > 1:
        raise ValueError(
            "shard_blocks: cfg.n_devices > 1 (TransformerLens splits layers across devices); "
            "load the model on one device per rank"
        )
    devices = {p.device.type for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(f"shard_blocks: parameters on several device types {sorted(devices)}")
    (device_type,) = devices
    if device_type == "meta":  # built under torch.device("meta"): see load_full_state_dict
        device_type = mesh.device_type if mesh is not None else _default_device_type()
    if mesh is None:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    elif mesh.ndim != 1 or mesh.device_type != device_type:
        raise ValueError(
            f"shard_blocks needs a 1-D mesh on {device_type!r}, got {mesh.ndim}-D on "
            f"{mesh.device_type!r}"
        )
    options = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
    }
    if mp_policy is not None and mp_policy.param_dtype is not None:
        # TransformerLens's norms cast their output to cfg.dtype: it must be the compute dtype.
        cfg.dtype = mp_policy.param_dtype
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    setattr(model, _RESHARD_AFTER_FORWARD, reshard_after_forward)
    return model


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_full_state_dict(
    model: nn.Module, state: dict[str, Tensor], *, from_rank0: bool = True
) -> None:
    """Fill a sharded `model` from a full state dict that only rank 0 holds (``{}`` on the other
    ranks): rank 0 broadcasts each tensor and every rank keeps its shard. Collective. With
    ``from_rank0=False`` every rank passes the whole `state` (e.g. each read the checkpoint)
    and keeps its shards of it, without sending tensors. With a model built on the meta device,
    no rank ever holds more than its shards plus rank 0's `state`::

        with torch.device("meta"):
            model = HookedTransformer(cfg)
        shard_blocks(model)
        model.to_empty(device="cpu")  # or the rank's GPU
        load_full_state_dict(model, full if rank == 0 else {})
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, state, options=options)


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Keep every FSDP module of `model` (blocks and root) all-gathered while the block runs:
    weights read outside a forward pass (hooks built from ``attn.W_O``, weight analysis) are
    then full plain tensors, and forward/backward passes inside do not reshard. Gradients are
    still reduce-scattered. On exit every module is resharded and gets back the
    ``reshard_after_forward`` given to `shard_blocks`. Costs one full copy of the weights on
    every rank while it lasts. A no-op on an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.set_reshard_after_backward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        after_forward = getattr(model, _RESHARD_AFTER_FORWARD, True)
        for module in modules:
            module.set_reshard_after_backward(True, recurse=False)
            # FSDP never reshards the root after forward (backward needs it at once).
            module.set_reshard_after_forward(after_forward and module is not model, recurse=False)
            module.reshard()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full (unsharded) state dict on CPU on rank 0, and ``{}`` on the other ranks
    (for ``torch.save`` / `circuitdyn.store` checkpoints). Collective: every rank must call
    it. An unsharded model gives its plain ``state_dict()`` (detached, on CPU)."""
    if not is_sharded(model):
        return {name: value.detach().cpu() for name, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor (AdamW's moments, SGD's
    momentum: `DTensor`s shaped like their parameters) gathered to a full plain CPU tensor, on
    rank 0; ``{}`` on the other ranks. The layout (integer parameter ids, ``param_groups``) is
    the unsharded optimizer's, so a checkpoint does not depend on the sharding. Collective
    (one all-gather per sharded tensor, in the same order on every rank)."""
    import torch.distributed as dist

    state = optimizer.state_dict()
    per_param = state["state"]
    gathered_state: dict = {}
    for index in sorted(per_param):  # one order on every rank
        entry = {}
        for key, value in per_param[index].items():
            if DTensor is not None and isinstance(value, DTensor):
                value = value.full_tensor()
            entry[key] = value.detach().cpu() if isinstance(value, Tensor) else value
        gathered_state[index] = entry
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    ordered = {index: gathered_state[index] for index in per_param}  # the optimizer's order
    return {"state": ordered, "param_groups": state["param_groups"]}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (the layout of `full_optimizer_state_dict`, i.e. of an
    unsharded optimizer), which every rank holds, into `optimizer` over sharded parameters:
    each rank keeps its shard of every state tensor shaped like its parameter. No
    communication. On unsharded parameters it is ``optimizer.load_state_dict(state)``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    laid_out = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        laid_out[index] = {
            key: shard_like(value.to(param.device), param)
            if isinstance(value, Tensor) and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    optimizer.load_state_dict({**state, "state": laid_out})


__all__ = [
    "full_optimizer_state_dict",
    "full_state_dict",
    "gathered",
    "is_sharded",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "shard_blocks",
    "shard_like",
]
