"""`pipeline.merge`: mean / ema / slerp of model directories, checked by hand on tiny exported Qwen3 models; the
output loads in transformers and sentence-transformers with the prompts; incompatible inputs are one-line refusals;
LoRA exports merge without their ``adapter/``; ema and slerp refuse inputs out of step order (the step recorded by
the export, or an ``export/merge_step_<N>`` name). (The trainer's merge exports are checked in
tests/test_trainer.py.)"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_helpers import make_word_tokenizer, minilm_dir
from helpers_model import TINY_QWEN3, env_for_subprocess, one_torch_thread, tiny_model
from pipeline.merge import MergeError, linear_coefficients, main, merge_models, slerp

REPO = Path(__file__).resolve().parents[1]
INSTRUCTIONS = {"web_search": "Given a web search query, retrieve relevant passages", "topics": None}
TYPES = {"web_search": "retrieval", "topics": "clustering"}
TEMPLATE = "Instruct: {instruction}\nQuery: {query}"

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def export_tiny(out: Path, seed: int, *, step: int | None = None, **overrides) -> Path:
    """A tiny random Qwen3 exported as training exports it (HF + sentence-transformers, MiniLM's tokenizer); `step`:
    the training step the export records (none when None, as exports of earlier versions)."""
    from pipeline.data.tokenization import load_tokenizer
    from pipeline.training.export import TrainedDataset, export_model

    model = tiny_model(seed, **overrides)
    if overrides.get("lora") is not None:  # trained adapters: B != 0, so the merged weights are not the base's
        with torch.no_grad():
            for name, param in model.backbone.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02, generator=torch.Generator().manual_seed(seed))
    extra = {} if step is None else {"step": step}
    return export_model(model, load_tokenizer(minilm_dir()), out, eos_id=102, max_seq_length=64,
                        datasets={n: TrainedDataset(TYPES[n], i, 10) for n, i in INSTRUCTIONS.items()},
                        query_template=TEMPLATE, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [export_tiny(root / f"m{seed}", seed) for seed in range(3)]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_linear_coefficients_by_hand():
    assert linear_coefficients("mean", 3) == pytest.approx([1 / 3] * 3)
    assert linear_coefficients("mean", 3, [1, 2, 1]) == pytest.approx([0.25, 0.5, 0.25])
    # e1 = a; e2 = 0.6 a + 0.4 b; e3 = 0.6 e2 + 0.4 c = 0.36 a + 0.24 b + 0.4 c
    assert linear_coefficients("ema", 3, ema_decay=0.6) == pytest.approx([0.36, 0.24, 0.4])
    assert linear_coefficients("ema", 4, ema_decay=0.0) == [0.0, 0.0, 0.0, 1.0]
    for bad, match in [((3, [1, 2]), "2 value"), ((2, [1, -1]), ">= 0"), ((2, [0, 0]), "not all 0")]:
        with pytest.raises(MergeError, match=match):
            linear_coefficients("mean", *bad)
    with pytest.raises(MergeError, match="--ema-decay"):
        linear_coefficients("ema", 2, ema_decay=1.5)


def test_slerp_properties():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=gen), 3 * torch.randn(6, 5, generator=gen)
    for t, expected in ((0.0, a), (1.0, b)):
        value, linear = slerp(t, a, b)
        assert not linear and torch.equal(value, expected)
    # orthogonal unit vectors: the midpoint is on the unit circle, half way round
    mid, linear = slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert not linear
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # tensors of equal norm: at t the angle to a is t * Omega, to b (1 - t) * Omega, and the norm is kept
    # (the coefficients multiply the tensors as they are, as in mergekit: unequal norms weigh in)
    def angle(x: torch.Tensor, y: torch.Tensor) -> float:
        return math.acos(float(torch.dot(x.flatten(), y.flatten()) / (x.norm() * y.norm())))

    c = b * (a.norm() / b.norm())
    omega = angle(a, c)
    for t in (0.25, 0.5):
        value, _ = slerp(t, a, c)
        assert angle(a, value) == pytest.approx(t * omega, abs=1e-5)
        assert angle(value, c) == pytest.approx((1 - t) * omega, abs=1e-5)
        assert float(value.norm()) == pytest.approx(float(a.norm()), rel=1e-5)
    s0, s1 = math.sin(0.7 * omega) / math.sin(omega), math.sin(0.3 * omega) / math.sin(omega)
    torch.testing.assert_close(slerp(0.3, a, 3 * c)[0], s0 * a + s1 * 3 * c)
    # nearly parallel tensors (and zero ones) are interpolated linearly, as mergekit does
    value, linear = slerp(0.3, a, 2 * a + 1e-4)
    assert linear
    torch.testing.assert_close(value, 0.7 * a + 0.3 * (2 * a + 1e-4))
    assert slerp(0.5, torch.zeros(3), torch.ones(3))[1]


def test_identical_models_merge_to_themselves(models, tmp_path):
    ref = weights(models[0])
    for method, extra in (("mean", {"weights": [3, 1]}), ("ema", {"ema_decay": 0.9}), ("slerp", {})):
        out = merge_models([models[0], models[0]], tmp_path / method, method=method, progress=False, **extra)
        merged = weights(out.out)
        assert merged.keys() == ref.keys()
        for name in ref:  # equal up to fp32 rounding of the coefficients (0.9 a + 0.1 a)
            torch.testing.assert_close(merged[name], ref[name], rtol=1e-6, atol=1e-9, msg=f"{method} {name}")
    assert json.loads((tmp_path / "slerp" / "merge.json").read_text())["linear_fallback"] == len(ref)


def test_weighted_mean_ema_and_slerp_by_hand(models, tmp_path):
    a, b, c = (weights(m) for m in models)
    out = merge_models(models, tmp_path / "mean", method="mean", weights=[1, 2, 1], progress=False).out
    merged = weights(out)
    for name in a:
        torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.5 * b[name] + 0.25 * c[name])
    out = merge_models(models, tmp_path / "ema", method="ema", ema_decay=0.6, progress=False).out
    merged = weights(out)
    for name in a:
        e = 0.6 * (0.6 * a[name] + 0.4 * b[name]) + 0.4 * c[name]
        torch.testing.assert_close(merged[name], e)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "ema" and record["coefficients"] == pytest.approx([0.36, 0.24, 0.4])
    # slerp through the command: t = 1 gives the second model; t = 0.5 per tensor as slerp() computes it
    assert main([str(models[0]), str(models[1]), "--out", str(tmp_path / "s1"), "--method", "slerp",
                 "--weights", "1", "--no-progress"]) == 0
    assert all(torch.equal(v, b[k]) for k, v in weights(tmp_path / "s1").items())
    result = merge_models(models[:2], tmp_path / "s", method="slerp", progress=False)
    merged = weights(result.out)
    fallback = 0
    for name in a:
        value, linear = slerp(0.5, a[name], b[name])
        fallback += linear
        assert torch.equal(merged[name], value), name
    assert result.linear_fallback == fallback < len(a)  # random models: most tensors far from parallel


def test_merged_model_loads_in_transformers_and_sentence_transformers(models, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    out = merge_models(models, tmp_path / "merged", progress=False).out
    assert not (tmp_path / ".merged.tmp").exists()
    for name in ("config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                 "2_Normalize", "config_sentence_transformers.json"):
        assert (out / name).exists(), name
    merged = weights(out)
    hf = AutoModel.from_pretrained(str(out))
    for name, value in hf.state_dict().items():
        assert torch.equal(value, merged[name]), name
    st = SentenceTransformer(str(out), device="cpu")
    expected = "Instruct: Given a web search query, retrieve relevant passages\nQuery: "
    assert st.prompts["web_search"] == expected
    assert st.max_seq_length == 64
    emb = st.encode(["what is a merge"], prompt_name="web_search", convert_to_tensor=True)
    assert emb.shape == (1, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(1))
    # an existing output is kept unless --overwrite
    with pytest.raises(MergeError, match="exists"):
        merge_models(models, out, progress=False)
    merge_models(models[:2], out, overwrite=True, progress=False)
    assert json.loads((out / "merge.json").read_text())["inputs"] == [str(m) for m in models[:2]]


def _other_tokenizer(src: Path, out: Path, words: Path) -> Path:
    shutil.copytree(src, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (out / name).unlink(missing_ok=True)
    for f in Path(make_word_tokenizer(words)).iterdir():
        shutil.copy(f, out / f.name)
    return out


def _other_prompts(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    path = out / "config_sentence_transformers.json"
    cfg = json.loads(path.read_text())
    cfg["prompts"]["web_search"] = "Query: "
    path.write_text(json.dumps(cfg))
    return out


def _other_pooling(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    path = out / "1_Pooling" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
    path.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("case", ["tokenizer", "prompts", "pooling", "slerp_three"])
def test_incompatible_inputs_are_refused_in_one_line(case, models, tmp_path, capsys):
    a = models[0]
    args = [str(a)]
    if case == "tokenizer":
        args.append(str(_other_tokenizer(a, tmp_path / "b", tmp_path / "words")))
        expected = f"error: {a}, {tmp_path / 'b'}: different tokenizers (vocab 30522, sha256 "
    elif case == "prompts":
        args.append(str(_other_prompts(a, tmp_path / "b")))
        expected = f"error: {a}, {tmp_path / 'b'}: different query prompts (web_search: "
    elif case == "pooling":
        args.append(str(_other_pooling(a, tmp_path / "b")))
        expected = (f"error: {a}, {tmp_path / 'b'}: different sentence-transformers 1_Pooling/config.json "
                    f"(pooling_mode_lasttoken True vs False)")
    else:
        args += [str(models[1]), str(models[2]), "--method", "slerp"]
        expected = "error: --method slerp: interpolates exactly two models, got 3"
    assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


def test_other_hidden_size_is_refused_by_the_command(models, tmp_path):
    wide = export_tiny(tmp_path / "wide", 0, from_config=dict(TINY_QWEN3, hidden_size=96))
    proc = subprocess.run([sys.executable, "-m", "pipeline.merge", str(models[0]), str(wide), "--out",
                           str(tmp_path / "out")], cwd=REPO, env=env_for_subprocess(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    expected = f"error: {models[0]}, {wide}: different architecture (config.json hidden_size: 64 vs 96)"
    assert lines == [expected], proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# LoRA exports: the merged output is the full merged model, without adapter/
# --------------------------------------------------------------------------------------------------------------
def test_lora_exports_merge_to_a_full_model_without_adapter(tmp_path, pipeline_log):
    """Merging LoRA exports leaves their adapter/ out (an average of merged weights is no rank-r adapter), says so in
    the log and merge.json, and the output loads as a full model in transformers and sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from pipeline.config import LoraConfig

    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    inputs = [export_tiny(tmp_path / f"lora{seed}", seed, lora=lora) for seed in range(2)]
    for model_dir in inputs:  # what the export writes: merged weights plus the adapter alone
        assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()
    a, b = (weights(m) for m in inputs)
    result = merge_models(inputs, tmp_path / "merged", progress=False)
    out = result.out
    assert not (out / "adapter").exists()
    assert not [k for k in weights(out) if "lora" in k]
    record = json.loads((out / "merge.json").read_text())
    assert list(record["left_out"]) == ["adapter"], record
    assert "not a rank-r" in record["left_out"]["adapter"]
    logged = [r.getMessage() for r in pipeline_log.records]
    assert any(f"{inputs[0] / 'adapter'}" in m and "left out" in m for m in logged), logged
    merged = weights(out)
    for name in a:
        torch.testing.assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name])
    hf = AutoModel.from_pretrained(str(out))
    for name, value in hf.state_dict().items():
        assert torch.equal(value, merged[name]), name
    st = SentenceTransformer(str(out), device="cpu")
    emb = st.encode(["what is a merge"], prompt_name="web_search", convert_to_tensor=True)
    assert emb.shape == (1, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(1))


# --------------------------------------------------------------------------------------------------------------
# Merge exports: zero-padded names, the recorded step, and the order ema / slerp need
# --------------------------------------------------------------------------------------------------------------
def test_merge_export_names_sort_by_step():
    """export/merge_step_<N> names sort as their steps under a shell glob (zero-padded); old unpadded names parse."""
    from pipeline.training.export import merge_export_name, merge_export_step

    steps = [8000, 9500, 10000, 123456, 7]
    names = [merge_export_name(s) for s in steps]
    assert merge_export_name(9500) == "merge_step_00009500"
    assert sorted(names) == [merge_export_name(s) for s in sorted(steps)]
    assert [merge_export_step(n) for n in names] == steps
    assert merge_export_step("merge_step_9500") == 9500  # written by earlier versions
    assert merge_export_step("merge_step_10000") == 10000
    for other in ("final", "epoch_1", "best", "merge_step_", "merge_step_12a", "my_merge_step_5"):
        assert merge_export_step(other) is None, other


def test_export_records_its_step_and_merge_reads_it(tmp_path):
    """export_model records the training step (config_sentence_transformers.json), the merge reads it; old exports
    without it fall back to an export/merge_step_<N> name, else have none."""
    from pipeline.merge import ModelDir
    from pipeline.training.export import export_step

    exported = export_tiny(tmp_path / "final", 0, step=9500)
    assert export_step(exported) == 9500
    assert ModelDir.open(exported).step == 9500
    old = _without_step(exported, tmp_path / "merge_step_10000")
    assert export_step(old) is None and ModelDir.open(old).step == 10000
    assert ModelDir.open(_without_step(exported, tmp_path / "copy")).step is None
    bad = shutil.copytree(exported, tmp_path / "bad")
    cfg = json.loads((bad / "config_sentence_transformers.json").read_text())
    (bad / "config_sentence_transformers.json").write_text(json.dumps({**cfg, "training_step": "9500"}))
    with pytest.raises(MergeError, match=r"config_sentence_transformers.json: training_step must be"):
        ModelDir.open(bad)


def _without_step(src: Path, out: Path) -> Path:
    """A copy of the export `src` as earlier versions wrote it: no recorded step."""
    shutil.copytree(src, out)
    path = out / "config_sentence_transformers.json"
    cfg = json.loads(path.read_text())
    cfg.pop("training_step", None)
    path.write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def stepped(tmp_path_factory) -> dict[int, Path]:
    """Two exports recording steps 9500 and 10000 (named neutrally: the order comes from the record)."""
    root = tmp_path_factory.mktemp("stepped")
    return {step: export_tiny(root / f"m{seed}", seed, step=step) for seed, step in ((0, 9500), (1, 10000))}


@pytest.mark.parametrize("method", ["ema", "slerp"])
def test_order_dependent_merges_refuse_inputs_out_of_step_order(method, stepped, tmp_path, capsys):
    late, early = stepped[10000], stepped[9500]
    assert main([str(late), str(early), "--out", str(tmp_path / "out"), "--method", method, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {late}, {early}: out of order for --method {method} (step 10000 given before step "
                   f"9500; list the models oldest first)"], err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()
    # oldest first is merged, and merge.json records the steps; the output records none of its own
    assert main([str(early), str(late), "--out", str(tmp_path / "out"), "--method", method, "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["steps"] == [9500, 10000]
    assert "training_step" not in json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())


def test_mean_takes_any_order_and_old_unpadded_names_are_ordered_by_name(stepped, tmp_path, capsys):
    """mean does not depend on the order; exports of earlier versions (no recorded step, export/merge_step_<N>
    names, which a shell glob sorts 10000 before 9500) are accepted, and ema refuses their glob order."""
    late, early = stepped[10000], stepped[9500]
    assert merge_models([late, early], tmp_path / "mean", progress=False).steps == [10000, 9500]
    run = tmp_path / "run" / "export"
    old = [_without_step(src, run / f"merge_step_{step}") for step, src in sorted(stepped.items())]
    globbed = [str(p) for p in sorted(run.glob("merge_step_*"))]
    assert globbed == [str(old[1]), str(old[0])]  # the reason for the padded names
    assert main([*globbed, "--out", str(tmp_path / "ema"), "--method", "ema", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {old[1]}, {old[0]}: out of order for --method ema (step 10000 given before step 9500; "
                   f"list the models oldest first)")
    assert main([str(old[0]), str(old[1]), "--out", str(tmp_path / "ema"), "--method", "ema", "--no-progress"]) == 0
    record = json.loads((tmp_path / "ema" / "merge.json").read_text())
    assert record["steps"] == [9500, 10000] and record["inputs"] == [str(p) for p in old]
    # inputs without any step keep the order given
    plain = [_without_step(src, tmp_path / f"plain{step}") for step, src in sorted(stepped.items(), reverse=True)]
    assert merge_models(plain, tmp_path / "plain", method="ema", progress=False).steps == [None, None]
