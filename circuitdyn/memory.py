"""How much memory attribution needs, and how many examples fit a memory budget.

`attribute(..., memory_budget=B)` splits each batch into chunks of `examples_per_chunk`
examples and scores them one after another. Scores are sums over examples, so chunking is
exact (equal to float rounding). `attribute(..., diff_dtype=torch.bfloat16)` stores the
activation differences and the per-layer gradient buffers in bfloat16 while the scores
accumulate in float32 (each per-layer product is added into the float32 scores).

The formula (`attribution_memory`), in bytes. Notation: T = batch * pos tokens; L layers, H
heads of width d_h, residual width d, MLP width d_m, vocabulary V; a = bytes per element of
the model's dtype, n = max(a, 4) (TransformerLens normalises in float32 at least), e = bytes
per element of the differences (`diff_dtype`); N_src / N_dst the graph's sources /
destinations, B its MLP nodes per layer; W = 4 H d_h d (+ 3 d d_m for a gated MLP), the
elements of one layer's projection matrices with keys and values counted per query head::

    parameters      = the model's parameters (counted from the model, or from its config)
    differences     = N_src * T * d * e                       (the ablated - clean tensor)
    forward_layer   = a * (T (3 d_m + H d + 4 H d_h) + 3 batch H pos^2 + W)
                                             (one layer's transients in a forward pass)
    scores          = 2 * N_src * N_dst * max(e, 4)
  eap, eap-ig (one clean forward with grad, one backward to the activations):
    weight_copies   = a * (L W + d V)      (TransformerLens multiplies by contiguous transposed
                                            copies of W_Q, W_K, W_V, W_O, a gated MLP's
                                            matrices and W_U; autograd keeps them: ~1x weights)
    saved           = L * [T ((3 + c) k + 4 H d_h a + m d_m a - r)
                           + batch H pos^2 (2 a + 1) + pos^2 + p]
                      + T (k + 8)                             (`autograd_saved`)
    activations     = saved + 4 w T d ((1 + c) L + 1) + 2 T V a + T H d a
    gradient_buffer = T * d * (4 H e + (H + B) max(e, n))     (one layer's q/k/v buffer)
    backward        = differences + weight_copies + activations + gradient_buffer
  exact (no backward; patching clones the differences):
    backward        = 2 differences + forward_layer + 3 H T d (e + 4 + a)
  total = parameters + scores + max(differences + forward_layer + extra, backward)

where k = d (n + f a) + n is what one norm call saves (input, normalised value, affine output
with f = 2 for LN / RMS, f = 1 for LNPre / RMSPre, scale); TransformerLens calls ln1 three
times (q, k, v inputs); r = 2 d n for RMS norms of 32/64-bit models (they save their uncentred
input once for ln1's three calls), else 0; p = 2 n_ctx rotary_dim a with rotary embeddings
(each layer's sin and cos tables), else 0; c = 1 with MLPs (ln2) and 0 for attention-only
models; m = 2 (pre- and post-activation) or 4 for a gated MLP, plus 3 for ``gelu_new``, 6 for
``gelu_fast``, minus 1 for ``relu`` (what the activation function keeps), 0 without MLPs;
w = 1 when the model runs in a 16-bit dtype (attribution keeps each norm's float32
``hook_normalized`` for the norm's backward), else 0. The activations add to `saved` these
float32 norm values, the logits and their gradient (2 T V a) and one layer's per-head outputs
(T H d a). extra = N_src T d (4 - e) when zero ablation builds 16-bit differences through
float32 first (corrupted and mean ablation write them in `diff_dtype` directly), else 0. The
first branch of the max is the corrupted forward pass that builds the ablated values, the
second the clean pass.

How good it is: `saved` equals autograd's saved tensors byte for byte (counted with
``torch.autograd.graph.saved_tensors_hooks`` on TransformerLens 3.x; tests/test_memory.py);
on CPU the total minus the parameters was 2% to 5% above the profiler's peak of live tensors
in all eight runs of benchmarks/memory.py (GPT-2-medium and Pythia-1B shapes, float32 and
bfloat16, chunked or not).

Everything but `parameters`, `weight_copies`, the weights in `forward_layer` and `scores` is
proportional to the number of examples, which is how `examples_per_chunk` splits a batch.

Grouped-query attention: `Graph.from_model` accepts it only with
``cfg.ungroup_grouped_query_attention=True``; every query head then has its own key and value
input, so the graph has 3 H destinations per layer (k/v counted per query head), and
TransformerLens computes k and v for all H heads with W_K / W_V repeated to H heads. The
parameters stay grouped (``n_key_value_heads`` copies), but the activations and the saved
weight copies count H key/value heads: ungrouping costs activations, not parameters.

Not modelled: MoE MLPs, QK norms, allocator overhead and fragmentation (the CUDA
caching allocator's reserved-but-free memory, glibc's retained heap on CPU). Leave headroom:
on a GPU give `memory_budget` about 90% of the free memory.
"""

from __future__ import annotations

import math
import re

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitdyn.graph import Graph

PARTS = (
    "parameters",
    "weight_copies",
    "differences",
    "gradient_buffer",
    "activations",
    "forward_layer",
    "scores",
    "total",
)

_GRADIENT_METHODS = ("eap", "eap-ig")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def default_diff_dtype(cfg: HookedTransformerConfig) -> torch.dtype:
    """`circuitdyn.activations.work_dtype`: float64 for float64 models, else float32."""
    return torch.float64 if cfg.dtype == torch.float64 else torch.float32


def _parameter_bytes(cfg: HookedTransformerConfig) -> int:
    """Bytes of a HookedTransformer's parameters, from its config (biases included)."""
    d, h, dh, v = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab
    kv = cfg.n_key_value_heads or h  # stored grouped even when ungrouped in the forward pass
    layer = (2 * h + 2 * kv) * dh * d + (h + 2 * kv) * dh + d  # W_Q..W_O, b_Q..b_V, b_O
    norm = {"LN": 2 * d, "RMS": d}.get(cfg.normalization_type, 0)  # weight (and bias)
    layer += norm if cfg.attn_only else 2 * norm
    if not cfg.attn_only:
        layer += (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp + cfg.d_mlp + d
    n = cfg.n_layers * layer + 2 * d * v + v + norm  # W_E, W_U, b_U, ln_final
    if cfg.positional_embedding_type == "standard":
        n += cfg.n_ctx * d
    return n * _bytes(cfg.dtype)


def _counts(cfg: HookedTransformerConfig, graph: Graph | tuple[int, int] | None):
    """(n_src, n_dst, mlp_blocks) of the graph, or of `cfg`'s one-node-per-MLP graph."""
    if isinstance(graph, Graph):
        return graph.n_src, graph.n_dst, graph.n_mlp_nodes
    mlp = 0 if cfg.attn_only else 1
    if graph is None:
        graph = (1 + cfg.n_layers * (cfg.n_heads + mlp), cfg.n_layers * (3 * cfg.n_heads + mlp) + 1)
    n_src, n_dst = graph
    return int(n_src), int(n_dst), mlp


def attribution_memory(
    cfg_or_model: HookedTransformerConfig | HookedTransformer,
    graph_or_counts: Graph | tuple[int, int] | None,
    batch: int,
    pos: int,
    diff_dtype: torch.dtype | None = None,
    *,
    method: str = "eap",
    ablation: str = "corrupted",
) -> dict[str, int]:
    """Estimated peak memory of `attribute` on one batch of `batch` x `pos` tokens, by part
    (bytes; the formula is in the module docstring). `graph_or_counts`: the `Graph`, or
    ``(n_src, n_dst)``, or None for the graph of `cfg` with one node per MLP. `diff_dtype`:
    that of the differences (default: float32, float64 for float64 models). Returns a dict with
    the keys of `PARTS`; ``total`` is the peak, parameters included."""
    if isinstance(cfg_or_model, HookedTransformer):
        cfg = cfg_or_model.cfg
        parameters = sum(p.numel() * p.element_size() for p in cfg_or_model.parameters())
    else:
        cfg = cfg_or_model
        parameters = _parameter_bytes(cfg)
    if method not in (*_GRADIENT_METHODS, "exact"):
        raise ValueError(
            f"no memory formula for attribution method {method!r} (eap, eap-ig and exact "
            "have one): run it without a memory budget"
        )
    if batch < 0 or pos < 1:
        raise ValueError(f"need batch >= 0 and pos >= 1, got batch={batch}, pos={pos}")
    n_src, n_dst, blocks = _counts(cfg, graph_or_counts)
    diff_dtype = diff_dtype or default_diff_dtype(cfg)
    a, e = _bytes(cfg.dtype), _bytes(diff_dtype)
    n = max(a, 4)
    w = 1 if a < 4 else 0  # 16-bit models: attribution keeps float32 copies of hook_normalized
    H, dh, d, V = cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_vocab
    T = batch * pos
    dm = 0 if cfg.attn_only else cfg.d_mlp
    mlp_norm = 0 if cfg.attn_only else 1

    differences = n_src * T * d * e
    # Corrupted and mean ablation build the ablated values in diff_dtype; others in float32.
    built_in = diff_dtype if ablation in ("corrupted", "mean") else default_diff_dtype(cfg)
    build_extra = n_src * T * d * max(0, _bytes(built_in) - e)
    forward_layer = (T * (3 * dm + H * d + 4 * H * dh) + 3 * batch * H * pos**2) * a
    forward_layer += _layer_weights(cfg) * a
    scores = 2 * n_src * n_dst * max(e, 4)
    if method in _GRADIENT_METHODS:
        saved, weight_copies = autograd_saved(cfg, batch, pos)
        records = cfg.n_layers * (1 + mlp_norm) * T * d * 4 * w + T * d * 4 * w
        activations = saved + records + 2 * T * V * a + T * H * d * a
        gradient_buffer = T * d * (4 * H * e + (H + blocks) * max(e, n))
        backward = differences + weight_copies + activations + gradient_buffer
    else:
        weight_copies = activations = gradient_buffer = 0
        backward = 2 * differences + forward_layer + 3 * H * T * d * (e + 4 + a)
    total = parameters + scores + max(differences + forward_layer + build_extra, backward)
    return {
        "parameters": parameters,
        "weight_copies": weight_copies,
        "differences": differences,
        "gradient_buffer": gradient_buffer,
        "activations": activations,
        "forward_layer": forward_layer,
        "scores": scores,
        "total": total,
    }


# [T, d_mlp] tensors an activation function saves beyond its input: composite tanh-GELUs save
# their intermediates; relu saves its output, which is the MLP's post-activation already saved.
_ACTIVATION_SAVES = {"gelu_new": 3, "gelu_fast": 6, "solu_ln": 3, "relu": -1}


def _layer_weights(cfg: HookedTransformerConfig) -> int:
    """Elements of one layer's projection matrices as TransformerLens multiplies them (keys
    and values ungrouped to n_heads heads; a gated MLP's three matrices)."""
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    gated = 0 if cfg.attn_only or not cfg.gated_mlp else 3 * d * cfg.d_mlp
    return 4 * H * dh * d + gated


def autograd_saved(cfg: HookedTransformerConfig, batch: int, pos: int) -> tuple[int, int]:
    """Bytes autograd saves in one grad-enabled forward pass of a TransformerLens 3.x model on
    ``batch x pos`` tokens, the embedding a leaf input: ``(activations, weight_copies)``.

    Matches ``torch.autograd.graph.saved_tensors_hooks`` (storages counted once, parameters
    excluded) byte for byte on LN / LNPre / RMS / RMSPre, standard / rotary / ALiBi, gated or
    not, attention-only, float32 / bfloat16 / float64 models (tests/test_memory.py): per norm
    call the centred input (float32 at least), the scale, the normalised value and the affine
    output, for ln1's three calls (q, k, v inputs), ln2 and ln_final; q, k, v and z; the
    attention pattern (softmax output, its copy, the causal mask); the MLP's pre- and
    post-activations and what its activation function keeps; the tokens; each layer's rotary
    tables; and the contiguous transposed copies of W_Q, W_K, W_V, W_O, a gated MLP's matrices
    and W_U that TransformerLens multiplies by."""
    a = _bytes(cfg.dtype)
    n = max(a, 4)
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    T = batch * pos
    mlp_norm = 0 if cfg.attn_only else 1
    m = 0 if cfg.attn_only else (4 if cfg.gated_mlp else 2) + _ACTIVATION_SAVES.get(cfg.act_fn, 0)
    dm = 0 if cfg.attn_only else cfg.d_mlp
    norm_calls = 3 + mlp_norm
    affine = 2 if cfg.normalization_type in ("LN", "RMS") else 1  # LNPre/RMSPre: no affine
    norm_call = d * (n + affine * a) + n  # input (centred), normalised, affine output, scale
    per_layer = T * (norm_calls * norm_call + 4 * H * dh * a + m * dm * a)
    if cfg.normalization_type in ("RMS", "RMSPre") and a >= 4:
        per_layer -= 2 * T * d * n  # RMSNorm saves its uncentred input, once for ln1's 3 calls
    per_layer += batch * H * pos**2 * (2 * a + 1) + pos**2
    if cfg.positional_embedding_type == "rotary":
        per_layer += 2 * cfg.n_ctx * cfg.rotary_dim * a  # each layer's sin and cos tables
    final = T * (norm_call + 8)  # ln_final and the tokens
    weight_copies = a * (cfg.n_layers * _layer_weights(cfg) + d * cfg.d_vocab)
    return cfg.n_layers * per_layer + final, weight_copies


def examples_per_chunk(
    model: HookedTransformer | HookedTransformerConfig,
    graph: Graph | tuple[int, int] | None,
    pos: int,
    budget_bytes: int,
    diff_dtype: torch.dtype | None = None,
    *,
    method: str = "eap",
    ablation: str = "corrupted",
) -> int:
    """How many examples of `pos` tokens one `attribute` pass can score within `budget_bytes`
    (the whole peak, parameters included), by `attribution_memory`. ValueError when not even
    one example fits."""
    options = dict(method=method, ablation=ablation)
    fixed = attribution_memory(model, graph, 0, pos, diff_dtype, **options)["total"]
    one = attribution_memory(model, graph, 1, pos, diff_dtype, **options)["total"]
    if one > budget_bytes:
        dtype = diff_dtype or default_diff_dtype(_cfg(model))
        hint = "" if _bytes(dtype) <= 2 else " or use bfloat16 differences"
        raise ValueError(
            f"memory budget {format_bytes(budget_bytes)} is too small: one example of {pos} "
            f"tokens needs about {format_bytes(one)} ({method}, "
            f"{str(dtype).removeprefix('torch.')} differences); raise the budget, shorten "
            f"the sequences{hint}"
        )
    per_example = one - fixed
    # Attention scores grow with pos^2 per example but stay linear in the example count.
    return max(1, int((budget_bytes - fixed) // max(per_example, 1)))


def _cfg(model: HookedTransformer | HookedTransformerConfig) -> HookedTransformerConfig:
    return model.cfg if isinstance(model, HookedTransformer) else model


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}
_UNITS |= {"T": 1e12, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """``"40GB"`` -> 40_000_000_000, ``"512MiB"``, ``"1.5G"``, ``"1000000"`` (bytes); decimal
    units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024.
    ValueError on anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a memory size: {text!r}; write a number of bytes with an optional unit, "
            "e.g. 40GB, 512MB, 16GiB or 1000000"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1 or not math.isfinite(value):
        raise ValueError(f"memory size {text!r} must be at least 1 byte")
    return int(value)


def format_bytes(n: float) -> str:
    """``1.5e9`` -> ``"1.50 GB"`` (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


__all__ = [
    "PARTS",
    "attribution_memory",
    "autograd_saved",
    "default_diff_dtype",
    "examples_per_chunk",
    "format_bytes",
    "parse_bytes",
]
