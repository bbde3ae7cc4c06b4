"""Variable-length ("varlen") attention for packed rows, registered as the transformers attention function "varlen".

A packed row holds n sequences back to back (:mod:`pipeline.model.packing`); sequence i occupies [c_i, c_{i+1}) of the
row, c = ``cu_seq_lens_q``. Varlen attention computes, for every sequence separately,

    out_i = softmax(q_i k_i^T * scale + causal mask) v_i,

never the T x T scores of the whole row, so a packed chunk costs sum_i len_i^2 attention work instead of T^2 and
needs no mask tensor at all. Kernels, by what the device offers (:func:`varlen_kernel`):

* ``flash_attention_2`` (chosen at model build time by :func:`pipeline.model.embedding.resolve_attn_implementation`, not
  here): the flash-attn package's varlen kernel through transformers, when flash-attn imports on CUDA;
* ``torch``: PyTorch's own flash kernel :func:`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10) on CUDA in
  bf16/fp16 - packing on GPUs where flash-attn is not installed. Its signature changed between releases (2.10:
  ``is_causal``; later: ``window_size=(-1, 0)``, ``scale``, ``enable_gqa``); :func:`torch_varlen_attention` adapts,
  repeating K/V heads for grouped-query attention and pre-scaling the query where the keywords are missing;
* ``segments``: causal :func:`torch.nn.functional.scaled_dot_product_attention` on each sequence's slice (CPU,
  fp32, attention dropout > 0 - the torch kernel has no dropout - or torch < 2.10).

Layouts (transformers' attention-function contract): query [1, Hq, T, D], key/value [1, Hkv, T, D] in; output
[1, T, Hq, D], attention weights None.

Sliding-window layers (Mistral's ``sliding_window``, 4096 by default; Qwen2/Qwen3 layers of type
``sliding_attention``): transformers passes the window W to the attention function, and its padded masks define it
(``masking_utils.sliding_window_overlay`` / ``sliding_window_bidirectional_overlay``, transformers 5): a causal token
attends to itself and the W - 1 tokens before it, a bidirectional one to every token at distance <= W. Varlen
attention applies the same window within each sequence: the torch kernel through ``window_size`` (flash-attn's
convention, (left, right) tokens around the query: (W - 1, 0) causal, (W, W) bidirectional), the segments kernel
through a banded boolean mask for sdpa (:func:`window_mask`). A window only changes anything for a sequence longer
than it (:func:`window_binds`): Mistral's 4096 never does at max_len 1024, and such chunks run exactly as without it.

Bidirectional attention (``model.attention_mask: bidirectional``; LLM2Vec, BehnamGhader et al. 2024,
arXiv:2404.05961; NV-Embed, Lee et al. 2024, arXiv:2405.17428): a decoder's tokens attend to every token of their
own sequence, the causal mask dropped. It is transformers' own switch (>= 5.2, "bidirectional attention" in its
attention-interface docs): ``config.is_causal = False`` makes the model build bidirectional padding masks instead of
causal ones and pass ``is_causal=False`` to every attention function (sdpa, flash-attn, and :func:`varlen_attention`,
which reads that keyword before the module's ``is_causal``). Packed rows under sdpa/eager get the block-diagonal mask
of :func:`packed_bidirectional_mask` (transformers' bidirectional mask ignores the restarting position ids). Because
the flag is a config attribute, the exported ``config.json`` carries it: ``AutoModel.from_pretrained`` and
``SentenceTransformer`` load the same bidirectional model without any code of this repository.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

VARLEN = "varlen"


try:  # resolved once at import, so that torch.compile traces the attention call without a graph break
    from torch.nn.attention.varlen import varlen_attn as _VARLEN_ATTN

    _VARLEN_PARAMS = frozenset(inspect.signature(_VARLEN_ATTN).parameters)
except ImportError:  # torch < 2.10
    _VARLEN_ATTN, _VARLEN_PARAMS = None, frozenset()


def _torch_varlen() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """PyTorch's varlen_attn and the names of its parameters, or None when this torch has none (< 2.10)."""
    return None if _VARLEN_ATTN is None else (_VARLEN_ATTN, _VARLEN_PARAMS)


def torch_varlen_available() -> bool:
    return _torch_varlen() is not None


def kernel_for(device: torch.device, dtype: torch.dtype, dropout: float) -> str:
    """'torch' when PyTorch's flash varlen kernel can run (CUDA, bf16/fp16, no dropout), else 'segments'."""
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and dropout == 0.0 and torch_varlen_available():
        return "torch"
    return "segments"


def varlen_kernel(query: torch.Tensor, dropout: float) -> str:
    """The kernel :func:`varlen_attention` runs for `query` (see :func:`kernel_for`)."""
    return kernel_for(query.device, query.dtype, dropout)


def torch_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    *,
    scale: float | None,
    causal: bool,
    window: int | None = None,
    varlen_fn: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """PyTorch's varlen_attn on q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], whatever its release's keywords.

    `window`: transformers' sliding window W (module docstring), passed as ``window_size`` (torch >= 2.11; a
    RuntimeError on torch 2.10, which has no window: :func:`varlen_attention` runs the segments kernel there).
    `varlen_fn` replaces the kernel (tests); its parameter names are read the same way.
    """
    if varlen_fn is None:
        found = _torch_varlen()
        if found is None:
            raise RuntimeError("torch.nn.attention.varlen.varlen_attn needs torch >= 2.10")
        varlen_fn, params = found
    else:
        params = frozenset(inspect.signature(varlen_fn).parameters)
    kwargs: dict[str, Any] = {}
    if window is not None:
        if "window_size" not in params:
            raise RuntimeError("this torch's varlen_attn has no window_size (sliding windows need torch >= 2.11)")
        kwargs["window_size"] = (window - 1, 0) if causal else (window, window)
    elif causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)  # torch >= 2.11: causal is a left-unbounded, right-0 window
        else:
            kwargs["is_causal"] = True  # torch 2.10
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if hq != hkv:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is not None and not math.isclose(scale, d**-0.5, rel_tol=1e-6):
        if "scale" in params:
            kwargs["scale"] = scale
        else:
            q = q * (scale * math.sqrt(d))  # softmax((q s sqrt(d)) k^T / sqrt(d)) = softmax(q k^T s)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return varlen_fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    *,
    dropout: float,
    scale: float | None,
    causal: bool,
    window: int | None = None,
) -> torch.Tensor:
    """sdpa on each sequence's slice: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D]. `window`:
    transformers' sliding window (module docstring), a banded mask for the sequences it binds."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mask = window_mask(b - a, window, causal=causal, device=query.device)
        outs.append(F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=mask,
            dropout_p=dropout, is_causal=causal and mask is None, scale=scale, enable_gqa=gqa,
        ))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def window_binds(length: int, window: int | None, *, causal: bool) -> bool:
    """Whether transformers' sliding `window` hides any token of a sequence of `length` tokens from another: causal,
    a token sees the `window` - 1 before it (binds when length > window); bidirectional, every token at distance
    <= `window` (binds when length > window + 1)."""
    return window is not None and length > (window if causal else window + 1)


def window_mask(length: int, window: int | None, *, causal: bool, device: torch.device) -> torch.Tensor | None:
    """[L, L] boolean sdpa mask (True = attend) of one sequence under transformers' sliding `window` (causal:
    query i sees keys i - window < j <= i; bidirectional: |i - j| <= window); None when the window does not bind
    (plain causal or full attention)."""
    if not window_binds(length, window, causal=causal):
        return None
    pos = torch.arange(length, device=device)
    distance = pos[:, None] - pos[None, :]  # query index - key index
    if causal:
        return (distance >= 0) & (distance < window)
    return distance.abs() <= window


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function "varlen": per-sequence attention of a packed row (see module docstring).

    ``cu_seq_lens_q`` [n + 1] are the sequence bounds (for the segments kernel best a CPU tensor: no device sync),
    ``max_length_q`` the longest sequence (computed from the bounds when not given), `sliding_window` the layer's
    window (transformers' semantics, module docstring; None: none).
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("varlen attention needs packed inputs (one row and cu_seq_lens_q); use sdpa for padded ones")
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))  # config.is_causal arrives as a kwarg
    if varlen_kernel(query, dropout) == "torch":
        if max_length_q is None:
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        window = sliding_window if window_binds(int(max_length_q), sliding_window, causal=causal) else None
        if window is None or "window_size" in _torch_varlen()[1]:  # torch 2.10 has no window: segments below
            out = torch_varlen_attention(
                query[0].transpose(0, 1).contiguous(),
                key[0].transpose(0, 1).contiguous(),
                value[0].transpose(0, 1).contiguous(),
                cu_seq_lens_q, int(max_length_q), scale=scaling, causal=causal, window=window,
            )
            return out.unsqueeze(0), None
    return _segments_outside_graph(query, key, value, cu_seq_lens_q, dropout=dropout, scale=scaling, causal=causal,
                                   window=sliding_window), None


@torch.compiler.disable
def _segments_outside_graph(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, *,
    dropout: float, scale: float | None, causal: bool, window: int | None = None,
) -> torch.Tensor:
    """:func:`segment_attention` with the bounds read from `cu_seq_lens`. A Python loop over data-dependent bounds
    cannot be one graph: compiled layers (``model.compile``) run it eagerly, between the graphs before and after."""
    bounds = cu_seq_lens.tolist()
    return segment_attention(query, key, value, bounds, dropout=dropout, scale=scale, causal=causal, window=window)


def register_varlen_attention() -> None:
    """Register :func:`varlen_attention` as attn_implementation "varlen" (idempotent). No mask function is
    registered for it, so transformers builds no mask at all (it would be ignored anyway)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


# --------------------------------------------------------------------------------------------------------------
# Causal or bidirectional (model.attention_mask)
# --------------------------------------------------------------------------------------------------------------
CAUSAL, BIDIRECTIONAL = "causal", "bidirectional"
IS_CAUSAL_TRANSFORMERS = (5, 2)  # the first transformers release that honours config.is_causal


def transformers_honours_is_causal() -> bool:
    import transformers

    release = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    return release >= IS_CAUSAL_TRANSFORMERS


def resolve_attention_mask(requested: str, hf_config: object, *, decoder: bool) -> str:
    """``model.attention_mask`` -> 'causal' or 'bidirectional'. 'auto' is the model's own: encoders are
    bidirectional, decoders causal unless their config says ``is_causal: false`` (an export of a bidirectional run).
    ValueError naming the key for causal encoders and, for bidirectional decoders, a transformers too old to honour
    ``config.is_causal``."""
    own = BIDIRECTIONAL if not decoder or getattr(hf_config, "is_causal", True) is False else CAUSAL
    mode = own if requested == "auto" else requested
    if mode == CAUSAL and not decoder:
        raise ValueError(f"model.attention_mask: causal needs a decoder; {getattr(hf_config, 'model_type', '?')} is an "
                         "encoder (bidirectional by construction)")
    if mode == BIDIRECTIONAL and decoder and not transformers_honours_is_causal():
        import transformers

        raise ValueError(f"model.attention_mask: bidirectional decoders need transformers >= 5.2 (config.is_causal); "
                         f"installed {transformers.__version__}")
    return mode


def set_attention_mask(config: object, mode: str) -> None:
    """Make a decoder's transformers `config` causal or bidirectional (``config.is_causal``; only written when it
    changes, so a causal model's config stays as it was)."""
    causal = mode == CAUSAL
    if getattr(config, "is_causal", True) != causal:
        config.is_causal = causal


def packed_bidirectional_mask(cu_seqlens: torch.Tensor, *, attn_implementation: str, dtype: torch.dtype,
                              device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] mask of a packed row for sdpa (bool, True = attend) or eager (additive: 0 / dtype min): every
    token attends to every token of its own sequence and to no other, the bounds given by `cu_seqlens` [n + 1]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    allowed = (segment[:, None] == segment[None, :])[None, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ValueError(f"no packed bidirectional mask for attention {attn_implementation!r}")
