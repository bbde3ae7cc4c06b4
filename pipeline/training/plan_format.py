"""The ``--check`` plan as text: every line of what ``launch/train.py --check`` prints for a valid run.

Only formatting: the numbers and choices come resolved in a :class:`pipeline.training.plan.RunPlan` (decided there
by the trainer's own functions); nothing here decides or reads a file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.training.chunk_budget import describe_work
from pipeline.training.export import merge_export_name

if TYPE_CHECKING:
    from pipeline.training.plan import ModelPlan, RunPlan, StartPlan, WorldPlan

CPU_WORLD = "one CPU process (set --world-size, --num_gpus or --hostfile)"


def _millions(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}{'' if n == 1 else 's'}"


def world_source(w: WorldPlan) -> str:
    """Where the world size comes from: ``--world-size``, the hostfile's hosts, or nodes x ranks per node."""
    if w.hosts is not None:
        listing = ", ".join(f"{h} {s}" for h, s in w.hosts.items())
        return f"hostfile {w.hostfile}: {len(w.hosts)} host(s) ({listing})"
    if w.per_node is None:
        return "--world-size"
    what = {"--num_gpus": "--num_gpus", "cuda": "this machine's GPUs", "cpu": CPU_WORLD}[w.per_node_from]
    return f"{w.nodes} node(s) x {w.per_node} ({what})"


def steps(plan: RunPlan) -> str:
    if plan.max_steps is not None:
        return f"{plan.steps_per_epoch} per epoch; {plan.total_steps} in total (train.max_steps)"
    return f"{plan.steps_per_epoch} per epoch; {plan.total_steps} in total ({_plural(plan.epochs, 'epoch')})"


def gradcache(plan: RunPlan) -> str:
    """GradCache on or off, and the chunk budget the per-step numbers were measured with."""
    gc, s = plan.gradcache, plan.sample
    if gc.chunk_tokens == "auto" and plan.device == "cuda":
        budget = (f"chunk_tokens auto (probed on the GPUs at start, {describe_work(s.work_tokens)}; "
                  f"{s.chunk_tokens} assumed here)")
    elif gc.chunk_tokens == "auto":
        budget = f"chunk_tokens auto = {s.chunk_tokens} (no GPU to probe; {describe_work(s.work_tokens)})"
    elif gc.chunk_tokens is not None:
        budget = f"chunk_tokens {gc.chunk_tokens}"
    else:
        budget = f"chunk_size {gc.chunk_size}" if gc.chunk_size is not None else "one chunk"
    return f"{'on' if gc.enabled else 'off (plain backward, same chunks)'}, {budget}"


def compiled(m: ModelPlan) -> str:
    """How the layers run (``model.compile``, :mod:`pipeline.model.compiled`)."""
    if not m.compile:
        return "eager"
    shapes = "dynamic token dimension, chunks unpadded" if m.packed else "dynamic shapes"
    soft = "; auto: eager if compiling fails at start" if m.compile_auto else ""
    return f"compiled (torch.compile per layer, {shapes}{soft})"


def score_distill(plan: RunPlan) -> str:
    sd = plan.score_distill
    if sd is None:
        return "off"
    return (f"weight {sd.weight:g}, teacher temperature {sd.teacher_temperature:g}, student temperature "
            f"{sd.student_temperature:g}; scores of {', '.join(sd.teachers)}")


def merge_exports(plan: RunPlan) -> str:
    """The merge exports line: the steps and the directories the trainer names them (first to last)."""
    if not plan.merge_steps:
        return "none"
    first, last = merge_export_name(plan.merge_steps[0]), merge_export_name(plan.merge_steps[-1])
    names = f"export/{first}" if first == last else f"export/{first} to {last}"
    return f"after steps {', '.join(map(str, plan.merge_steps))}: {names} (for python -m pipeline.merge)"


def start(s: StartPlan) -> str:
    """What the run starts from (``--resume``)."""
    if s.resume is None:
        if s.latest is None:
            return "fresh start (no complete checkpoint)"
        latest = f"{s.latest} (step {s.latest_step})" if s.latest_step is not None else str(s.latest)
        return f"fresh start (--resume auto would load {latest})"
    if s.point is None:
        return f"fresh start (no complete checkpoint in {s.root})"
    return f"resumes from {s.point.describe()}"


def fallbacks(plan: RunPlan) -> str:
    """What the last run in the output dir fell back from (``RUN/fallbacks.json``)."""
    return "; ".join(f.describe() for f in plan.fallbacks) or "none recorded"


def format_plan(plan: RunPlan) -> str:
    """The plan as aligned text lines (what ``--check`` prints)."""
    m, s, ds = plan.model, plan.sample, plan.deepspeed
    assumed = " (resolved for CUDA without flash-attn here; flash_attention_2 where it imports)"
    lines = [
        f"plan for {plan.config} (checked without starting training)",
        f"  world size         {plan.world.size}   [{world_source(plan.world)}]",
        f"  device             {plan.device}",
        f"  batch              {plan.per_device_batch} queries per rank, {plan.global_batch} global",
        f"  steps              {steps(plan)}",
        f"  datasets           {len(plan.datasets) - len(plan.skipped)} trained of {len(plan.datasets)} "
        f"(sampling temperature {plan.sampling_temperature:g}; weight = share of steps)",
        f"    {'name':<20} {'type':<15} {'train q':>8} {'val q':>6} {'batches/ep':>10} {'steps ep0':>9} "
        f"{'weight':>7} {'hard neg':>8} {'val batches':>11}",
    ]
    lines += [f"    {d.name:<20} {d.type:<15} {d.train_queries:>8} {d.validation_queries:>6} {d.batches_per_epoch:>10} "
              f"{d.steps_epoch0:>9} {d.weight:>7.3f} {d.hard_negatives:>8} {d.validation_batches:>11}"
              for d in plan.datasets]
    lines += [
        f"  per step           measured on the first {s.steps} steps' batches of epoch 0, every rank's slice:",
        f"    sequences        {s.sequences_per_step:,.0f} per step (queries, positives, hard negatives; all ranks)",
        f"    chunks per rank  mean {s.chunks_run_mean:.2f}, min {s.chunks_run_min}, max {s.chunks_run_max} "
        f"(the most any rank needs; gradcache {gradcache(plan)}, {'packed' if m.packed else 'padded'} chunks)",
        f"    tokens per step  mean {s.real_tokens_mean:,.0f} real tokens (min {s.real_tokens_min:,}, max "
        f"{s.real_tokens_max:,}; {s.real_tokens_mean / plan.world.size:,.0f} per rank); computed "
        f"{s.computed_tokens_mean:,.0f} (padding efficiency {s.real_tokens_mean / max(s.computed_tokens_mean, 1):.1%})",
        f"  model              {m.model_type} ({'decoder' if m.decoder else 'encoder'}), {_millions(m.parameters)} "
        f"parameters ({_millions(m.non_embedding_parameters)} non-embedding; counted from the config), hidden "
        f"{m.hidden_size}, {m.layers} layers",
        f"  training           {'full fine-tuning' if m.lora is None else f'LoRA {m.lora}'}",
        f"  attention          {m.attention}{assumed if m.attention_assumed else ''}, {m.attention_mask} mask; pooling "
        f"{m.pooling}; gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}",
        f"  kernels            {m.kernels} ({m.kernels_reason}); layers {compiled(m)}",
        f"  precision          {m.dtype} weights and compute{', DeepSpeed bf16' if ds.bf16 else ''}",
        f"  score distillation {score_distill(plan)}",
        f"  deepspeed          {ds.path}: ZeRO stage {ds.zero_stage}, "
        f"{', '.join(f'{what} -> {device}' for what, device in ds.offload) or 'no offload'}",
        f"  shards             {plan.shards} (sizes checked, "
        f"{'sha256 verified' if plan.verify_checksums else 'sha256 not verified: data.verify_checksums false'})",
        f"  output dir         {plan.output_dir}",
        f"  merge exports      {merge_exports(plan)}",
        f"  start              {start(plan.start)}",
        f"  last fallbacks     {fallbacks(plan)} (auto settings that failed at their first use in {plan.output_dir})",
    ]
    return "\n".join(lines)
