"""Typed config loading and the deterministic homogeneous batch schedule."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.training.lr_schedule import lr_at
from pipeline.data.sampler import HomogeneousSchedule, rank_share, sample_negatives, split_validation
from pipeline.data.shards import TokenTable, identical_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny-cpu", "demo-minilm"] + [f"f2llm-{v}-{size}" for v in ("v1", "v2")
                                                               for size in ("0.6b", "1.7b", "4b")])
def test_shipped_recipes_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert Path(cfg.deepspeed).is_file()
    assert cfg.loss.temperature == 0.05 and cfg.train.betas == [0.9, 0.98]
    if name.startswith("f2llm-"):  # F2LLM's published values (configs' headers cite where each comes from)
        t = cfg.train
        assert (t.seed, t.per_device_batch_size, t.epochs, t.min_lr, t.warmup_steps, t.weight_decay) == (
            0, 16, 2, 1e-7, 500, 0.01)
        assert (t.log_every, t.eval_every, t.save_every, t.grad_clip, cfg.data.validation_fraction) == (
            100, 5000, 5000, 1.0, 0.01)
        v2 = "-v2-" in name
        assert cfg.loss.matryoshka is v2 and cfg.loss.distill is None
        assert cfg.loss.hard_negatives == {"retrieval": 7, "clustering": 9 if v2 else 7, "classification": 1}
        assert cfg.deepspeed.endswith("zero2.json") and (name.endswith("-4b") or t.lr != 8e-6)


def test_f2llm_dataset_registry():
    from pipeline.data.registry import load_registry

    registry = load_registry(REPO / "configs" / "f2llm-datasets.yaml")
    types = [spec.type for spec in registry.datasets.values()]
    assert (types.count("retrieval"), types.count("clustering"), types.count("classification")) == (459, 33, 10)
    assert registry.datasets["msmarco"].type == "retrieval" and registry.datasets["banking77"].type == "clustering"
    assert registry.datasets["imdb"].type == "classification" and registry.datasets["xcodeeval_code2code_C#"]


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "c.yaml"
    for text, message in (
        ("train:\n  lrate: 1.0\n", r"c.yaml: train.lrate: unknown key"),
        ("train:\n  per_device_batch_size: sixteen\n", r"train.per_device_batch_size: expected an integer"),
        ("model:\n  pooling: max\n", r"model.pooling: expected one of"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(bad)
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", ["train.lr=1e-5", "data.datasets=[a, b]"])
    assert cfg.train.lr == 1e-5 and cfg.data.datasets == ["a", "b"]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(REPO / "configs" / "tiny-cpu.yaml", ["train.lr"])


def test_schedule_trains_every_query_once_per_epoch_in_rank_shares():
    ids = {"a": np.arange(100), "b": np.arange(40), "tiny": np.arange(5)}
    sched = HomogeneousSchedule(ids, global_batch=16, seed=3)
    assert sched.skipped == [] and sched.steps_per_epoch == 7 + 3 + 1  # ceil(n / 16): last batches 4, 8 and 5
    seen = {name: [] for name in ids}
    for step in range(sched.steps_per_epoch):
        batch = sched.batch(0, step)
        parts = [sched.rank_slice(batch, r, 4) for r in range(4)]
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # equal shares, extras first
        assert np.array_equal(np.concatenate(parts), batch.query_ids)  # disjoint slices covering the global batch
        seen[batch.dataset].extend(batch.query_ids.tolist())
    for name, queries in seen.items():  # every query exactly once: nothing dropped, nothing repeated
        assert sorted(queries) == ids[name].tolist(), name
    assert sorted(len(sched.batch(0, s).query_ids) for s in range(11)) == [4, 5, 8] + [16] * 8
    assert [len(p) for p in (rank_share(np.arange(5), r, 4) for r in range(4))] == [2, 1, 1, 1]
    assert [len(rank_share(np.arange(1), r, 2)) for r in range(2)] == [1, 0]  # a rank may get no query
    again = HomogeneousSchedule(ids, global_batch=16, seed=3)
    assert all(np.array_equal(again.batch(0, s).query_ids, sched.batch(0, s).query_ids) for s in range(11))
    assert not all(np.array_equal(sched.batch(1, s).query_ids, sched.batch(0, s).query_ids) for s in range(11))


def test_schedule_drop_last_keeps_full_batches_only():
    ids = {"a": np.arange(100), "b": np.arange(40), "tiny": np.arange(5)}
    sched = HomogeneousSchedule(ids, global_batch=16, seed=3, drop_last=True)
    assert sched.skipped == ["tiny"] and sched.steps_per_epoch == 6 + 2
    assert "fewer than one global batch of 16 (data.drop_last)" in sched.skip_reason("tiny")
    seen = {"a": [], "b": []}
    for step in range(sched.steps_per_epoch):
        batch = sched.batch(0, step)
        assert all(len(sched.rank_slice(batch, r, 4)) == 4 for r in range(4))
        seen[batch.dataset].extend(batch.query_ids.tolist())
    assert len(set(seen["a"])) == 96 and len(set(seen["b"])) == 32  # each query at most once per epoch
    with pytest.raises(ValueError, match="no dataset has a full global batch of 128"):
        HomogeneousSchedule(ids, global_batch=128, seed=3, drop_last=True)
    cycled = HomogeneousSchedule(ids, global_batch=16, seed=3, temperature=5.0)  # T != 1 cycles, ragged too
    assert cycled.steps_per_epoch == 11 and all(0 < len(cycled.batch(0, s).query_ids) <= 16 for s in range(11))


def test_sampling_temperature_flattens_dataset_mix():
    ids = {"big": np.arange(16 * 90), "small": np.arange(16 * 10)}
    flat = HomogeneousSchedule(ids, global_batch=16, seed=0, temperature=1e6)
    names, _ = flat.epoch_plan(0)
    assert 30 < names.count("small") < 70  # ~uniform instead of 10%


def test_negative_sampling_is_pure_and_fills_short_pools():
    pool = np.array([5, 6, 7, -1, -1])
    kw = dict(positive=0, n_docs=50, seed=1, epoch=2, dataset="d", query=9)
    a = sample_negatives(pool, 3, **kw)
    assert sorted(a.ids.tolist()) == [5, 6, 7] and np.array_equal(a.ids, sample_negatives(pool, 3, **kw).ids)
    assert np.array_equal(pool[a.slots], a.ids)
    short = sample_negatives(pool, 5, **kw)
    assert set(short.ids.tolist()) <= {5, 6, 7} and np.array_equal(pool[short.slots], short.ids)
    empty = sample_negatives(np.array([-1, -1]), 4, **kw)
    assert len(empty.ids) == 4 and 0 not in empty.ids.tolist() and empty.ids.max() < 50
    assert empty.slots.tolist() == [-1] * 4
    # the positive listed among its own negatives is never drawn, in any epoch, with or without replacement
    with_positive = np.array([0, 5, 0, 6, -1])
    for epoch in range(20):
        draws = [sample_negatives(with_positive, n, **{**kw, "epoch": epoch}) for n in (2, 5)]
        assert all(0 not in d.ids.tolist() and set(d.ids.tolist()) <= {5, 6} for d in draws)
        assert all(np.array_equal(with_positive[d.slots], d.ids) for d in draws)
    only_positive = sample_negatives(np.array([0, 0]), 3, **kw)  # nothing left: random documents, not the positive
    assert len(only_positive.ids) == 3 and 0 not in only_positive.ids.tolist() and (only_positive.slots == -1).all()


def test_validation_split_by_query_and_lr_schedule():
    train, val = split_validation(np.arange(200), 0.05, seed=1, name="d")  # one row per query
    assert len(val) == 10 and len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 200
    # JSONL queries with several positives: one row per (query, positive); a query's rows stay on one side
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), rng.integers(1, 5, size=60))
    groups = groups[rng.permutation(len(groups))]
    held = set()
    for seed in range(10):
        train, val = split_validation(groups, 0.1, seed=seed, name="d")
        assert sorted([*train, *val]) == list(range(len(groups)))
        assert not set(groups[train]) & set(groups[val]) and len(set(groups[val])) == 6  # round(0.1 x 60) queries
        held |= set(groups[val])
    assert len(held) > 6  # the held-out queries depend on the seed
    # identical token sequences -> one group, numbered by first appearance
    rows = [[5, 6, 102], [7, 102], [5, 6, 102], [6, 5, 102], [7, 102], [5, 6, 102]]
    table = TokenTable(np.array([t for r in rows for t in r], dtype=np.uint16),
                       np.cumsum([0, *map(len, rows)]).astype(np.int64))
    assert identical_rows(table).tolist() == [0, 1, 0, 2, 1, 0]
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup=4, total=20) == 0.25
    assert lr_at(4, lr=1.0, min_lr=0.1, warmup=4, total=20) == 1.0
    assert lr_at(12, lr=1.0, min_lr=0.1, warmup=4, total=20) == pytest.approx(0.55)
    assert lr_at(25, lr=1.0, min_lr=0.1, warmup=4, total=20) == 0.1
