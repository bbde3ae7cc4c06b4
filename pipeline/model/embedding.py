"""Embedding model: any transformers AutoModel + pooling + L2 normalisation, fed packed or padded chunks.

embedding(x) = normalize(pool(H(x))), H the backbone's last hidden states, pool one of
- last_token: H at the sequence's final token (its EOS) - F2LLM's pooling, the default for decoders;
- mean: average of H over the sequence's real tokens (encoders such as all-MiniLM-L6-v2);
- cls: H at the sequence's first token.
normalize(v) = v / ||v||_2, so the dot product of two embeddings is their cosine similarity.

Decoders get padding-free packed chunks (:func:`pipeline.model.packing.pack`), encoders length-bucketed padded ones:
BERT-style models ignore restarting position_ids, so packing would let sequences attend to each other.
The KV cache is always off (``use_cache=False``): with a cache transformers silently skips the packed-sequence mask.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.attention import (
    CAUSAL, VARLEN, kernel_for, packed_bidirectional_mask, register_varlen_attention, resolve_attention_mask,
    set_attention_mask,
)
from pipeline.model.compiled import compile_layers, repeated_layers, resolve_compile
from pipeline.model.kernels import KernelChoice, apply_kernels, resolve_kernels
from pipeline.model.lora import apply_lora, check_lora, describe_lora
from pipeline.config import ModelConfig
from pipeline.fallbacks import Fallback
from pipeline.logs import log
from pipeline.model.packing import ChunkInputs, build_inputs, padding_efficiency, plan_chunks

POOLINGS = ("last_token", "mean", "cls")


# --------------------------------------------------------------------------------------------------------------
# Resolution of the "auto" settings
# --------------------------------------------------------------------------------------------------------------
def flash_attn_available() -> bool:
    """True when the flash-attn package imports (it cannot even be installed without CUDA)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build is as good as none
        return False
    return True


def resolve_attn_implementation(
    requested: str, device: torch.device, *, packed: bool = False, flash: bool | None = None
) -> str:
    """The transformers attn_implementation to build the backbone with.

    * 'auto': flash_attention_2 when flash-attn imports on CUDA; else 'varlen' for packed chunks, sdpa for padded.
    * 'varlen' (packed chunks only): per-sequence attention of packed rows - flash-attn's varlen kernel
      (flash_attention_2, fed ``cu_seq_lens``) when it imports on CUDA, else :func:`pipeline.model.attention.varlen_attention`
      (PyTorch's ``varlen_attn`` on CUDA, per-sequence sdpa on CPU).
    * anything else as given; flash_attention_2 must be importable on CUDA.

    `flash`: whether flash-attn is usable on `device` (default: CUDA and it imports in this process).
    """
    if flash is None:
        flash = device.type == "cuda" and flash_attn_available()
    if requested == "auto":
        return "flash_attention_2" if flash else (VARLEN if packed else "sdpa")
    if requested == VARLEN:
        if not packed:
            raise ValueError("model.attn_implementation=varlen needs packed chunks (a decoder with packing auto/packed)")
        return "flash_attention_2" if flash else VARLEN
    if requested == "flash_attention_2" and not flash:
        raise ValueError("model.attn_implementation=flash_attention_2 needs CUDA and an importable flash-attn")
    return requested


def describe_attention(attn: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel behind `attn` on `device`, for the startup log line."""
    if attn != VARLEN:
        return attn
    if kernel_for(device, dtype, 0.0) == "torch":
        return "varlen (torch.nn.attention.varlen.varlen_attn; per-sequence sdpa when attention dropout > 0)"
    return "varlen (per-sequence sdpa)"


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def is_decoder_config(config: Any) -> bool:
    """Decoder-only models: a causal-LM architecture that is not also a masked-LM encoder (BERT is both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model type {config.model_type!r} is an encoder-decoder; use a decoder or an encoder")
    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def sentence_transformers_pooling(model_dir: str | None) -> str | None:
    """The pooling a sentence-transformers model dir declares (1_Pooling/config.json here or one level up)."""
    if not model_dir:
        return None
    for base in (Path(model_dir), Path(model_dir).parent):
        path = base / "1_Pooling" / "config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            if cfg.get("pooling_mode_lasttoken"):
                return "last_token"
            if cfg.get("pooling_mode_cls_token"):
                return "cls"
            if cfg.get("pooling_mode_mean_tokens"):
                return "mean"
    return None


def resolve_pooling(requested: str, *, decoder: bool, model_dir: str | None) -> str:
    """'auto' -> the model dir's sentence-transformers pooling when it declares one (an export: a bidirectional
    decoder trained with mean pooling is evaluated with mean pooling), else last_token for decoders, mean for
    encoders."""
    if requested != "auto":
        return requested
    return sentence_transformers_pooling(model_dir) or ("last_token" if decoder else "mean")


def resolve_packing(requested: str, *, decoder: bool) -> bool:
    """True = packed. 'auto' packs decoders; encoders cannot be packed (they ignore restarting position ids)."""
    if requested == "packed" and not decoder:
        raise ValueError("model.packing=packed needs a decoder: encoders ignore packed position_ids; use padded")
    return requested == "packed" or (requested == "auto" and decoder)


# --------------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------------
def pool(hidden: torch.Tensor, inputs: ChunkInputs, mode: str) -> torch.Tensor:
    """[n, d] pooled states from hidden [1, T, d] (packed) or [n, L, d] (padded, right-padded)."""
    lengths = inputs.lengths.to(hidden.device)
    if inputs.packed:
        flat = hidden[0]
        starts = inputs.starts.to(hidden.device)
        if mode == "last_token":
            return flat[starts + lengths - 1]
        if mode == "cls":
            return flat[starts]
        if mode == "mean":
            seg = torch.repeat_interleave(torch.arange(inputs.n, device=hidden.device), lengths)
            sums = torch.zeros(inputs.n, flat.shape[-1], dtype=flat.dtype, device=flat.device).index_add(0, seg, flat)
            return sums / lengths.unsqueeze(1).to(flat.dtype)
    else:
        rows = torch.arange(inputs.n, device=hidden.device)
        if mode == "last_token":
            return hidden[rows, lengths - 1]
        if mode == "cls":
            return hidden[:, 0]
        if mode == "mean":
            mask = inputs.attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / lengths.unsqueeze(1).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLINGS}")


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def remote_code_hint(exc: BaseException, trusted: bool) -> str:
    """``"; the directory ships its own code: ..."`` when `exc` is transformers refusing to run a directory's code
    (``auto_map``) without trust_remote_code; else ``""``."""
    if trusted or "trust_remote_code" not in str(exc):
        return ""
    return ("; the directory ships its own code (auto_map): set model.trust_remote_code true (--trust-remote-code) "
            "if it comes from a trusted source")


def load_hf_config(cfg: ModelConfig) -> Any:
    """The transformers config of the model: from the directory/hub name, or built from ``model.from_config``.
    Raises ValueError naming the key (``model.from_config: ...`` / ``model.name_or_path: ...``)."""
    from transformers import AutoConfig

    if (cfg.name_or_path is None) == (cfg.from_config is None):
        raise ValueError("model: set exactly one of name_or_path and from_config")
    if cfg.from_config is not None:
        kwargs = dict(cfg.from_config)
        model_type = kwargs.pop("model_type", None)
        if not model_type:
            raise ValueError("model.from_config: missing model_type (e.g. qwen3)")
        try:
            config = AutoConfig.for_model(model_type, **kwargs)
        except Exception as exc:  # noqa: BLE001 - unknown model type, bad kwargs
            raise ValueError(f"model.from_config: {' '.join(str(exc).split())[:300]}") from None
        config.use_cache = False
        return config
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, hub errors: all mean "cannot load"
        raise ValueError(f"model.name_or_path: cannot load the model config of {cfg.name_or_path!r} "
                         f"({type(exc).__name__}{remote_code_hint(exc, cfg.trust_remote_code)})") from None


def load_tokenizer_for(cfg: ModelConfig) -> Any:
    """The tokenizer of the run: ``model.tokenizer``, else ``model.name_or_path``. A private copy (the export
    modifies its post-processor). Raises ValueError naming ``model.tokenizer``."""
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.name_or_path
    if path is None:
        raise ValueError("model.tokenizer: required when the model is built from_config")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, hub errors: all mean "cannot load"
        raise ValueError(f"model.tokenizer: cannot load {path!r} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}){remote_code_hint(exc, cfg.trust_remote_code)}"
                         ) from None


def check_vocabulary(vocab_size: int, tokenizer: Any) -> None:
    """The model's embedding table must cover every id the tokenizer produces (ValueError naming both sizes)."""
    if vocab_size < len(tokenizer):
        raise ValueError(f"model: vocabulary ({vocab_size}) is smaller than the tokenizer's ({len(tokenizer)})")


@dataclass(frozen=True)
class ModelSettings:
    """The 'auto' settings of :class:`ModelConfig` resolved for one device: what the model will be built with.
    :meth:`EmbeddingModel.from_config` builds from it; ``launch/train.py --check`` reports it."""

    decoder: bool
    pooling: str
    packed: bool
    attn_implementation: str
    dtype: torch.dtype
    kernels: KernelChoice
    compile: bool
    attention_mask: str = CAUSAL  # "causal" or "bidirectional" (pipeline.model.attention.resolve_attention_mask)
    compile_auto: bool = False  # model.compile was auto: a failure at its first use falls back to eager layers


def resolve_model_settings(
    cfg: ModelConfig, hf_config: Any, device: torch.device, *, flash: bool | None = None, liger: bool | None = None
) -> ModelSettings:
    """Resolve pooling, packing, attention, dtype, fused kernels and compilation of `cfg` for `device` (ValueError
    naming the key on a setting that cannot work). `flash` / `liger`: whether flash-attn / liger-kernel are usable
    on the ranks' device (default: they import here)."""
    decoder = is_decoder_config(hf_config)
    packed = resolve_packing(cfg.packing, decoder=decoder)
    check_lora(cfg.lora)
    return ModelSettings(
        decoder=decoder,
        pooling=resolve_pooling(cfg.pooling, decoder=decoder, model_dir=cfg.name_or_path),
        packed=packed,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation, device, packed=packed, flash=flash),
        dtype=resolve_dtype(cfg.dtype, device),
        kernels=resolve_kernels(cfg.kernels, device, hf_config.model_type, importable=liger),
        compile=resolve_compile(cfg.compile, device.type, packed=packed),
        attention_mask=resolve_attention_mask(cfg.attention_mask, hf_config, decoder=decoder),
        compile_auto=cfg.compile == "auto",
    )


def build_backbone(cfg: ModelConfig, *, attn_implementation: str, dtype: torch.dtype, hf_config: Any = None) -> nn.Module:
    """transformers AutoModel from a directory/hub name (pretrained weights) or a config dict (random weights)."""
    from transformers import AutoModel

    if hf_config is None:
        hf_config = load_hf_config(cfg)
    if attn_implementation == VARLEN:
        register_varlen_attention()
    if cfg.from_config is not None:
        return AutoModel.from_config(hf_config, attn_implementation=attn_implementation, dtype=dtype,
                                     trust_remote_code=cfg.trust_remote_code)
    return AutoModel.from_pretrained(
        cfg.name_or_path, attn_implementation=attn_implementation, dtype=dtype, use_cache=False,
        trust_remote_code=cfg.trust_remote_code,
    )


def enable_checkpointing(backbone: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing of every layer (transformers >= 5: activation_checkpointing_*)."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class EmbeddingModel(nn.Module):
    """Backbone + pooling + optional L2 normalisation. ``forward(chunk_inputs) -> [n, d]`` embeddings."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        pooling: str,
        normalize: bool = True,
        packed: bool,
        pad_id: int = 0,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.packed = packed
        self.pad_id = pad_id
        self.attn_implementation = attn_implementation
        self.settings: ModelSettings | None = None  # set by from_config
        self.max_length_bound: int | None = None  # compiled packed layers: the constant max_length of every chunk
        self.fallbacks: list[Fallback] = []  # auto settings that failed at their first use (set by from_config)
        if hasattr(self.backbone, "config"):
            self.backbone.config.use_cache = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device | str | None = None) -> "EmbeddingModel":
        """Build from :class:`ModelConfig`; resolves the 'auto' settings for `device` and logs them."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        hf_config = load_hf_config(cfg)
        settings = resolve_model_settings(cfg, hf_config, device)
        decoder, pooling, packed = settings.decoder, settings.pooling, settings.packed
        attn, dtype = settings.attn_implementation, settings.dtype
        backbone = build_backbone(cfg, attn_implementation=attn, dtype=dtype, hf_config=hf_config)
        if decoder:
            set_attention_mask(backbone.config, settings.attention_mask)
        kernels_fallback = apply_kernels(backbone, settings.kernels, compiled=settings.compile)
        if cfg.gradient_checkpointing:
            enable_checkpointing(backbone)
        if cfg.lora is not None:
            backbone = apply_lora(backbone, cfg.lora)
        pad_id = getattr(hf_config, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(hf_config, "eos_token_id", None)
        if isinstance(pad_id, list):
            pad_id = pad_id[0]
        model = cls(
            backbone.to(device),
            pooling=pooling,
            normalize=cfg.normalize,
            packed=packed,
            pad_id=int(pad_id or 0),
            attn_implementation=attn,
        )
        model.settings = settings
        model.fallbacks = [kernels_fallback] if kernels_fallback is not None else []
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"model: {hf_config.model_type} ({'decoder' if decoder else 'encoder'}), {n_params / 1e6:.2f}M params, "
            f"attention {describe_attention(attn, device, dtype)}, {settings.attention_mask} mask, dtype "
            f"{str(dtype).removeprefix('torch.')}, pooling {pooling}, "
            f"{'packed' if packed else 'padded'} chunks, gradient checkpointing "
            f"{'on' if cfg.gradient_checkpointing else 'off'}, device {device}"
        )
        log(f"kernels: none ({kernels_fallback.describe()})" if kernels_fallback is not None else
            f"kernels: {settings.kernels.kernels} ({settings.kernels.reason})")
        if cfg.lora is not None:
            log(f"lora: {describe_lora(model.backbone)}")
        return model

    def compile_layers(self, *, max_length: int | None = None, chunk_tokens: object = None) -> int:
        """Compile the backbone's layers (:mod:`pipeline.model.compiled`). Packed chunks: the token dimension is
        dynamic (nothing padded) and every chunk gives the attention kernels `max_length` (the data's longest
        sequence, when given) as its max_length, a constant. `chunk_tokens` (the largest chunk) is only logged."""
        if self.packed:
            self.max_length_bound = max_length
        n = compile_layers(self.backbone, dynamic_tokens=self.packed)
        largest = f" of up to {chunk_tokens} tokens" if isinstance(chunk_tokens, int) else ""
        shapes = (f"dynamic token dimension (packed chunks{largest} unpadded; attention max_length {max_length})"
                  if self.packed else "dynamic shapes")
        log(f"compile: {n} {type(repeated_layers(self.backbone)[0]).__name__} layers compiled with torch.compile "
            f"(regional), {shapes}")
        return n

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def causal(self) -> bool:
        """Whether the backbone attends causally (``config.is_causal``, :func:`set_attention_mask`)."""
        return bool(getattr(self.backbone.config, "is_causal", True))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def make_inputs(self, seqs: list[np.ndarray]) -> ChunkInputs:
        """Packed or padded inputs for `seqs`, following this model's layout (and compiled max_length bound)."""
        return build_inputs(seqs, packed=self.packed, pad_id=self.pad_id, max_length=self.max_length_bound)

    def forward(self, inputs: ChunkInputs, raw: bool = False) -> torch.Tensor:
        """[n, d] fp32 embeddings of the chunk's sequences: L2-normalised when ``normalize``, unless `raw` (the pooled
        hidden states themselves, which embedding distillation compares)."""
        if not inputs.packed and self.attn_implementation == VARLEN:
            raise ValueError("varlen attention needs packed inputs")
        cu_host = inputs.cu_seqlens  # sequence bounds on the host for per-sequence sdpa (no device sync per layer)
        inputs = inputs.to(self.device)
        kwargs: dict[str, Any] = {"input_ids": inputs.input_ids, "use_cache": False}
        if inputs.packed:
            kwargs["position_ids"] = inputs.position_ids
            kwargs["attention_mask"] = None
            if self.attn_implementation == "flash_attention_2":
                kwargs.update(
                    cu_seq_lens_q=inputs.cu_seqlens,
                    cu_seq_lens_k=inputs.cu_seqlens,
                    max_length_q=inputs.max_length,
                    max_length_k=inputs.max_length,
                )
            elif self.attn_implementation == VARLEN:
                on_gpu = inputs.input_ids.is_cuda  # PyTorch's varlen kernel wants the bounds on the device
                kwargs["cu_seq_lens_q"] = inputs.cu_seqlens if on_gpu else cu_host
                kwargs["max_length_q"] = inputs.max_length
            elif not self.causal:  # sdpa/eager: transformers' bidirectional mask would join the packed sequences
                kwargs["attention_mask"] = packed_bidirectional_mask(
                    inputs.cu_seqlens, attn_implementation=self.attn_implementation,
                    dtype=self.backbone.get_input_embeddings().weight.dtype, device=inputs.input_ids.device)
        else:
            kwargs["attention_mask"] = inputs.attention_mask
        hidden = self.backbone(**kwargs).last_hidden_state
        emb = pool(hidden, inputs, self.pooling).float()
        return F.normalize(emb, dim=-1) if self.normalize and not raw else emb


def load_model_dir(model_dir: str, device: torch.device | str, *, trust_remote_code: bool = False
                   ) -> tuple[EmbeddingModel, str]:
    """(model, resolved directory) of an exported, HF or sentence-transformers model directory (``pkg:`` paths
    allowed), with the pooling and normalisation training would resolve for it; `trust_remote_code`: run the code
    the directory ships (``--trust-remote-code``). ValueError naming the directory."""
    from pipeline.config import resolve_resource

    model_dir = resolve_resource(model_dir) or model_dir
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: not a model directory (no config.json)")
    cfg = ModelConfig(name_or_path=model_dir, trust_remote_code=trust_remote_code)
    try:
        return EmbeddingModel.from_config(cfg, device=device), model_dir
    except (OSError, KeyError) as exc:
        raise ValueError(f"--model {model_dir}: cannot load ({exc})") from None


# --------------------------------------------------------------------------------------------------------------
# Encoding in chunks
# --------------------------------------------------------------------------------------------------------------
@dataclass
class EncodeStats:
    sequences: int
    chunks: int
    real_tokens: int
    computed_tokens: int

    @property
    def padding_efficiency(self) -> float:
        return padding_efficiency(self.real_tokens, self.computed_tokens)


def encode(
    model: nn.Module,
    seqs: list[np.ndarray],
    *,
    chunk_tokens: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, EncodeStats]:
    """Embed `seqs` chunk by chunk (token budget `chunk_tokens`, else `chunk_size` sequences per chunk).

    Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for inference). `model` is an
    :class:`EmbeddingModel` or a DeepSpeed engine around one. Returns [len(seqs), d] in input order and stats.
    """
    base = getattr(model, "module", model)
    lengths = [len(s) for s in seqs]
    chunks = plan_chunks(lengths, packed=base.packed, chunk_tokens=chunk_tokens, chunk_size=chunk_size)
    out: torch.Tensor | None = None
    computed = 0
    for idx in chunks:
        inputs = base.make_inputs([seqs[i] for i in idx])
        computed += inputs.computed_tokens
        emb = model(inputs)
        if out is None:
            out = emb.new_empty((len(seqs), emb.shape[-1]))
        out[torch.as_tensor(idx, device=emb.device)] = emb
    if out is None:
        raise ValueError("encode: no sequences")
    return out, EncodeStats(len(seqs), len(chunks), int(sum(lengths)), computed)
