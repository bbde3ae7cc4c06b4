"""How a step's backward passes reach the parameter gradients: plain autograd, or a DeepSpeed engine.

The step functions (:mod:`pipeline.training.gradcache`) call one interface whatever runs the model:

* :meth:`Backward.accumulate` around the chunk backwards of one step;
* :meth:`Backward.backward` (``last`` = the step's last backward);
* :meth:`Backward.finish` once the step's gradient is complete;
* :meth:`Backward.grads_finite` / :meth:`Backward.discard` for the non-finite check and a skipped step.

:class:`PlainBackward` (one process, or torch.distributed without DeepSpeed): ``loss.backward()`` accumulates into
``.grad``; :meth:`finish` averages the gradients over ranks (what DDP does).

:class:`DeepSpeedBackward`, the recipe measured exact for GradCache under ZeRO-2/3 (relative error ~1e-7):
gradient_accumulation_steps must be 1; before each backward ``engine.set_gradient_accumulation_boundary(last)``,
then ``engine.backward(loss, scale_wrt_gas=False)``; the caller runs ``engine.step()`` once afterwards. Repeated
``engine.backward`` calls without the boundary flag would keep only the last one's gradient under ZeRO-1/2.
With ``gradcache.coalesce_grad_reduction`` (DeepSpeed >= 0.19.2, ZeRO 1-3 with a ZeRO optimizer) the backwards run
inside ``engine.coalesce_grad_reduction()``: the boundary stays set, no backward reduces, and the gradients are
reduced once when the context exits, instead of once per chunk.

fp32 accumulation (``gradcache.fp32_accumulation``, for bf16/fp16 parameters): autograd sums the chunks' gradients
into ``param.grad`` in the parameter's dtype, K roundings to 8 mantissa bits over K chunks (53 per step in a 512-query
0.6B run). Instead, after every backward of a step the 16-bit ``.grad`` is added into an fp32 buffer and cleared;
when the step's backwards are done the sum is rounded to the parameter dtype once - the one rounding a single
full-batch backward also makes. This is :class:`FP32Accumulator`, used by the plain path and by DeepSpeed's
coalesced path (gradients stay on the parameters until the one reduction). Without coalescing DeepSpeed reduces
every chunk, and its ``data_types.grad_accum_dtype: fp32`` (set by
:func:`pipeline.training.ds_config.training_ds_config`) sums the reduced partitions in fp32 instead. Cost: 4 bytes
per trainable 16-bit parameter while a step's backwards run.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from pipeline.training.distributed import average_gradients


def is_deepspeed_engine(model: nn.Module) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    return isinstance(model, DeepSpeedEngine)


def base_module(model: nn.Module) -> nn.Module:
    """The EmbeddingModel inside a DeepSpeed engine (or the model itself)."""
    return model.module if is_deepspeed_engine(model) else model


def coalescing_supported(engine: Any) -> bool:
    """Whether engine.coalesce_grad_reduction() exists and accepts this engine (ZeRO 1-3, ZeRO optimizer)."""
    if not hasattr(engine, "coalesce_grad_reduction"):
        return False
    try:
        managed = engine.managed_gradient_accumulation() if hasattr(engine, "managed_gradient_accumulation") else True
        return (
            managed
            and int(engine.zero_optimization_stage()) in (1, 2, 3)
            and not getattr(engine, "pipeline_parallelism", False)
            and hasattr(engine.optimizer, "_coalesce_grad_reduction")
        )
    except Exception:  # noqa: BLE001 - any surprise means: do not use it
        return False


def _finite(grads: list[torch.Tensor]) -> bool:
    if not grads:
        return True
    bad = torch.zeros((), dtype=torch.bool, device=grads[0].device)
    for g in grads:
        bad |= ~torch.isfinite(g.detach()).all().to(bad.device)
    return not bool(bad)


class FP32Accumulator:
    """Sums the 16-bit ``.grad`` of `params` over several backwards in fp32 (see the module docstring).

    Use: :meth:`collect` after each backward (adds ``.grad`` to the sum and zeroes it); :meth:`release` once at the
    end writes the sum, rounded once to each parameter's dtype, back into ``.grad``."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = [p for p in params if p.dtype in (torch.bfloat16, torch.float16)]
        self.sums: dict[int, torch.Tensor] = {}

    def collect(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            total = self.sums.get(id(p))
            if total is None:
                self.sums[id(p)] = p.grad.float()
            else:
                total.add_(p.grad)
            p.grad.zero_()  # kept (not set to None): a ZeRO-3 partitioned parameter refuses a full-size .grad later

    def release(self) -> None:
        for p in self.params:
            total = self.sums.pop(id(p), None)
            if total is not None:
                p.grad.copy_(total)
        self.sums.clear()


class Backward(abc.ABC):
    """Interface (see the module docstring). `model` is what the forward is called on; `base` the EmbeddingModel."""

    model: nn.Module
    base: nn.Module
    coalesced: bool = False
    fp32_accumulation: bool = False
    _accumulator: FP32Accumulator | None = None

    @contextlib.contextmanager
    def _fp32_sums(self) -> Iterator[None]:
        """While active, every :meth:`backward` moves the 16-bit gradients into fp32 sums; on exit they are written
        back, rounded once (nothing to do for fp32 parameters)."""
        accumulator = FP32Accumulator(self.trainable()) if self.fp32_accumulation else None
        if accumulator is None or not accumulator.params:
            yield
            return
        accumulator.collect()  # a gradient already there (none at the start of a step) joins the sum
        self._accumulator = accumulator
        try:
            yield
        finally:
            self._accumulator = None
            accumulator.release()

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Around the several backwards of one step."""
        return self._fp32_sums()

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Backpropagate `loss` into the gradients (`last`: the step's last backward)."""

    def finish(self) -> None:
        """The step's gradient is complete (after the last backward)."""

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.base.parameters() if p.requires_grad]

    def grads_finite(self) -> bool:
        """Whether this rank's gradients are all finite. No collective: all-reduce the answer (MAX of "not finite")
        so that every rank takes the same decision."""
        return _finite([p.grad for p in self.trainable() if p.grad is not None])

    def discard(self) -> None:
        """Throw away the step's gradients WITHOUT an optimizer update (a skipped step)."""
        for p in self.base.parameters():
            p.grad = None


class PlainBackward(Backward):
    """Autograd into ``.grad``; gradients averaged over ranks by :meth:`finish` when torch.distributed runs."""

    def __init__(self, model: nn.Module, *, fp32_accumulation: bool = False) -> None:
        self.model = self.base = model
        self.fp32_accumulation = fp32_accumulation

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()
        if self._accumulator is not None:
            self._accumulator.collect()

    def finish(self) -> None:
        average_gradients(self.trainable())


class DeepSpeedBackward(Backward):
    """``engine.backward`` with the accumulation boundary and optional coalesced reduction (module docstring)."""

    def __init__(self, engine: Any, *, coalesce: bool, fp32_accumulation: bool = False) -> None:
        if engine.gradient_accumulation_steps() != 1:
            raise ValueError(
                f"GradCache under DeepSpeed needs gradient_accumulation_steps 1, got {engine.gradient_accumulation_steps()}"
            )
        self.model = self.engine = engine
        self.base = engine.module
        self.coalesced = coalesce and coalescing_supported(engine)
        # Our fp32 sums only where the gradients stay on the parameters (coalesced); else DeepSpeed's grad_accum_dtype.
        self.fp32_accumulation = fp32_accumulation and self.coalesced
        self._coalescing = False

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        if not self.coalesced:
            yield
            return
        self.engine.set_gradient_accumulation_boundary(True)  # restored by the context on exit; step() needs it
        self._coalescing = True
        try:
            with self.engine.coalesce_grad_reduction(), self._fp32_sums():  # sums written back before the reduction
                yield
        finally:
            self._coalescing = False

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(False if self._coalescing else last)
        self.engine.backward(loss, scale_wrt_gas=False)
        if self._accumulator is not None:
            self._accumulator.collect()

    def grads_finite(self) -> bool:
        """Under ZeRO-3 a rank holds the reduced gradient partitions of its parameter shards
        (``deepspeed.utils.safe_get_local_grad``); otherwise the ``.grad`` of the parameters (ZeRO-0), plus the
        optimizer's reduced partitions where a ZeRO-1/2 optimizer keeps them (``averaged_gradients``)."""
        from deepspeed.utils import safe_get_local_grad

        grads = []
        for p in self.trainable():
            g = safe_get_local_grad(p) if hasattr(p, "ds_id") else p.grad
            if g is not None:
                grads.append(g)
        averaged = getattr(self.engine.optimizer, "averaged_gradients", None)
        if int(self.engine.zero_optimization_stage()) in (1, 2) and isinstance(averaged, dict):
            for group in averaged.values():
                if isinstance(group, torch.Tensor):
                    grads.append(group)
                elif group:
                    grads.extend(g for g in group if g is not None)
        return _finite(grads)

    def discard(self) -> None:
        """What DeepSpeed's own optimizers do on an fp16 overflow (``_overflow_clean_up``):
        ``optimizer.zero_grad(set_to_none=True)``, which also resets ZeRO's micro-step counter so that the next
        backward overwrites (not accumulates into) the reduced partitions, and dropping the reduced-gradient lists
        (or, with CPU offload, resetting the offload buffers). ``engine.step()`` is not called: optimizer moments
        and step count, the lr scheduler and the engine's step counters stay where they were."""
        optimizer = self.engine.optimizer
        optimizer.zero_grad(set_to_none=True)
        if getattr(optimizer, "offload_optimizer", False) and hasattr(optimizer, "reset_cpu_buffers"):
            optimizer.reset_cpu_buffers()
        elif isinstance(getattr(optimizer, "averaged_gradients", None), dict):
            optimizer.averaged_gradients = {}
        self.engine.zero_grad()


def backward_for(model: nn.Module, *, coalesce: bool = False, fp32_accumulation: bool = False) -> Backward:
    """The :class:`Backward` for `model`: a DeepSpeed engine, or a plain module."""
    if is_deepspeed_engine(model):
        return DeepSpeedBackward(model, coalesce=coalesce, fp32_accumulation=fp32_accumulation)
    return PlainBackward(model, fp32_accumulation=fp32_accumulation)
