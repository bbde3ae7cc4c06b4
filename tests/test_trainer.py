"""The trainer end to end: 2-process DeepSpeed ZeRO-3 on CPU (gloo) through the deepspeed launcher.

One uninterrupted reference run is shared by the tests: its loss must fall, it writes the merge exports at exactly
the planned steps, a run SIGKILLed mid-way and resumed must log the same losses and end with the same weights (and
merge exports), and its export must load in transformers and sentence-transformers with the training model's
embeddings.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train_helpers import (
    export_weights,
    kill_group,
    resume_matches_reference,
    run_training,
    start_training,
    train_losses,
    transformers_embeddings,
    wait_for,
    web_search_overrides,
)

STEPS = 10
SAVE_EVERY = 4
MERGE = {"train.merge_window": "5", "train.merge_every": "2"}  # exports after steps 6, 8, 10 (> 10 - 5, even)
MERGE_STEPS = [6, 8, 10]


def overrides(shards: Path, out: Path, **extra: str) -> list[str]:
    return web_search_overrides(shards, out, steps=STEPS, save_every=SAVE_EVERY, eval_every=5, **MERGE, **extra)


@pytest.fixture(scope="module")
def reference_run(example_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_training(overrides(example_shards, out), log=out.parent / "log.txt")
    return out


def test_zero3_training_loss_decreases(reference_run):
    losses = train_losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert all(r["padding_efficiency"] == 1.0 for r in train)  # packed decoder chunks
    assert all(k in train[-1] for k in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "loss/web_search"))
    validation = {r["step"]: r["loss"] for r in records if r["split"] == "validation"}
    assert sorted(validation) == [0, 5, 10]
    assert validation[10] < validation[0] - 0.05, validation
    assert (reference_run / "config.json").is_file() and (reference_run / "versions.json").is_file()
    assert (reference_run / "tensorboard").is_dir()
    ckpts = reference_run / "checkpoints"
    assert (ckpts / "latest_complete").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000008", "step_00000010"]
    # merge exports: exactly at the planned steps (the rule --check prints), named by merge_export_name (zero-padded:
    # sorted as steps), each recording its step; the last one the final weights
    from pipeline.training.export import export_step, merge_export_name
    from pipeline.training.trainer import EveryInLast

    assert EveryInLast(2, 5, STEPS).planned() == MERGE_STEPS
    exports = {p.name for p in (reference_run / "export").iterdir()}
    assert exports == {"final", *(merge_export_name(n) for n in MERGE_STEPS)}, exports
    assert [export_step(p) for p in sorted((reference_run / "export").glob("merge_step_*"))] == MERGE_STEPS
    assert export_step(reference_run / "export" / "final") == STEPS
    final, last = export_weights(reference_run / "export" / "final"), export_weights(
        reference_run / "export" / merge_export_name(10))
    assert all(torch.equal(final[k], last[k]) for k in final)
    early = export_weights(reference_run / "export" / merge_export_name(6))
    assert any(not torch.equal(final[k], early[k]) for k in final)


def test_sigkill_and_resume_is_exact(reference_run, example_shards, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = start_training(overrides(example_shards, out), log=log)
    try:
        wait_for(lambda: max(train_losses(out), default=0) >= SAVE_EVERY + 2, 400, "step 6", proc)
    finally:
        kill_group(proc)
    ckpts = out / "checkpoints"
    resumed_from = int((ckpts / "latest_complete").read_text().removeprefix("step_"))
    assert resumed_from >= SAVE_EVERY and resumed_from % SAVE_EVERY == 0
    assert not (out / "export" / "final").exists()
    resume_matches_reference(overrides(example_shards, out), out, reference_run, resumed_from=resumed_from,
                             steps=STEPS, log=tmp_path / "resume_log.txt")
    from pipeline.training.export import merge_export_name

    for n in MERGE_STEPS:  # the merge exports written after the resume match the uninterrupted run's
        ours, theirs = (export_weights(run / "export" / merge_export_name(n)) for run in (out, reference_run))
        for name in theirs:
            assert (ours[name] - theirs[name]).norm() <= 1e-6 * theirs[name].norm(), (n, name)


def test_export_loads_in_transformers_and_sentence_transformers(reference_run, example_shards, example_raw):
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from pipeline.config import ModelConfig
    from pipeline.model.embedding import EmbeddingModel, encode
    from pipeline.data.shards import ShardReader

    export = reference_run / "export" / "final"
    ds = ShardReader(example_shards)["web_search"]
    rows = pq.read_table(example_raw / "web_search.parquet").slice(0, 6).to_pylist()
    query_tokens = [np.array(ds.queries[i]) for i in range(6)]
    doc_tokens = [np.array(ds.corpus[int(ds.positives[i])]) for i in range(6)]

    # The training model's forward on the shard tokens, from the exported weights.
    model = EmbeddingModel.from_config(ModelConfig(name_or_path=str(export), pooling="last_token"))
    model.eval()
    with torch.no_grad():
        ours_q, _ = encode(model, query_tokens, chunk_size=1)
        ours_d, _ = encode(model, doc_tokens, chunk_size=1)

    # Plain transformers: last hidden state at the final (EOS) token, L2-normalised.
    for i, (ids, h) in enumerate(transformers_embeddings(export, [row["passage"] for row in rows[:3]])):
        assert ids == doc_tokens[i].tolist()
        torch.testing.assert_close(h, ours_d[i], atol=1e-5, rtol=1e-5)

    # sentence-transformers, with the dataset's instruction prompt for queries.
    st = SentenceTransformer(str(export), device="cpu")
    assert st.max_seq_length == 64
    st_q = st.encode([r["query"] for r in rows], prompt_name="web_search", convert_to_tensor=True, batch_size=2)
    st_d = st.encode([r["passage"] for r in rows], convert_to_tensor=True, batch_size=2)
    torch.testing.assert_close(st_q, ours_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_d, ours_d, atol=1e-5, rtol=1e-5)
