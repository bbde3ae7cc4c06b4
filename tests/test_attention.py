"""Varlen attention (pipeline/model/attention.py): the adapter to PyTorch's varlen_attn, whatever its release's keywords,
and the model's packed forward through it, checked on CPU against reference kernels with the same contracts.

PyTorch's real kernel needs CUDA; ``bench/gpu_bench.py`` checks it against the padded sdpa path on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pipeline.model.attention as attention
from helpers_model import tiny_model
from pipeline.model.attention import segment_attention, torch_varlen_attention, varlen_kernel
from pipeline.model.packing import pack, pad


def _per_segment(query, key, value, cu, *, causal=False, scale, gqa, window=(-1, -1)):
    """Reference: q/k/v [T, H, D] -> [T, Hq, D], sdpa on each [c_i, c_{i+1}) slice. `window` (left, right): query i
    attends keys i - left .. i + right, -1 unbounded (flash-attn's convention, which varlen_attn's window_size
    follows)."""
    bounds = cu.tolist()
    left, right = window
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        i = torch.arange(b - a)
        distance = i[:, None] - i[None, :]
        allowed = ((left < 0) | (distance <= left)) & ((right < 0) | (-distance <= right))
        if causal:
            allowed &= distance >= 0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def kernel_current(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False):
    """The contract of torch >= 2.11's varlen_attn (causal = window (-1, 0); sliding windows (left, right))."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise RuntimeError("heads differ without enable_gqa")
    return _per_segment(query, key, value, cu_seq_q, window=tuple(window_size), scale=scale, gqa=enable_gqa)


def kernel_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The contract of torch 2.10's varlen_attn: no scale, no GQA."""
    if key.shape[1] != query.shape[1]:
        raise RuntimeError("heads differ")
    return _per_segment(query, key, value, cu_seq_q, causal=is_causal, scale=None, gqa=False)


@pytest.mark.parametrize("kernel", [kernel_current, kernel_2_10])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_torch_varlen_adapter_matches_per_sequence_sdpa(kernel, scale):
    torch.manual_seed(0)
    lengths = [5, 1, 17, 3]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    t, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    got = torch_varlen_attention(q, k, v, cu, max(lengths), scale=scale, causal=True, varlen_fn=kernel)
    expected = segment_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        cu.tolist(), dropout=0.0, scale=scale, causal=True,
    )[0]
    assert got.shape == (t, hq, d)
    assert (got - expected).abs().max() <= 1e-5
    # Negative control: dropping causality changes the result, so the mapping of "causal" is what is tested.
    acausal = torch_varlen_attention(q, k, v, cu, max(lengths), scale=scale, causal=False, varlen_fn=kernel)
    assert (acausal - expected).abs().max() > 1e-2


def test_kernel_choice():
    x = torch.zeros(1, 2, 4, 8)
    assert varlen_kernel(x, 0.0) == "segments"  # CPU
    assert varlen_kernel(x.bfloat16(), 0.0) == "segments"


@pytest.fixture
def torch_kernel_calls(monkeypatch) -> list[dict]:
    """The CUDA varlen branch taken on CPU: the kernel replaced by the reference above (fp32), every call's keyword
    arguments recorded in the returned list."""
    calls: list[dict] = []

    def recording_kernel(*args, **kwargs):
        calls.append(kwargs)
        return kernel_current(*args, **kwargs)

    monkeypatch.setattr(attention, "varlen_kernel", lambda query, dropout: "torch")
    monkeypatch.setattr(attention, "_torch_varlen", lambda: (recording_kernel, frozenset(
        ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "return_aux", "scale", "window_size",
         "enable_gqa"])))
    return calls


def test_model_forward_through_the_torch_kernel_path(torch_kernel_calls):
    """The packed model forward with the CUDA branch taken (kernel replaced by the reference above, fp32 on CPU):
    transformers' call, the layout transposes, cu_seq_lens and max_length all line up, and equal padded sdpa."""
    calls = torch_kernel_calls
    model = tiny_model(0, attn_implementation="varlen")
    reference = tiny_model(0, attn_implementation="sdpa")
    model.eval()
    reference.eval()
    rng = np.random.default_rng(3)
    seqs = []
    for n in (1, 2, 9, 31, 4):
        s = rng.integers(1000, 30000, size=n)
        s[-1] = 102
        seqs.append(s)
    with torch.no_grad():
        packed = model(pack(seqs))
        padded = reference(pad(seqs, pad_id=0))
    assert len(calls) == model.backbone.config.num_hidden_layers
    assert calls[0]["window_size"] == (-1, 0) and calls[0]["enable_gqa"] is True
    assert (packed - padded).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# model.attention_mask: causal or bidirectional, in every attention path
# ---------------------------------------------------------------------------------------------------------------
def _sequences(seed: int, lengths=(5, 9, 3, 12)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sequences ending in EOS, and the same sequences with every token after the first (but EOS) replaced."""
    rng = np.random.default_rng(seed)
    seqs, later = [], []
    for n in lengths:
        s = rng.integers(1000, 30000, size=n)
        s[-1] = 102
        t = s.copy()
        t[1:-1] = rng.integers(1000, 30000, size=n - 2)
        seqs.append(s)
        later.append(t)
    return seqs, later


@pytest.mark.parametrize("attn,packing", [("varlen", "packed"), ("sdpa", "packed"), ("sdpa", "padded"),
                                          ("eager", "packed"), ("eager", "padded")])
def test_bidirectional_first_token_sees_later_tokens_causal_does_not(attn, packing):
    """cls pooling = the first token's state: causal, it cannot depend on later tokens; bidirectional, it does.
    Several sequences per chunk equal one at a time: packed sequences never see each other (block mask)."""
    seqs, later = _sequences(0)
    for mode in ("causal", "bidirectional"):
        model = tiny_model(0, attn_implementation=attn, packing=packing, attention_mask=mode, pooling="cls")
        model.eval()
        assert model.causal == (mode == "causal") and model.settings.attention_mask == mode
        with torch.no_grad():
            together = model(model.make_inputs(seqs))
            changed = model(model.make_inputs(later))
            alone = torch.cat([model(model.make_inputs([s])) for s in seqs])
        assert (together - alone).abs().max() <= 1e-5, (mode, attn, packing)
        moved = float((together - changed).abs().max())
        if mode == "causal":
            assert moved <= 1e-6, (attn, packing, moved)
        else:
            assert moved > 1e-3, (attn, packing, moved)


def test_bidirectional_through_the_torch_kernel_path(torch_kernel_calls):
    """The CUDA varlen branch (kernel replaced by the reference, as above) is called without the causal window
    and equals padded bidirectional sdpa."""
    calls = torch_kernel_calls
    model = tiny_model(0, attn_implementation="varlen", attention_mask="bidirectional")
    reference = tiny_model(0, attn_implementation="sdpa", packing="padded", attention_mask="bidirectional")
    model.eval()
    reference.eval()
    seqs, _ = _sequences(3)
    with torch.no_grad():
        packed = model(pack(seqs))
        padded = reference(pad(seqs, pad_id=0))
    assert len(calls) == model.backbone.config.num_hidden_layers
    assert "window_size" not in calls[0] and "is_causal" not in calls[0]
    assert (packed - padded).abs().max() <= 1e-5


def test_bidirectional_reaches_flash_attention(monkeypatch):
    """flash_attention_2 (CUDA only) replaced by a recording per-sequence kernel: the packed forward hands it the
    sequence bounds and transformers' ``is_causal`` keyword, False for a bidirectional model, True for a causal one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []

    def fake_flash(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                   cu_seq_lens_q=None, **kwargs):
        causal = module.is_causal if is_causal is None else is_causal
        calls.append(causal)
        return segment_attention(query, key, value, cu_seq_lens_q.tolist(), dropout=dropout, scale=scaling,
                                 causal=causal), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", fake_flash)
    seqs, later = _sequences(4)
    for mode in ("causal", "bidirectional"):
        model = tiny_model(0, attn_implementation="sdpa", attention_mask=mode, pooling="cls")
        model.backbone.config._attn_implementation = "flash_attention_2"
        model.attn_implementation = "flash_attention_2"
        model.eval()
        calls.clear()
        with torch.no_grad():
            moved = float((model(model.make_inputs(seqs)) - model(model.make_inputs(later))).abs().max())
        assert calls and set(calls) == {mode == "causal"}
        assert (moved > 1e-3) == (mode == "bidirectional"), (mode, moved)


def test_attention_mask_resolution():
    from pipeline.model.attention import resolve_attention_mask
    from transformers import AutoConfig

    qwen = AutoConfig.for_model("qwen3")
    assert resolve_attention_mask("auto", qwen, decoder=True) == "causal"
    assert resolve_attention_mask("bidirectional", qwen, decoder=True) == "bidirectional"
    exported = AutoConfig.for_model("qwen3", is_causal=False)  # an export of a bidirectional run
    assert resolve_attention_mask("auto", exported, decoder=True) == "bidirectional"
    assert resolve_attention_mask("causal", exported, decoder=True) == "causal"
    bert = AutoConfig.for_model("bert")
    assert resolve_attention_mask("auto", bert, decoder=False) == "bidirectional"
    with pytest.raises(ValueError, match=r"^model.attention_mask: causal needs a decoder; bert is an encoder"):
        resolve_attention_mask("causal", bert, decoder=False)


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window layers (Mistral's sliding_window): the window within each packed sequence, as transformers' masks
# ---------------------------------------------------------------------------------------------------------------
TINY_MISTRAL = dict(model_type="mistral", vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                    sliding_window=4, pad_token_id=0, eos_token_id=102)


def _mistral(attn: str, packing: str, mode: str, window: int | None = 4):
    from pipeline.config import ModelConfig
    from pipeline.model.embedding import EmbeddingModel

    torch.manual_seed(0)
    cfg = ModelConfig(from_config=dict(TINY_MISTRAL, sliding_window=window), attn_implementation=attn,
                      packing=packing, attention_mask=mode)
    return EmbeddingModel.from_config(cfg, "cpu").eval()


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_sliding_window_varlen_equals_transformers_sdpa(mode):
    """A tiny Mistral whose window (4) is shorter than most sequences: packed varlen (segments kernel) equals
    transformers' padded sdpa with its sliding-window mask, in fp32; without the window both change (the window is
    what is compared)."""
    seqs, _ = _sequences(5, lengths=(3, 9, 17, 6, 5, 12))
    with torch.no_grad():
        packed = _mistral("varlen", "packed", mode)
        padded = _mistral("sdpa", "padded", mode)
        a, b = packed(packed.make_inputs(seqs)), padded(padded.make_inputs(seqs))
        unwindowed = _mistral("sdpa", "padded", mode, window=None)
        c = unwindowed(unwindowed.make_inputs(seqs))
    assert (a - b).abs().max() <= 1e-5
    assert (c - b).abs().max() > 1e-3


def calls_windows(calls: list[dict]) -> set[tuple[int, int]]:
    return {tuple(call["window_size"]) for call in calls}


@pytest.mark.parametrize("mode,window_size", [("causal", (3, 0)), ("bidirectional", (4, 4))])
def test_sliding_window_through_the_torch_kernel_path(torch_kernel_calls, mode, window_size):
    """The CUDA branch (kernel replaced by the windowed reference) gets transformers' window W = 4 as window_size -
    (W - 1, 0) causal, (W, W) bidirectional - and equals padded sdpa."""
    seqs, _ = _sequences(6, lengths=(3, 9, 17, 6))
    packed = _mistral("varlen", "packed", mode)
    padded = _mistral("sdpa", "padded", mode)
    with torch.no_grad():
        a, b = packed(pack(seqs)), padded(pad(seqs, pad_id=0))
    assert calls_windows(torch_kernel_calls) == {window_size}
    assert (a - b).abs().max() <= 1e-5


def test_sliding_window_that_never_binds_is_plain_causal(torch_kernel_calls):
    """Sequences no longer than the window: the kernel is called as a plain causal one (Mistral's 4096 at
    max_len 1024), and the window changes nothing."""
    seqs, _ = _sequences(7, lengths=(3, 4, 2))
    with torch.no_grad():
        windowed = _mistral("varlen", "packed", "causal")(pack(seqs))
        assert calls_windows(torch_kernel_calls) == {(-1, 0)}
        unwindowed = _mistral("varlen", "packed", "causal", window=None)(pack(seqs))
    assert torch.equal(windowed, unwindowed)


def test_window_mask_matches_transformers_semantics():
    from pipeline.model.attention import window_mask

    causal = window_mask(6, 3, causal=True, device=torch.device("cpu"))
    assert causal[5].tolist() == [False, False, False, True, True, True]  # itself and the 2 before it
    bidirectional = window_mask(6, 2, causal=False, device=torch.device("cpu"))
    assert bidirectional[2].tolist() == [True, True, True, True, True, False]  # distance <= 2
    assert window_mask(3, 3, causal=True, device=torch.device("cpu")) is None
    assert window_mask(3, 2, causal=False, device=torch.device("cpu")) is None

