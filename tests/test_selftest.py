"""python -m pipeline.selftest on configs/tiny-cpu.yaml and the example shards: every check's line and the verdict, the
compile check compiled on CPU (inductor's C++ backend), a check that raises (FAIL naming the check and the setting,
the others still run), the isolation check catching a leak between packed sequences, the kernels check's comparison
(a stand-in patch, liger's Triton kernels need CUDA), bad configs, and launch/train.sh --selftest."""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import types

import pytest
import torch

from helpers_model import one_torch_thread
from train_helpers import REPO, TINY

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

CHECKS = ("kernels", "compile", "gradcache", "chunk_tokens", "optimizer", "attention")
LINE = re.compile(r"^selftest (?P<name>[a-z_]+): (?P<status>ok|FAIL|skipped) - (?P<detail>.+) \((?P<s>\d+\.\d) s\)$")


def run_selftest(*args: str) -> tuple[int, list[str]]:
    """pipeline.selftest.main in this process; (exit code, stdout lines)."""
    from pipeline.selftest import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--config", str(TINY), *args])
    return code, out.getvalue().splitlines()


def parsed(lines: list[str]) -> dict[str, re.Match]:
    """The check lines, every one in the documented form, in the documented order, then the verdict."""
    assert len(lines) == len(CHECKS) + 1, lines
    matches = [LINE.match(line) for line in lines[:-1]]
    assert all(matches), lines
    assert tuple(m["name"] for m in matches) == CHECKS
    assert lines[-1].startswith("selftest: "), lines[-1]
    return {m["name"]: m for m in matches}


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, (pattern, text)
    return float(found.group(1))


@pytest.fixture(scope="module")
def failing_run(example_shards):
    """The whole self-test on tiny-cpu (compile resolves off on CPU) with the chunk_tokens check raising an
    out-of-memory error: (exit code, lines, the SIGINT/SIGTERM handlers before the run)."""
    import pipeline.selftest as selftest

    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    def out_of_memory(ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selftest, "check_chunk_tokens", out_of_memory)
        code, lines = run_selftest(f"data.shards={example_shards}")
    return code, lines, handlers


def test_tiny_cpu_lines_and_a_failing_check(failing_run):
    """Every check prints its line, also after another check raised; the verdict names the failed check and the
    setting to change (exit 1); nothing of the run is left in the process (process group, signal handlers)."""
    code, lines, handlers_before = failing_run
    checks = parsed(lines)
    assert code == 1
    assert checks["kernels"]["status"] == "skipped"
    assert checks["kernels"]["detail"] == ("auto: the ranks run on cpu, liger-kernel's Triton kernels need CUDA "
                                           "(device cpu)")
    assert checks["compile"]["status"] == "skipped"
    assert checks["compile"]["detail"].startswith("model.compile auto resolves off on cpu")
    gradcache = checks["gradcache"]
    assert gradcache["status"] == "ok" and gradcache["detail"].startswith("fp32 (the run's dtype on cpu")
    assert number(r"relative gradient error ([\d.e+-]+)", gradcache["detail"]) <= 1e-5
    assert "replay difference 0.0e+00" in gradcache["detail"]
    chunk = checks["chunk_tokens"]
    assert chunk["status"] == "FAIL"
    assert chunk["detail"] == ("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB; set "
                               "gradcache.chunk_tokens: 512 (or model.gradient_checkpointing: true)")
    optimizer = checks["optimizer"]
    assert optimizer["status"] == "ok", optimizer.string
    assert re.match(r"ZeRO stage 3 \(no offload; zero3\.json\), one process: step of 8 queries in [\d.]+ s, loss "
                    r"[\d.]+, process peak RSS [\d,]+ MiB \(no GPU memory to measure on cpu\)$", optimizer["detail"])
    attention = checks["attention"]
    assert attention["status"] == "ok"
    assert attention["detail"].startswith("varlen (per-sequence sdpa), packed rows, causal mask; 6 sequences")
    assert number(r"max \|difference\| ([\d.e+-]+)", attention["detail"]) <= 1e-5
    assert lines[-1] == ("selftest: FAIL - chunk_tokens: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                         "20.00 GiB; gradcache.chunk_tokens: 512 (or model.gradient_checkpointing: true)")
    assert not torch.distributed.is_initialized()
    # the handlers the process had before (a background shell starts it with SIGINT ignored: kept, not reset)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


def test_chunk_tokens_line_and_safe_verdict(example_shards):
    """The chunk_tokens check itself (the value as set, one real step, the process's peak RSS on CPU), and the verdict
    of a run whose checks pass: safe to launch, the skipped ones named (exit 0)."""
    code, lines = run_selftest(f"data.shards={example_shards}", "--checks", "chunk_tokens")
    checks = parsed(lines)
    assert code == 0
    assert re.match(r"gradcache\.chunk_tokens 1024 \(as set, world size 1\); one GradCache step of the largest of the "
                    r"first 8 batches: [\d,]+ tokens in \d+ chunks \(largest [\d,]+ tokens\), [\d.]+ s; no GPU memory "
                    r"to measure on cpu: process peak RSS [\d,]+ MiB", checks["chunk_tokens"]["detail"])
    assert checks["chunk_tokens"]["status"] == "ok"
    assert all(checks[name]["detail"] == "not selected (--checks)" for name in CHECKS if name != "chunk_tokens")
    assert lines[-1] == ("selftest: safe to launch (1 checks passed, 5 skipped: kernels, compile, gradcache, "
                         "optimizer, attention)")


def test_compile_check_compiles_on_cpu(example_shards):
    """model.compile=true: the compiled model (inductor, CPU) against its eager copy within 1e-5, graphs counted, none
    compiled after the first step. Attention dropout off, so the comparison runs in training mode: the graphs the
    trainer compiles at start (with dropout it would compile eval graphs as well: minutes on 2 CPU cores)."""
    code, lines = run_selftest(f"data.shards={example_shards}", "model.compile=true",
                               "model.from_config.attention_dropout=0.0", "--checks", "compile")
    compile_line = parsed(lines)["compile"]
    assert code == 0 and compile_line["status"] == "ok", lines
    detail = compile_line["detail"]
    assert detail.startswith("compiled vs eager (float32, one chunk of ")
    assert "training mode" in detail
    assert number(r"gradient relative error ([\d.e+-]+)", detail) <= 1e-5
    assert number(r"forward ([\d.e+-]+)", detail) <= 1e-5
    assert number(r"; (\d+) graphs compiled", detail) > 0
    assert detail.endswith(", 0 recompiles after the first step")


@pytest.fixture(scope="module")
def context(example_shards):
    from pipeline.selftest import parse_args, prepare

    return prepare(parse_args(["--config", str(TINY), f"data.shards={example_shards}"]))


def test_isolation_check_catches_a_leak(context, monkeypatch):
    """Causal attention over the whole packed row instead of per sequence (the sequence bounds ignored): the later
    sequences see the earlier ones, and the attention check fails naming the attention settings."""
    import pipeline.model.attention as attention
    from pipeline.selftest import check_attention

    clean = check_attention(context)
    assert clean.status == "ok" and number(r"max \|difference\| ([\d.e+-]+)", clean.detail) <= 1e-5
    per_sequence = attention.segment_attention

    def whole_row(query, key, value, bounds, **kwargs):
        return per_sequence(query, key, value, [bounds[0], bounds[-1]], **kwargs)

    monkeypatch.setattr(attention, "segment_attention", whole_row)
    leaked = check_attention(context)
    assert leaked.status == "FAIL"
    assert number(r"max \|difference\| ([\d.e+-]+)", leaked.detail) > 100 * 1e-5
    assert leaked.detail.endswith("(> 1e-05, float32): sequences are not isolated")
    assert leaked.advice == "model.attn_implementation: sdpa (or model.packing: padded)"


def test_isolation_of_a_padded_encoder(context):
    """An encoder (all-MiniLM-L6-v2, the shards' own tokenizer) gets padded chunks: a padded chunk against each
    sequence alone."""
    import dataclasses

    from data_helpers import minilm_dir
    from pipeline.model.embedding import load_hf_config, resolve_model_settings
    from pipeline.selftest import check_attention

    cfg = dataclasses.replace(context.cfg, model=dataclasses.replace(context.cfg.model, from_config=None,
                                                                     name_or_path=minilm_dir(), tokenizer=None,
                                                                     pooling="auto", attn_implementation="auto"))
    settings = resolve_model_settings(cfg.model, load_hf_config(cfg.model), context.device)
    result = check_attention(dataclasses.replace(context, cfg=cfg, settings=settings))
    assert result.status == "ok", result.line()
    assert result.detail.startswith("sdpa, padded chunks, bidirectional mask; 6 sequences")
    assert "in one padded chunk vs alone" in result.detail
    assert number(r"max \|difference\| ([\d.e+-]+)", result.detail) <= 1e-5


def _stand_in_patch(eps: float):
    """A stand-in for liger's patch (its Triton kernels need CUDA): every RMSNorm instance gets another forward,
    bound in the instance's ``__dict__`` as liger binds its own: the same normalisation written out (`eps` None: the
    module's own epsilon) or a wrong one."""

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + (eps or self.variance_epsilon))).to(x.dtype)

    def apply_kernels(backbone, choice, **kwargs):
        for module in backbone.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.__dict__["forward"] = types.MethodType(forward, module)
        return None

    return apply_kernels


@pytest.mark.parametrize("dtype, eps, status", [("float32", None, "ok"), ("float32", 0.5, "FAIL"),
                                                ("bfloat16", None, "ok")])
def test_kernels_check_compares_a_patched_layer(example_shards, monkeypatch, dtype, eps, status):
    """The kernels check's comparison on CPU: a patched copy's decoder layer against the unpatched layer on a real
    chunk's inputs, the patched modules counted; an equivalent patch passes (fp32: <= 1e-5; bf16: against the fp32
    layer), a wrong one fails naming model.kernels."""
    import dataclasses

    import pipeline.model.kernels as kernels
    from pipeline.selftest import check_kernels, parse_args, prepare

    context = prepare(parse_args(["--config", str(TINY), f"data.shards={example_shards}", f"model.dtype={dtype}"]))
    monkeypatch.setattr(kernels, "apply_kernels", _stand_in_patch(eps))
    ctx = dataclasses.replace(context, settings=dataclasses.replace(
        context.settings, kernels=kernels.KernelChoice("liger", "stand-in")))
    result = check_kernels(ctx)
    assert result.status == status, result.line()
    assert result.detail.startswith(f"liger-patched vs unpatched Qwen3DecoderLayer ({dtype}, ")
    assert result.detail.endswith("; patched: Qwen3RMSNorm x9")  # 4 per layer (2 layers) and the final norm
    if status == "FAIL":
        assert result.advice == "model.kernels: none"
    elif dtype == "float32":
        assert number(r"gradient relative error ([\d.e+-]+)", result.detail) <= 1e-5
    else:
        assert re.search(r"gradient relative error [\d.e+-]+ \(vs fp32: [\d.e+-]+, eager [\d.e+-]+\)", result.detail)


def test_a_fallback_is_a_warning_in_its_line(context, monkeypatch):
    """model.compile auto resolving on, then failing at its first use: CompileWatch falls back to eager layers, and the
    compile check passes with the fallback as a WARNING in its line (and in the verdict's fallbacks)."""
    import dataclasses

    import pipeline.model.compiled as compiled
    import pipeline.model.embedding as embedding
    from pipeline.selftest import check_compile, verdict

    def inductor_fails(model, max_len):
        raise RuntimeError("inductor: C++ compiler not found")

    monkeypatch.setattr(embedding, "resolve_compile", lambda requested, device_type, packed: True)
    monkeypatch.setattr(compiled, "trial_step", inductor_fails)
    ctx = dataclasses.replace(context, settings=dataclasses.replace(context.settings, compile=True))
    result = check_compile(ctx)
    assert result.status == "ok", result.line()
    assert result.detail == "nothing compiled to compare: the layers run eagerly"
    assert result.warnings == ["model.compile: auto failed (RuntimeError: inductor: C++ compiler not found); falling "
                               "back to eager layers (not compiled)"]
    assert "; WARNING model.compile: auto failed" in result.line()
    assert verdict([result]) == ("selftest: safe to launch (1 checks passed, 0 skipped; fallbacks: compile)", 0)


def test_bad_config_is_one_line_and_exit_2(example_shards, capsys):
    from pipeline.selftest import main

    assert main(["--config", str(TINY), f"data.shards={example_shards}", "model.kernels=liger"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.kernels: liger cannot be used: the ranks run on cpu")
    assert main(["--config", str(TINY), "data.shards=/nonexistent/shards"]) == 2
    assert capsys.readouterr().err.startswith("error: /nonexistent/shards: shard directory does not exist")
    assert main(["--config", str(TINY), "--checks", "compile,speed"]) == 2
    assert "unknown check 'speed'" in capsys.readouterr().err


def test_train_sh_selftest_command():
    """launch/train.sh --selftest runs python -m pipeline.selftest in one process, for the world size of this
    machine's launch; --selftest --help shows the self-test's options."""
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "3"}
    dry = subprocess.run(["bash", "launch/train.sh", "--selftest", "--config", "configs/tiny-cpu.yaml", "--dry-run",
                          "model.compile=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "# cpu: self-test in one process for a run of 2 rank(s); OMP_NUM_THREADS=3",
        f"python3 -m pipeline.selftest --config {REPO}/configs/tiny-cpu.yaml --world-size 2 model.compile=true"]
    helped = subprocess.run(["bash", "launch/train.sh", "--selftest", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m pipeline.selftest"), helped.stderr
    both = subprocess.run(["bash", "launch/train.sh", "--selftest", "--check", "--config", "configs/tiny-cpu.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "--check and --selftest: choose one" in both.stderr
