"""Every query counts: ragged last batches are trained, validation covers every held-out query, the split is by query.

One 2-rank ZeRO-3 training run (deepspeed launcher, tiny Qwen3) over the example shards for one epoch, with 29
queries per rank (global batch 58) and 1% held out: paper_topics trains 29 queries (smaller than one global batch),
product_reviews 59 (58 + a last batch of ONE query: rank 1 holds none), web_search 297 (5 x 58 + 7); each dataset
holds out 1-3 validation queries (rank 1 holds none of a 1-query batch). Every type trains the in-batch loss too,
so the empty ranks take part in the gathers of positives and ids. The logged records must count every query once,
and the final validation must equal a one-process computation of the same held-out global batches with the exported
model. The split by query text runs in-process on shards built from JSONL with several positives per line.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import minilm_dir, write_jsonl, write_registry
from train_helpers import run_training

PER_RANK = 29
DATASETS = ("paper_topics", "product_reviews", "web_search")
STEPS = 1 + 2 + 6  # ceil(29 / 58) + ceil(59 / 58) + ceil(297 / 58)


def ragged_overrides(shards: Path, out: Path) -> list[str]:
    values = {
        "data.shards": str(shards),
        "data.validation_fraction": "0.01",
        "loss.in_batch_types": "[retrieval, clustering, classification]",
        "train.output_dir": str(out),
        "train.per_device_batch_size": str(PER_RANK),
        "train.max_steps": "null",
        "train.epochs": "1",
        "train.warmup_steps": "1",
        "train.log_every": "1",
        "train.eval_every": str(STEPS),
        "train.save_every": "0",
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def ragged_run(example_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ragged") / "run"
    run_training(ragged_overrides(example_shards, out), log=out.parent / "log.txt")
    return out


def records(run: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_every_training_query_is_trained_once_per_epoch(ragged_run, example_shards):
    manifest = json.loads((example_shards / "manifest.json").read_text())
    train = records(ragged_run, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    trained = dict.fromkeys(DATASETS, 0)
    for r in train:
        (dataset,) = [k.removeprefix("loss/") for k in r if k.startswith("loss/")]
        trained[dataset] += r["queries"]
        assert r["samples_per_s"] > 0 and np.isfinite(r["loss"])
    validated = records(ragged_run, "validation")[-1]
    for name in DATASETS:  # every query either trained (once) or held out, none dropped
        assert trained[name] + validated[f"queries/{name}"] == manifest["datasets"][name]["counts"]["queries"], name
    assert trained == {"paper_topics": 29, "product_reviews": 59, "web_search": 297}
    assert sorted(r["queries"] for r in train)[:3] == [1, 7, 29]  # the ragged batches: 1 query (rank 1 empty), 7, 29


def test_validation_is_global_per_dataset_and_part(ragged_run, example_shards):
    """The logged validation (steps 0 and the last) equals one process computing the same held-out global batches
    with the exported final model: the ranks' losses are reduced over queries, not taken from rank 0."""
    from pipeline.config import ModelConfig, load_config
    from pipeline.data.loader import TrainData, build_batch
    from pipeline.model.embedding import EmbeddingModel
    from pipeline.training.gradcache import batch_loss
    from train_helpers import TINY

    validation = records(ragged_run, "validation")
    assert [r["step"] for r in validation] == [0, STEPS]
    last = validation[-1]
    assert {name: last[f"queries/{name}"] for name in DATASETS} == {"paper_topics": 1, "product_reviews": 1,
                                                                     "web_search": 3}
    assert last["queries"] == 5 and last["batches"] == 3
    cfg = load_config(TINY, ragged_overrides(example_shards, ragged_run))
    data = TrainData(cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=PER_RANK, world_size=2, rank=0,
                     verify=False)
    model = EmbeddingModel.from_config(ModelConfig(name_or_path=str(ragged_run / "export" / "final"),
                                                   pooling="last_token"))
    model.eval()
    totals: dict[str, float] = {}
    for name in DATASETS:
        batch = build_batch(data.reader[name], data.val_ids[name], data.plan.n_neg[name], seed=cfg.train.seed,
                            epoch=0)  # the whole global batch in one process (it holds <= 58 queries)
        with torch.no_grad():
            out = batch_loss(model, batch, cfg.loss, cfg.gradcache)
        assert out.queries == last[f"queries/{name}"]
        parts = out.parts
        assert last[f"loss/{name}"] == pytest.approx(parts["total"], rel=1e-4, abs=1e-6), name
        for part in ("in_batch", "hard_negative"):  # the full-dimension parts, every type here has both
            assert last[f"{part}/{name}"] == pytest.approx(parts[part], rel=1e-4, abs=1e-6), (name, part)
        for key, value in out.sums.items():
            totals[key] = totals.get(key, 0.0) + value
    assert last["loss"] == pytest.approx(totals["total"] / 5, rel=1e-4)  # overall: mean over the 5 queries
    assert last["in_batch"] == pytest.approx(totals["in_batch"] / 5, rel=1e-4, abs=1e-6)
    assert last["hard_negative"] == pytest.approx(totals["hard_negative"] / 5, rel=1e-4)
    assert last["loss"] != pytest.approx(validation[0]["loss"], rel=1e-3)  # the model did change


def test_split_keeps_a_query_with_several_positives_on_one_side(tmp_path):
    """JSONL lines with several positives become one shard row per positive; the train/validation split holds out
    or trains all rows of a query text (also when the same query text comes back on a later line)."""
    from preprocess.build import BuildOptions, ShardBuilder

    from pipeline.config import DataConfig, LossConfig
    from pipeline.data.loader import TrainData
    from pipeline.data.shards import identical_rows

    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        positives = [f"passage {i} number {k} about topic {i % 7}" for k in range(int(rng.integers(1, 5)))]
        lines.append({"query": f"question {i} on topic {i % 7}", "pos": positives, "neg": [f"other text {i}"]})
    lines.append({"query": "question 3 on topic 3", "pos": ["a later positive of question 3"], "neg": []})
    raw = tmp_path / "raw"
    write_jsonl(raw / "multi.jsonl", lines)
    write_registry(raw / "datasets.yaml", {"multi": {"type": "retrieval"}})
    ShardBuilder(BuildOptions(raw=str(raw), tokenizer=minilm_dir(), out=str(tmp_path / "shards"),
                              registry=str(raw / "datasets.yaml"), max_len=32, workers=1)).run()
    rows = sum(len(line["pos"]) for line in lines)
    for seed in range(3):
        data = TrainData(DataConfig(shards=str(tmp_path / "shards"), validation_fraction=0.25), LossConfig(),
                         seed=seed, per_device_batch=4, world_size=2, rank=0, verify=False)
        ds = data.reader["multi"]
        assert ds.num_queries == rows
        text = [tuple(ds.queries[i].tolist()) for i in range(ds.num_queries)]
        train, val = data.train_ids["multi"], data.val_ids["multi"]
        assert len(train) + len(val) == rows and not {text[i] for i in train} & {text[i] for i in val}
        assert len({text[i] for i in val}) == 10  # round(0.25 x 40 distinct queries)
        assert len(val) > 10  # ... with all their rows
        assert identical_rows(ds.queries).max() + 1 == 40
