"""Retrieval metrics during training (train.retrieval_eval_every), train.keep_best and train.report_to.

Unit level: the held-out sets and the sampled corpus; the evaluator against `pipeline.evaluation.retrieval` on the
same data; the metrics writer with Weights & Biases offline. End to end: a 2-rank ZeRO-3 training (deepspeed launcher,
gloo) logs MRR@10 / nDCG@10 at step 0 and every N steps to metrics.jsonl, TensorBoard and W&B (offline), the values at
the last step equal a single-process evaluation of the final export (the ranks embedded slices of one model), and
export/best holds the weights of the best step.
"""
from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_model import one_torch_thread, tiny_model_config
from train_helpers import REPO, TINY, env, export_weights, run_training, web_search_overrides

_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _train_data(shards: Path, fraction: float = 0.11):
    from pipeline.config import DataConfig, LossConfig
    from pipeline.data.loader import TrainData

    cfg = DataConfig(shards=str(shards), validation_fraction=fraction, num_workers=0)
    return TrainData(cfg, LossConfig(), seed=42, per_device_batch=8, world_size=1, rank=0)


def test_held_out_sets_and_sampled_corpus(example_shards):
    from pipeline.training.retrieval_eval import held_out_sets

    data = _train_data(example_shards)
    (full,) = held_out_sets(data, None, seed=42)  # only the retrieval dataset
    ds = data.reader["web_search"]
    assert full.name == "web_search" and len(full.doc_ids) == ds.num_docs
    val = data.val_ids["web_search"]
    assert len(full.query_rows) == len(val) == 33 and set(full.query_rows) <= set(val)
    assert not set(full.query_rows) & set(data.train_ids["web_search"])  # never trained on
    for row, rel in zip(full.query_rows, full.relevant):
        assert int(full.doc_ids[rel[0]]) == int(ds.positives[row])

    (capped,) = held_out_sets(data, 100, seed=42)
    assert len(capped.doc_ids) == 100 and np.all(np.diff(capped.doc_ids) > 0)
    positives = set(ds.positives[val].tolist())
    negatives = {int(n) for n in ds.negatives[val].ravel() if n >= 0} - positives
    kept = set(capped.doc_ids.tolist())
    assert positives <= kept and len(kept & negatives) == min(len(negatives), 100 - len(positives))
    assert [list(capped.doc_ids[r]) for r in capped.relevant] == [[int(ds.positives[q])] for q in capped.query_rows]
    (again,) = held_out_sets(data, 100, seed=42)
    assert np.array_equal(again.doc_ids, capped.doc_ids)  # the same sample at every evaluation
    (more,) = held_out_sets(data, 300, seed=42)
    assert len(more.doc_ids) == 300 and kept <= set(more.doc_ids.tolist())
    assert held_out_sets(_train_data(example_shards, fraction=0.0), 100, seed=42) == []


def test_evaluator_matches_the_evaluation_module(example_shards):
    from pipeline.config import GradCacheConfig
    from pipeline.evaluation.retrieval import evaluate_retrieval
    from pipeline.model.embedding import EmbeddingModel
    from pipeline.training.retrieval_eval import RetrievalEvaluator

    data = _train_data(example_shards)
    evaluator = RetrievalEvaluator(data, max_docs=300, seed=42)
    torch.manual_seed(0)
    model = EmbeddingModel.from_config(tiny_model_config(attn_implementation="varlen"), "cpu").eval()
    values = evaluator(model, GradCacheConfig(chunk_tokens=512))
    (s,) = evaluator.sets
    ds = data.reader["web_search"]
    ref = evaluate_retrieval(model, [ds.queries[int(r)] for r in s.query_rows], [ds.corpus[int(d)] for d in s.doc_ids],
                             s.relevant, batch_tokens=1024, progress=False)
    assert values["mrr@10/web_search"] == pytest.approx(ref["mrr@10"], abs=1e-9)
    assert values["ndcg@10/web_search"] == pytest.approx(ref["ndcg@10"], abs=1e-9)
    assert values["mrr@10"] == values["mrr@10/web_search"] and values["queries"] == 33 and values["docs"] == 300
    assert 0.0 < values["mrr@10"] < 1.0


def test_evaluator_ranks_by_cosine_when_the_model_does_not_normalize(example_shards):
    """``model.normalize: false`` with embedding norms spread over 4 orders of magnitude, so ranking by dot product
    and by cosine disagree: the training-time metrics equal ``pipeline.evaluate``'s (evaluate_retrieval) on the
    same model and equal the metrics of a cosine ranking of the same embeddings - not of a dot-product ranking."""
    from pipeline.config import GradCacheConfig
    from pipeline.evaluation.retrieval import embed, evaluate_retrieval, retrieval_metrics
    from pipeline.model.embedding import EmbeddingModel
    from pipeline.training.retrieval_eval import RetrievalEvaluator

    class SpreadNorms(EmbeddingModel):
        """Each embedding e scaled by 10^(2 sin(100 e_0)), in [1e-2, 1e2] and scattered over the sequences: its
        direction, hence every cosine, is the model's."""

        def forward(self, inputs, raw: bool = False) -> torch.Tensor:
            emb = super().forward(inputs, raw=raw)
            return emb * 10 ** (2 * torch.sin(100 * emb[:, :1]))

    data = _train_data(example_shards)
    evaluator = RetrievalEvaluator(data, max_docs=300, seed=42)
    torch.manual_seed(0)
    model = SpreadNorms.from_config(tiny_model_config(attn_implementation="varlen", normalize=False), "cpu").eval()
    values = evaluator(model, GradCacheConfig(chunk_tokens=512))
    (s,) = evaluator.sets
    ds = data.reader["web_search"]
    queries, docs = [ds.queries[int(r)] for r in s.query_rows], [ds.corpus[int(d)] for d in s.doc_ids]
    ref = evaluate_retrieval(model, queries, docs, s.relevant, batch_tokens=1024, progress=False)

    q = embed(model, queries, chunk_tokens=1024, progress=False)
    d = embed(model, docs, chunk_tokens=1024, progress=False)
    assert d.norm(dim=1).max() / d.norm(dim=1).min() > 1000  # really unnormalised

    def ranked(scores: torch.Tensor) -> dict[str, float]:
        return retrieval_metrics(torch.topk(scores, 10, dim=1).indices.numpy(), s.relevant, ks=(10,))

    unit = torch.nn.functional.normalize
    cosine, dot = ranked(unit(q, dim=-1) @ unit(d, dim=-1).T), ranked(q @ d.T)
    assert abs(cosine["mrr@10"] - dot["mrr@10"]) > 0.02  # the two rankings disagree here
    for m in ("mrr@10", "ndcg@10"):
        assert values[f"{m}/web_search"] == pytest.approx(ref[m], abs=1e-9)
        assert values[f"{m}/web_search"] == pytest.approx(cosine[m], abs=1e-9)


def wandb_history(run_dir: Path, timeout: float = 120.0) -> list[dict[str, float]]:
    """The history rows of the W&B offline run under `run_dir`, read from its transaction log (``run-*.wandb``:
    records in the LevelDB log format - 32 KiB blocks of [crc32, length, type] + payload - each a protobuf
    ``wandb.proto.wandb_internal_pb2.Record``). wandb-core may still be writing the log when ``finish()`` has
    returned: read until its exit record is there."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        data = Path(path).read_bytes()
        pos, block, pending, rows, done = 7, 32768, b"", [], False
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                break
            payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = payload if kind in (1, 2) else pending + payload
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                what = record.WhichOneof("record_type")
                done |= what == "exit"
                if what == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
        if done or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_metrics_writer_report_to_wandb_only(tmp_path, monkeypatch):
    from pipeline.training.metrics import MetricsWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB__SERVICE_WAIT", "300")  # wandb-core may start slowly on a loaded machine
    writer = MetricsWriter(tmp_path / "run", report_to=["wandb"], config={"train": {"lr": 0.1}})
    writer.write(0, {"loss": 1.5, "batches": 2}, split="validation")
    writer.write(1, {"loss": 1.25, "lr": 0.1})
    writer.write(1, {"mrr@10": 0.5, "ndcg@10": 0.625}, split="retrieval")
    writer.close()
    rows = wandb_history(tmp_path / "run")
    assert [(r["_step"], {k: v for k, v in r.items() if not k.startswith("_")}) for r in rows] == [
        (0, {"validation/loss": 1.5, "validation/batches": 2}),
        (1, {"train/loss": 1.25, "train/lr": 0.1, "retrieval/mrr@10": 0.5, "retrieval/ndcg@10": 0.625})]
    assert not (tmp_path / "run" / "tensorboard").exists()  # not asked for
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_config_errors_are_one_line(example_shards):
    from pipeline.config import load_config
    from pipeline.training.plan import value_problems

    def problems(*overrides: str) -> list[str]:
        return [str(p) for p in value_problems(load_config(TINY, list(overrides)))]

    assert problems("train.keep_best=retrieval/mrr@10") == [
        "train.keep_best: retrieval/mrr@10 is never computed: set train.retrieval_eval_every"]
    assert problems("train.keep_best=retrieval/recall@5", "train.retrieval_eval_every=5") == [
        "train.keep_best: retrieval/recall@5: unknown retrieval metric 'recall@5' (have: mrr@10, ndcg@10)"]
    assert problems("train.keep_best=validation/loss", "train.eval_every=0") == [
        "train.keep_best: validation/loss is never computed: train.eval_every is 0"]
    assert problems("train.retrieval_eval_every=0") == [
        "train.retrieval_eval_every: must be >= 1 or null, got 0"]
    assert problems("train.keep_best=validation/loss", "train.retrieval_eval_every=5",
                    "train.retrieval_eval_max_docs=null") == []
    # at launch, after the data checks and before any process group: one line, exit 2
    for overrides, line in (
        (["train.keep_best=retrieval/mrr@10"],
         "error: train.keep_best: retrieval/mrr@10 is never computed: set train.retrieval_eval_every"),
        (["train.keep_best=retrieval/mrr@10/paper_topics", "train.retrieval_eval_every=2"],
         "error: train.keep_best: retrieval/mrr@10/paper_topics: 'paper_topics' is not a retrieval dataset of this "
         "run (have: web_search)"),
    ):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY),
                               f"data.shards={example_shards}", *overrides],
                              capture_output=True, text=True, cwd=REPO, env=env(), timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]


STEPS = 6


@pytest.fixture(scope="module")
def trained(example_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval_eval") / "run"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB__SERVICE_WAIT", "300")  # wandb-core may start slowly on a loaded machine
    try:
        run_training(web_search_overrides(
            example_shards, out, steps=STEPS, save_every=0, eval_every=3,
            **{"train.retrieval_eval_every": "3", "train.retrieval_eval_max_docs": "300",
               "train.keep_best": "retrieval/mrr@10", "train.report_to": "[tensorboard,wandb]"}),
            log=out.parent / "log.txt")
    finally:
        monkeypatch.undo()
    return out


def test_training_logs_retrieval_metrics_everywhere(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    retrieval = {r["step"]: r for r in records if r["split"] == "retrieval"}
    validation = {r["step"]: r for r in records if r["split"] == "validation"}
    assert sorted(retrieval) == sorted(validation) == [0, 3, 6]  # from the base model on, next to the loss
    for r in retrieval.values():
        assert 0.0 <= r["mrr@10"] <= 1.0 and r["mrr@10"] == r["mrr@10/web_search"]
        assert r["ndcg@10"] == r["ndcg@10/web_search"] and r["queries"] == 33 and r["docs"] == 300
    assert retrieval[6]["mrr@10"] > retrieval[0]["mrr@10"]  # lr 1e-3 on a random tiny Qwen3: it learns

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("retrieval/mrr@10")}
    assert sorted(tb) == [0, 3, 6] and tb[6] == pytest.approx(retrieval[6]["mrr@10"])
    assert "validation/loss" in events.Tags()["scalars"]

    rows = wandb_history(trained)
    logged = {r["_step"]: r["retrieval/mrr@10"] for r in rows if "retrieval/mrr@10" in r}
    assert logged == pytest.approx({s: r["mrr@10"] for s, r in retrieval.items()})
    assert (trained / "wandb_run_id").is_file()


def test_last_values_equal_a_single_process_evaluation_of_the_export(trained, example_shards):
    """The 2 ranks embedded slices through the partitioned engine; one process with the consolidated export must
    find the same metrics on the same held-out set."""
    from pipeline.config import GradCacheConfig
    from pipeline.model.embedding import load_model_dir
    from pipeline.training.retrieval_eval import RetrievalEvaluator

    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "retrieval" and r["step"] == STEPS][0]
    model, _ = load_model_dir(str(trained / "export" / "final"), "cpu")
    evaluator = RetrievalEvaluator(_train_data(example_shards), max_docs=300, seed=42)
    values = evaluator(model.eval(), GradCacheConfig(chunk_tokens=1024))
    assert values["mrr@10"] == pytest.approx(last["mrr@10"], abs=1e-6)
    assert values["ndcg@10"] == pytest.approx(last["ndcg@10"], abs=1e-6)


def test_keep_best_exports_the_best_step(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["mrr@10"]) for r in records if r["split"] == "retrieval"]
    best_step, best_value = max(curve, key=lambda sv: (sv[1], -sv[0]))  # ties keep the earlier export
    info = json.loads((trained / "export" / "best" / "keep_best.json").read_text())
    assert info == {"metric": "retrieval/mrr@10", "value": pytest.approx(best_value), "step": best_step}
    best, final = export_weights(trained / "export" / "best"), export_weights(trained / "export" / "final")
    same = all(torch.equal(best[k], final[k]) for k in final)
    assert same == (best_step == STEPS)
    assert (trained / "export" / "best" / "config_sentence_transformers.json").is_file()
