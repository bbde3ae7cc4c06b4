"""LoRA adapters (``model.lora``) and bidirectional attention (``model.attention_mask``) end to end.

Two 2-rank trainings through the deepspeed launcher (tiny Qwen3 on the example shards) are shared by the tests:

* ZeRO-3, causal, last-token pooling, LoRA r 8 with adapter dropout;
* ZeRO-2, bidirectional, mean pooling, the same adapters.

Each is resumed from one of its checkpoints (losses and final export as the uninterrupted run's). The "training
model" the exports are compared with is rebuilt from the run's config and DeepSpeed's own consolidation of its last
checkpoint (``zero_to_fp32``), independent of the export code. In-process: GradCache's exactness with adapters and
their dropout, config errors, and the export of a fully fine-tuned bidirectional model.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_model import REPO, TINY_QWEN3, last_line, minilm_dir, run_torchrun, tiny_model
from train_helpers import (resume_matches_reference, run_training, train_losses, transformers_embeddings,
                           web_search_overrides)

CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")
LORA = "{r: 8, alpha: 32, dropout: 0.1}"
RUNS = {  # name: (steps, save_every, eval_every, extra overrides)
    "zero3_causal": (10, 4, 5, {}),
    "zero2_bidirectional": (6, 3, 3, {"deepspeed": str(REPO / "ds_configs" / "zero2.json"),
                                      "model.attention_mask": "bidirectional", "model.pooling": "mean"}),
}


def lora_overrides(name: str, shards: Path, out: Path) -> list[str]:
    steps, save_every, eval_every, extra = RUNS[name]
    return web_search_overrides(shards, out, steps=steps, save_every=save_every, eval_every=eval_every,
                                **{"model.lora": LORA, "train.lr": "3e-3", **extra})


@pytest.fixture(scope="module")
def runs(example_shards, tmp_path_factory) -> dict[str, Path]:
    """Both trainings, each run once for the module when a test first asks for it."""

    class Runs(dict):
        def __missing__(self, name: str) -> Path:
            out = tmp_path_factory.mktemp(name) / "run"
            run_training(lora_overrides(name, example_shards, out), log=out.parent / "log.txt")
            self[name] = out
            return out

    return Runs()


def run_config(run: Path):
    from pipeline.config import config_from_dict

    return config_from_dict(json.loads((run / "config.json").read_text()))


def checkpoint_state(run: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state of the run's last checkpoint, assembled by DeepSpeed's zero_to_fp32 (frozen base too)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (run / "checkpoints" / "latest_complete").read_text().strip()
    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)


def training_model(run: Path):
    """The run's model after its last step: its config, its final checkpoint's weights, adapters unmerged."""
    from pipeline.model.embedding import EmbeddingModel

    model = EmbeddingModel.from_config(run_config(run).model)
    model.load_state_dict(checkpoint_state(run), strict=True)
    return model.eval()


def shard_examples(shards: Path, n: int = 6) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from pipeline.data.shards import ShardReader

    ds = ShardReader(shards)["web_search"]
    return ([np.array(ds.queries[i]) for i in range(n)],
            [np.array(ds.corpus[int(ds.positives[i])]) for i in range(n)])


def embed(model, seqs: list[np.ndarray]) -> torch.Tensor:
    from pipeline.model.embedding import encode

    with torch.no_grad():
        return encode(model, seqs, chunk_size=2)[0]


# ---------------------------------------------------------------------------------------------------------------
# 2-rank trainings
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_lora_training_updates_only_the_adapters(runs, name):
    run = runs[name]
    steps, save_every, eval_every, _ = RUNS[name]
    assert sorted(train_losses(run)) == list(range(1, steps + 1))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = {r["step"]: r["loss"] for r in records if r["split"] == "validation"}
    assert validation[steps] < validation[0] - 0.05, validation
    log = (run.parent / "log.txt").read_text()
    assert "lora: r 8, alpha 32, dropout 0.1 on 14 linear layers: 0.016M trainable of 2.04M parameters" in log
    # Only the adapters are in the optimizer: the fp32 master partitions of all ranks hold exactly their weights.
    model = tiny_model(0, lora=run_config(run).model.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 16384 and sum(p.numel() for p in model.parameters()) > 100 * trainable
    step_dir = run / "checkpoints" / f"step_{steps:08d}"
    optim_files = sorted(step_dir.glob("*optim_states.pt"))
    assert len(optim_files) == 2
    master = 0
    for path in optim_files:
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        groups = state.get("fp32_flat_groups") or state.get("single_partition_of_fp32_groups")
        master += sum(t.numel() for t in groups)
    assert master == trainable, (master, trainable)


@pytest.mark.parametrize("name", list(RUNS))
def test_lora_resume_is_exact(runs, name, example_shards, tmp_path):
    """A fresh run directory holding only the reference run's middle checkpoint, resumed with --resume auto: the
    same losses and the same final export (merged weights) as the uninterrupted run."""
    reference = runs[name]
    steps, save_every, _, _ = RUNS[name]
    out = tmp_path / "run"
    tag = f"step_{save_every:08d}"
    shutil.copytree(reference / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest_complete").write_text(tag)
    (out / "metrics.jsonl").write_text("")
    resume_matches_reference(lora_overrides(name, example_shards, out), out, reference, resumed_from=save_every,
                             steps=steps, log=tmp_path / "log.txt")
    assert "resumed from" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("name", list(RUNS))
def test_lora_export_is_the_training_model(runs, name, example_shards, example_raw):
    """The merged export embeds as the training model (base + trained adapters, unmerged) in sentence-transformers
    and transformers (<= 1e-5), and not as the base model; the adapter alone is the checkpoint's and loads with
    peft onto the base model."""
    import pyarrow.parquet as pq
    from peft import PeftModel
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoModel

    from pipeline.model.embedding import EmbeddingModel

    run = runs[name]
    export = run / "export" / "final"
    cfg = run_config(run)
    bidirectional = cfg.model.attention_mask == "bidirectional"
    state = checkpoint_state(run)

    # The files: merged weights with the base model's names; the adapter alone, equal to the checkpoint's.
    merged = load_file(str(export / "model.safetensors"))
    assert not [k for k in merged if "lora" in k or "base_layer" in k]
    hf_config = AutoConfig.from_pretrained(str(export))
    with torch.device("meta"):
        base_keys = set(AutoModel.from_config(hf_config).state_dict())
    assert set(merged) == base_keys
    adapter_config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["peft_type"], adapter_config["r"], adapter_config["lora_alpha"],
            adapter_config["lora_dropout"]) == ("LORA", 8, 32, 0.1)
    adapter = load_file(str(export / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 28 and all(re.search(r"\.lora_[AB]\.weight$", k) for k in adapter)
    for key, value in adapter.items():
        assert torch.equal(value, state["backbone." + key.replace(".weight", ".default.weight")]), key
    config_json = json.loads((export / "config.json").read_text())
    assert config_json.get("is_causal", True) is (not bidirectional)

    queries, docs = shard_examples(example_shards)
    model = training_model(run)
    ours_q, ours_d = embed(model, queries), embed(model, docs)
    with model.backbone.disable_adapter():
        base_d = embed(model, docs)
    assert float((ours_d - base_d).abs().max()) > 1e-2  # the export must not silently be the base model

    # sentence-transformers, the instruction prompt for queries.
    rows = pq.read_table(example_raw / "web_search.parquet").slice(0, 6).to_pylist()
    st = SentenceTransformer(str(export), device="cpu")
    st_q = st.encode([r["query"] for r in rows], prompt_name="web_search", convert_to_tensor=True, batch_size=2)
    st_d = st.encode([r["passage"] for r in rows], convert_to_tensor=True, batch_size=2)
    torch.testing.assert_close(st_q, ours_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_d, ours_d, atol=1e-5, rtol=1e-5)
    assert float((st_d - base_d).abs().max()) > 1e-2

    # Plain transformers, one document at a time, pooled as trained.
    passages = [row["passage"] for row in rows[:3]]
    for i, (ids, pooled) in enumerate(transformers_embeddings(export, passages, mean=bidirectional)):
        assert ids == docs[i].tolist()
        torch.testing.assert_close(pooled, ours_d[i], atol=1e-5, rtol=1e-5)
    # The first token's state sees the later tokens only when bidirectional (also as transformers loads it).
    hf = AutoModel.from_pretrained(str(export)).eval()
    with torch.no_grad():
        a = torch.as_tensor(docs[0].astype(np.int64)).unsqueeze(0)
        b = a.clone()
        b[0, 1:-1] = torch.flip(b[0, 1:-1], dims=[0])
        moved = float((hf(input_ids=a).last_hidden_state[0, 0] - hf(input_ids=b).last_hidden_state[0, 0]).abs().max())
    assert (moved > 1e-4) if bidirectional else (moved <= 1e-6), moved

    # The adapter alone, loaded by peft onto the base model (the checkpoint's frozen weights).
    base = EmbeddingModel.from_config(dataclasses.replace(cfg.model, lora=None))
    base_state = {re.sub(r"backbone\.base_model\.model\.", "backbone.", k).replace(".base_layer.", "."): v
                  for k, v in state.items() if "lora_" not in k}
    base.load_state_dict(base_state, strict=True)
    base.backbone = PeftModel.from_pretrained(base.backbone, str(export / "adapter"))
    base.eval()
    torch.testing.assert_close(embed(base, docs), ours_d, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# In process
# ---------------------------------------------------------------------------------------------------------------
def lora_model(seed: int = 0, **overrides):
    """Tiny Qwen3 with adapters (dropout 0.1, attention dropout 0: the adapters' dropout is the only one), B random
    so that A gets a gradient too."""
    from pipeline.config import LoraConfig
    from pipeline.gradcheck import perturb_adapters

    fields = dict(from_config={**TINY_QWEN3, "attention_dropout": 0.0}, lora=LoraConfig(r=4, dropout=0.1))
    fields.update(overrides)
    model = tiny_model(seed, **fields)
    perturb_adapters(model, seed)
    return model


@pytest.mark.parametrize("overrides", [{}, {"packing": "padded", "gradient_checkpointing": True,
                                             "attention_mask": "bidirectional", "pooling": "mean"}])
def test_gradcache_is_exact_with_adapters_and_replays_their_dropout(overrides):
    from pipeline.config import GradCacheConfig, LossConfig
    from pipeline.data.batch import random_batch
    from pipeline.training.gradcache import cached_step, plain_step

    model = lora_model(**overrides)
    model.train()
    batch = random_batch(np.random.default_rng(5), batch_size=8, n_neg=3, vocab_size=30522, eos_id=102)
    loss_cfg, gc_cfg = LossConfig(matryoshka=True), GradCacheConfig(chunk_tokens=192)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < len(trainable) < len(list(model.parameters()))

    def gradient(step, seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        stats = step(model, batch, loss_cfg, gc_cfg)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        return torch.cat([p.grad.flatten() for p in trainable]), stats

    g_plain, _ = gradient(plain_step, 11)
    g_cached, stats = gradient(cached_step, 11)
    assert stats.chunks >= 3
    assert float((g_cached - g_plain).norm() / g_plain.norm()) <= 1e-5
    g_other, _ = gradient(plain_step, 12)  # the adapters' dropout is on: another mask, another gradient
    assert float((g_other - g_plain).norm() / g_plain.norm()) > 1e-3


def test_gradcheck_cli_with_lora_under_zero3():
    out = run_torchrun(["pipeline.gradcheck", "--config", CONFIG, "--engine", "deepspeed", "--ds-config",
                        str(REPO / "ds_configs" / "zero3.json"), f"model.lora={LORA}", "gradcache.chunk_tokens=256"],
                       timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    m = re.fullmatch(r"max relative gradient error: (\S+)", last_line(out.stdout))
    assert m and float(m.group(1)) <= 1e-5, out.stdout[-2000:]
    assert "ZeRO stage 3, world size 2" in out.stderr and "lora: r 8" in out.stderr
    assert "scale check (dropout off)" in out.stderr


def test_lora_settings_errors():
    from pipeline.config import LoraConfig
    from pipeline.model.lora import check_lora

    for bad, message in [(dict(r=0), r"^model.lora.r: must be >= 1, got 0$"),
                         (dict(alpha=0.0), r"^model.lora.alpha: must be > 0"),
                         (dict(dropout=1.0), r"^model.lora.dropout: must be in \[0, 1\)"),
                         (dict(target_modules=[]), r"^model.lora.target_modules: expected module names")]:
        with pytest.raises(ValueError, match=message):
            check_lora(LoraConfig(**bad))
    with pytest.raises(ValueError, match=r"^model.lora.target_modules: Target modules \{'nope'\} not found"):
        tiny_model(0, lora=LoraConfig(target_modules=["nope"]))
    model = tiny_model(0, lora=LoraConfig(target_modules=["q_proj", "v_proj"]))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_lora_of_an_encoder_leaves_its_unused_pooler_alone():
    from pipeline.config import LoraConfig, ModelConfig
    from pipeline.model.embedding import EmbeddingModel

    model = EmbeddingModel.from_config(ModelConfig(name_or_path=minilm_dir(), lora=LoraConfig()))
    adapted = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 36 and not [n for n in adapted if "pooler" in n]


def test_bidirectional_full_fine_tuning_export(tmp_path):
    """Without adapters: the export's config says is_causal false, and sentence-transformers (a batch, padded) and
    our loader of the export embed as the training model; auto pooling of the export is its declared mean."""
    from sentence_transformers import SentenceTransformer

    from pipeline.config import ModelConfig
    from pipeline.model.embedding import EmbeddingModel, load_tokenizer_for
    from pipeline.training.export import export_model

    model = tiny_model(0, attention_mask="bidirectional", pooling="mean")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # a "trained" model
    model.eval()
    tokenizer = load_tokenizer_for(ModelConfig(tokenizer=minilm_dir(), from_config={}))
    out = export_model(model, tokenizer, tmp_path / "export", eos_id=102, max_seq_length=64, datasets={},
                       query_template="{query}")
    assert json.loads((out / "config.json").read_text())["is_causal"] is False
    assert not (out / "adapter").exists()
    texts = ["def parse(text): return text.split()", "Return the number of items in the queue.", "short one"]
    ids = [np.array(tokenizer(t)["input_ids"]) for t in texts]
    ours = embed(model, ids)
    st = SentenceTransformer(str(out), device="cpu")
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True, batch_size=3), ours, atol=1e-5, rtol=1e-5)
    loaded = EmbeddingModel.from_config(ModelConfig(name_or_path=str(out))).eval()
    assert loaded.settings.attention_mask == "bidirectional" and loaded.pooling == "mean"
    torch.testing.assert_close(embed(loaded, ids), ours, atol=1e-5, rtol=1e-5)


def test_check_reports_adapters_and_attention_mask(example_shards, tmp_path, capsys):
    """``--check`` shows the adapters (counted on the meta device, as the trainer builds them) and the mask; a bad
    LoRA setting is one error line naming its key."""
    from pipeline.training.plan import check_command

    base = [f"data.shards={example_shards}", f"train.output_dir={tmp_path / 'run'}"]
    assert check_command(CONFIG, [*base, f"model.lora={LORA}", "model.attention_mask=bidirectional"],
                         world_size=2) == 0
    out = capsys.readouterr().out
    assert ("training           LoRA r 8, alpha 32, dropout 0.1 on 14 linear layers: 0.016M trainable of 2.04M "
            "parameters (0.80%)") in out
    assert "attention          varlen, bidirectional mask; pooling last_token" in out
    assert check_command(CONFIG, base, world_size=2) == 0
    out = capsys.readouterr().out
    assert "training           full fine-tuning" in out and "varlen, causal mask" in out
    assert check_command(CONFIG, [*base, "model.lora={target_modules: [nope]}"], world_size=2) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: model.lora.target_modules: Target modules {'nope'} not found")
