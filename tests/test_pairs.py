"""Weakly supervised pairs (query, passage; no negative columns): valid build input, trained with the in-batch loss
only; the pre-training recipe configs/pretrain-pairs.yaml loads with its documented values."""
from __future__ import annotations

import json
from pathlib import Path

from data_helpers import minilm_dir, write_jsonl
from train_helpers import REPO, run_training
from pipeline.config import load_config
from pipeline.data.shards import ShardReader
from preprocess.build import BuildOptions, ShardBuilder


def test_pairs_without_negatives_build_and_train_in_batch_only(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "pairs.jsonl", [{"query": f"what is topic {i} about", "pos": f"topic {i} is about thing {i % 7}"}
                                      for i in range(96)])
    shards = tmp_path / "shards"
    ShardBuilder(BuildOptions(raw=str(raw), tokenizer=minilm_dir(), out=str(shards), default_type="retrieval",
                              max_len=32, workers=1)).run()
    ds = ShardReader(shards)["pairs"]
    assert ds.num_queries == 96 and ds.num_negatives == 0 and ds.negatives.shape == (96, 0)
    out = tmp_path / "run"
    run_training([f"data.shards={shards}", f"train.output_dir={out}", "train.max_steps=2", "train.log_every=1",
                  "train.save_every=1000", "train.eval_every=1000", "data.validation_fraction=0",
                  "loss.hard_negatives={retrieval: 0, clustering: 0, classification: 0}", "loss.matryoshka=false"],
                 nproc=1, timeout=300)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m and m.get("step") in (1, 2)]
    assert len(steps) == 2 and all(m["loss"] > 0 for m in steps)
    for m in steps:  # the in-batch InfoNCE is the whole loss; no hard-negative term
        assert "hard_negative" not in m and abs(m["in_batch"] - m["loss"]) < 1e-5 * max(1.0, m["loss"])


def test_pretrain_pairs_recipe_loads():
    cfg = load_config(REPO / "configs" / "pretrain-pairs.yaml")
    assert Path(cfg.deepspeed).is_file()
    assert cfg.model.name_or_path == "Qwen/Qwen3-0.6B"
    assert set(cfg.loss.hard_negatives.values()) == {0} and cfg.loss.matryoshka is False
    assert cfg.loss.in_batch_types == ["retrieval", "clustering", "classification"]
    assert cfg.gradcache.enabled and cfg.loss.distill is None and cfg.loss.score_distill is None
    assert cfg.train.per_device_batch_size * 8 == 16384  # global batch 16384 on one 8-GPU node
    assert 0.02 <= cfg.loss.temperature <= 0.05
