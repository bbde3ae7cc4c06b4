"""liger-kernel's patch (pipeline/model/kernels.py) on CPU, with the real liger-kernel: what it patches with compiled
and eager layers, that it stays confined to the model it was applied to, and the fail-soft ``model.kernels: auto``.

Patching works on CPU; only running liger's Triton kernels needs CUDA, so the forwards here run models that liger
did not patch, or patched ones with the Triton calls replaced by torch code.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("liger_kernel.transformers", reason="pip install -e '.[test]' (liger-kernel)")

from liger_kernel.transformers import monkey_patch  # noqa: E402
from liger_kernel.transformers.rms_norm import LigerRMSNorm  # noqa: E402
from liger_kernel.transformers.rope import liger_rotary_pos_emb  # noqa: E402
from liger_kernel.transformers.swiglu import LigerSwiGLUMLP  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

from helpers_model import TINY_QWEN3, one_torch_thread, tiny_model  # noqa: E402
from pipeline.fallbacks import Fallback  # noqa: E402
from pipeline.model.kernels import LIGER_FALLBACK, KernelChoice, apply_kernels, resolve_kernels  # noqa: E402

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

TRANSFORMERS_ROPE = modeling_qwen3.apply_rotary_pos_emb
TRANSFORMERS_CLASSES = (modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3MLP)
LIGER = KernelChoice("liger", "test", auto=False)
LIGER_AUTO = KernelChoice("liger", "test", auto=True)


@pytest.fixture(autouse=True)
def transformers_qwen3(monkeypatch):
    """Whatever a test leaves in modeling_qwen3 (liger's RoPE is process-wide by design) is undone after it: later
    tests in this process run Qwen3 models on CPU, where liger's Triton RoPE cannot run."""
    for name in ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP"):
        monkeypatch.setattr(modeling_qwen3, name, getattr(modeling_qwen3, name))
    assert modeling_qwen3.apply_rotary_pos_emb is TRANSFORMERS_ROPE


def tiny_backbone(seed: int = 0) -> torch.nn.Module:
    """A tiny transformers Qwen3Model (dropout off), as EmbeddingModel.from_config builds it."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**dict(TINY_QWEN3, attention_dropout=0.0))
    return AutoModel.from_config(config, attn_implementation="sdpa").eval()


def norms_and_mlps(backbone: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    norms = [m for m in backbone.modules() if isinstance(m, TRANSFORMERS_CLASSES[0])]
    mlps = [m for m in backbone.modules() if isinstance(m, TRANSFORMERS_CLASSES[1])]
    assert len(norms) == 1 + 4 * len(backbone.layers) and len(mlps) == len(backbone.layers)
    return norms, mlps


def layer_norms(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The norms every liger release patches: the final one and each layer's input and post-attention norms."""
    return [backbone.norm] + [n for layer in backbone.layers for n in (layer.input_layernorm,
                                                                        layer.post_attention_layernorm)]


def runs_liger(module: torch.nn.Module, liger_class: type) -> bool:
    """Whether `module` runs liger's forward, bound on the instance (liger's _bind_method_to_module)."""
    bound = vars(module).get("forward")
    return bound is not None and bound.__func__ is liger_class.forward


def assert_transformers_layers(backbone: torch.nn.Module) -> None:
    norms, mlps = norms_and_mlps(backbone)
    assert not any("forward" in vars(m) for m in norms + mlps)
    assert {type(m) for m in norms} == {TRANSFORMERS_CLASSES[0]}
    assert {type(m) for m in mlps} == {TRANSFORMERS_CLASSES[1]}


def embed(backbone: torch.nn.Module) -> torch.Tensor:
    ids = torch.as_tensor(np.random.default_rng(0).integers(1000, 30000, size=(2, 11)))
    with torch.no_grad():
        return backbone(input_ids=ids, use_cache=False).last_hidden_state


def test_compiled_layers_leave_rope_to_the_compiler(pipeline_log):
    """compile on: norms and MLPs patched on the instance, RoPE left as transformers' own; compile off: liger's
    RoPE too (module-level). The family's classes are transformers' again either way."""
    compiled = tiny_backbone()
    assert apply_kernels(compiled, LIGER, compiled=True) is None
    norms, mlps = norms_and_mlps(compiled)
    assert all(runs_liger(m, LigerRMSNorm) for m in layer_norms(compiled)) and all(runs_liger(m, LigerSwiGLUMLP)
                                                                                   for m in mlps)
    patched_norms = [m for m in norms if runs_liger(m, LigerRMSNorm)]  # liger-kernel 0.8.5 also q_norm / k_norm
    assert {m._get_name() for m in patched_norms + mlps} == {"LigerRMSNorm", "LigerSwiGLUMLP"}
    assert modeling_qwen3.apply_rotary_pos_emb is TRANSFORMERS_ROPE
    assert (modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3MLP) == TRANSFORMERS_CLASSES
    assert f"{len(patched_norms)} RMSNorm and 2 MLP (SwiGLU) modules; RoPE left to torch.compile" in pipeline_log.text

    eager = tiny_backbone()
    assert apply_kernels(eager, LIGER, compiled=False) is None
    assert modeling_qwen3.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert all(runs_liger(m, LigerRMSNorm) for m in layer_norms(eager))
    assert (modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3MLP) == TRANSFORMERS_CLASSES
    assert "modeling_qwen3.apply_rotary_pos_emb stays liger's for the rest of this process" in pipeline_log.text


def test_patch_stays_with_its_model():
    """Model A patched, then model B of the same family built with kernels none: B has the transformers layers and
    computes what it computed before any patch. RoPE is the documented exception: with eager layers A's RoPE patch is
    process-wide."""
    untouched = embed(tiny_backbone(seed=1))
    apply_kernels(tiny_backbone(), LIGER, compiled=True)
    b = tiny_model(1, from_config=dict(TINY_QWEN3, attention_dropout=0.0), attn_implementation="sdpa",
                   packing="padded", kernels="none")
    assert_transformers_layers(b.backbone)
    assert torch.equal(embed(b.backbone.eval()), untouched)

    apply_kernels(tiny_backbone(), LIGER, compiled=False)
    c = tiny_model(1, kernels="none")
    assert_transformers_layers(c.backbone)
    assert modeling_qwen3.apply_rotary_pos_emb is liger_rotary_pos_emb  # process-wide (pipeline/model/kernels.py)


def failing_apply(monkeypatch, exc: Exception) -> None:
    """liger's qwen3 patch replaced by one that patches everything it can (RoPE included), then raises `exc`."""
    real = monkey_patch.apply_liger_kernel_to_qwen3

    def partial(**kwargs):
        real(**dict(kwargs, rope=True))
        raise exc

    monkeypatch.setitem(monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN, "qwen3", partial)


@pytest.mark.parametrize("compiled", [True, False])
def test_auto_falls_back_to_the_transformers_layers(monkeypatch, pipeline_log, compiled):
    """auto: a patch that fails half-way is undone (instance and module) and becomes a Fallback; the model computes
    exactly what it computed before."""
    failing_apply(monkeypatch, AttributeError("'Qwen3Attention' object has no attribute 'q_norm'"))
    backbone = tiny_backbone()
    before = embed(backbone)
    fallback = apply_kernels(backbone, LIGER_AUTO, compiled=compiled)
    assert fallback == Fallback("model.kernels", "AttributeError: 'Qwen3Attention' object has no attribute 'q_norm'",
                                LIGER_FALLBACK)
    assert_transformers_layers(backbone)
    assert modeling_qwen3.apply_rotary_pos_emb is TRANSFORMERS_ROPE
    assert (modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3MLP) == TRANSFORMERS_CLASSES
    assert torch.equal(embed(backbone), before)
    assert "model.kernels: auto failed (AttributeError: " in pipeline_log.text


def test_explicit_liger_fails_at_once(monkeypatch):
    failing_apply(monkeypatch, AttributeError("no q_norm"))
    backbone = tiny_backbone()
    with pytest.raises(ValueError, match=r"^model.kernels: liger failed \(AttributeError: no q_norm\); set "
                                         r"model.kernels: none, or auto"):
        apply_kernels(backbone, LIGER, compiled=True)
    assert_transformers_layers(backbone)
    assert modeling_qwen3.apply_rotary_pos_emb is TRANSFORMERS_ROPE


def test_model_type_liger_does_not_know(monkeypatch):
    monkeypatch.delitem(monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN, "qwen3")
    fallback = apply_kernels(tiny_backbone(), LIGER_AUTO, compiled=True)
    assert fallback is not None and fallback.error.startswith("LookupError: liger-kernel ")
    assert fallback.error.endswith("has no patch for model type 'qwen3'")
    with pytest.raises(ValueError, match=r"^model.kernels: liger failed \(LookupError: .*'qwen3'\)"):
        apply_kernels(tiny_backbone(), LIGER, compiled=True)


def test_non_swiglu_activation_is_not_patched():
    """liger's SwiGLU forward ignores the module's act_fn: a gelu MLP would silently change. It is refused."""
    backbone = tiny_backbone()
    backbone.config.hidden_act = "gelu"
    fallback = apply_kernels(backbone, LIGER_AUTO, compiled=True)
    assert fallback is not None and "hidden_act is 'gelu'" in fallback.error
    assert_transformers_layers(backbone)


def test_from_config_records_the_fallback(monkeypatch):
    """EmbeddingModel.from_config with kernels auto resolved to liger (CUDA faked) and a failing patch: the model
    builds with the transformers layers and carries the Fallback."""
    import pipeline.model.embedding as embedding

    failing_apply(monkeypatch, AttributeError("no q_norm"))
    real = embedding.resolve_kernels
    monkeypatch.setattr(embedding, "resolve_kernels",
                        lambda requested, *args, **kwargs: LIGER_AUTO if requested == "auto" else real(requested, *args,
                                                                                                          **kwargs))
    model = tiny_model(0)
    assert [f.setting for f in model.fallbacks] == ["model.kernels"]
    assert_transformers_layers(model.backbone)
    assert tiny_model(0, kernels="none").fallbacks == []


def test_resolve_kernels_remembers_auto():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernels("auto", cuda, "qwen3", importable=True) == KernelChoice(
        "liger", "liger-kernel RMSNorm, RoPE and SwiGLU for qwen3 on CUDA", auto=True)
    assert resolve_kernels("liger", cuda, "qwen3", importable=True).auto is False
    assert resolve_kernels("auto", cpu, "qwen3").auto is True


class _RMSNormInTorch:
    """liger's RMSNorm autograd function (Triton) replaced by the same arithmetic in torch."""

    @staticmethod
    def apply(x, weight, eps, offset, casting_mode, in_place, row_mode):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * (weight + offset)


class _SiLUMulInTorch:
    @staticmethod
    def apply(a, b, gate_multiplier, down_multiplier):
        return F.silu(a) * b


@pytest.mark.parametrize("compiled", [True, False])
def test_graph_breaks_of_a_patched_layer(monkeypatch, compiled):
    """torch._dynamo.explain of one patched layer, the Triton calls replaced by torch code (liger's dispatcher kept):
    with RoPE left to the compiler the layer is one graph; liger's RoPE (``@torch.compiler.disable``) breaks it."""
    dispatch_module = sys.modules.get("liger_kernel.backends.dispatch")
    if dispatch_module is None or not hasattr(dispatch_module, "resolve_impl"):
        pytest.skip("this liger-kernel calls its RoPE without the kernel dispatcher (before 0.8.3)")

    class TorchRope:
        @staticmethod
        def call(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            return TRANSFORMERS_ROPE(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr("liger_kernel.transformers.rms_norm.LigerRMSNormFunction", _RMSNormInTorch)
    monkeypatch.setattr("liger_kernel.transformers.swiglu.LigerSiLUMulFunction", _SiLUMulInTorch)
    monkeypatch.setattr(dispatch_module, "resolve_impl", lambda op, requested=None, device=None: TorchRope)
    backbone = tiny_backbone()
    reference = embed(backbone)
    apply_kernels(backbone, LIGER, compiled=compiled)
    assert (embed(backbone) - reference).abs().max() <= 1e-5  # the stubs compute what transformers does
    hidden = torch.randn(1, 12, backbone.config.hidden_size)
    position_ids = torch.arange(12)[None]
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(backbone.layers[0].forward)(
            hidden, attention_mask=None, position_ids=position_ids,
            position_embeddings=backbone.rotary_emb(hidden, position_ids))
    torch._dynamo.reset()
    if compiled:
        assert explained.graph_count == 1 and explained.graph_break_count == 0
    else:
        assert explained.graph_break_count > 0
        assert any("torch.compiler.disable" in r.reason for r in explained.break_reasons)
