"""pipeline.gradcheck's distributed scale check: the unsharded reference copy runs its own layers, also when the
layers are compiled (model.compile)."""
from __future__ import annotations

import pytest
import torch

from helpers_model import REPO, one_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def test_reference_copy_has_its_own_layers_with_compile_on(monkeypatch):
    """main() as rank 0 of 2 (the process group and the per-rank check stubbed out): the copy that computes the
    reference gradient gets gradients in its own layers, and the compiled original gets none. torch.compile is the
    identity here: what is checked is which layers the copy runs, not the compiler (minutes on 2 CPU cores)."""
    import pipeline.gradcheck as gradcheck

    seen: dict[str, torch.nn.Module] = {}
    real_reference = gradcheck.reference_gradient

    def reference_gradient(model, *args, **kwargs):
        seen["copy"] = model
        return real_reference(model, *args, **kwargs)

    def check(model, *args, **kwargs) -> int:
        seen["original"] = model
        return 0

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(gradcheck, "reference_gradient", reference_gradient)
    monkeypatch.setattr(gradcheck, "init_distributed", lambda **kwargs: None)
    monkeypatch.setattr(gradcheck, "check", check)
    assert gradcheck.main(["--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--engine", "torch",
                           "--batch-size", "2", "model.compile=true"]) == 0

    from pipeline.model.compiled import repeated_layers

    original, copy = (repeated_layers(seen[name].backbone) for name in ("original", "copy"))
    assert all("forward" in vars(layer) for layer in original)  # the original's layers were compiled
    assert all(p.grad is not None for layer in copy for p in layer.parameters())
    assert all(p.grad is None for layer in original for p in layer.parameters())
