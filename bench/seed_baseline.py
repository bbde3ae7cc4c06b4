"""Reimplementation of the seed's (F2LLM v2) tokenised data format and its train-time loading, as the baseline of
``bench/bench_preprocess.py``.

What the seed does, and this module does the same way:

* build (``tokenize_data_qwen.py``): each raw dataset is read with pandas; texts are tokenized by a
  ``multiprocessing`` pool whose workers call the HF tokenizer ONE TEXT AT A TIME
  (``tokenizer(text, max_length=..., truncation=True)``) and return ``np.array(ids + [eos])`` (int64);
  the documents (positives and negatives) are deduplicated into a corpus with string doc ids;
  output: per dataset ``<name>_query.parquet`` (``query_input_ids`` list<int64>, ``passage`` and
  ``negative_1``..``negative_K`` string doc ids) and one ``corpus.parquet`` (``doc_id`` string, ``input_ids``
  list<int64>), written by ``DataFrame.to_parquet``.
* train time: ``pd.read_parquet`` of every query file and of the whole corpus, then a Python dict
  ``doc_id -> token array`` built over the whole corpus (the seed does this on every rank); a batch looks doc ids
  up in that dict.

Deliberate choices, all in the baseline's favour or neutral, so that the comparison is about the method:

* pool chunks of 1000 texts (the same IPC granularity as ``preprocess build``'s batches of 1000; the seed itself
  sends one huge slice per worker), the fork start method (Linux default; cheaper start than our spawn);
* tokenizer call semantics identical to ``preprocess build`` (same truncation limit, EOS appended after truncation
  only when the tokenizer does not close its input with EOS/[SEP] itself), so both produce the SAME token
  sequences and the token counts can be compared exactly;
* documents deduplicated per dataset (as ``preprocess build`` does), doc ids short (``<dataset>_<n>``), no row
  validation (the synthetic data has no bad rows; ``preprocess build`` still validates every row), query text
  not kept in the query file.

Command line: ``python bench/seed_baseline.py build --raw RAW --registry RAW/datasets.yaml --tokenizer TOK
--out OUT --workers N`` (prints one JSON line with counts and seconds).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CORPUS = "corpus.parquet"
QUERY_SUFFIX = "_query.parquet"
CHUNK_TEXTS = 1000

# ----------------------------------------------------------------------------------------------------- build
_TOKENIZER: Any = None
_LIMIT = 0
_EOS = 0
_APPEND_EOS = False


def _init_worker(tokenizer_dir: str, limit: int, eos: int, append_eos: bool) -> None:
    global _TOKENIZER, _LIMIT, _EOS, _APPEND_EOS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)
    _LIMIT, _EOS, _APPEND_EOS = limit, eos, append_eos


def process_sent(sentence: str) -> np.ndarray:
    """The seed's per-text call: one tokenizer call, EOS after truncation, int64 numpy array."""
    ids = _TOKENIZER(sentence, max_length=_LIMIT, truncation=True, add_special_tokens=True)["input_ids"]
    if _APPEND_EOS:
        ids = ids + [_EOS]
    return np.array(ids)


def process_chunk(texts: list[str]) -> list[np.ndarray]:
    return [process_sent(t) for t in texts]


def _tokenize(pool: Any, texts: list[str], desc: str) -> list[np.ndarray]:
    from tqdm import tqdm

    chunks = [texts[i : i + CHUNK_TEXTS] for i in range(0, len(texts), CHUNK_TEXTS)]
    out: list[np.ndarray] = []
    with tqdm(total=len(texts), desc=desc, unit="seq", dynamic_ncols=True, mininterval=1.0) as bar:
        for res in pool.imap(process_chunk, chunks):
            out.extend(res)
            bar.update(len(res))
    return out


def _read_raw(path: Path) -> Any:
    """A raw dataset as a DataFrame with columns query, passage, negative_1..K (pandas, as the seed)."""
    import pandas as pd

    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    # FlagEmbedding JSONL: one row per positive, negatives spread into negative_i columns.
    df = pd.read_json(path, lines=True)
    df = df.explode("pos", ignore_index=True).rename(columns={"pos": "passage"})
    width = int(df["neg"].map(len).max()) if len(df) else 0
    negs = pd.DataFrame(df["neg"].tolist(), index=df.index, columns=[f"negative_{i + 1}" for i in range(width)])
    return pd.concat([df[["query", "passage"]], negs], axis=1)


def build(raw: str, registry: str | None, tokenizer: str, out: str, workers: int, max_len: int = 1024) -> dict:
    import pandas as pd

    from pipeline.data.shard_format import resolve_eos
    from pipeline.data.raw import discover
    from pipeline.data.registry import load_registry
    from pipeline.data.tokenization import load_tokenizer

    started = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    reg = load_registry(registry)
    sources = discover(raw)
    tok = load_tokenizer(tokenizer)
    eos, appends_eos = resolve_eos(tok)
    limit = max_len if appends_eos else max_len - 1
    counts: dict[str, Any] = {"queries": 0, "corpus_docs": 0, "query_tokens": 0, "corpus_tokens": 0}
    corpus_ids: list[str] = []
    corpus_tokens: list[np.ndarray] = []
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, limit, eos, not appends_eos)) as pool:
        for name in sorted(sources):
            spec = reg.datasets[name]
            df = _read_raw(sources[name])
            neg_cols = sorted((c for c in df.columns if c.startswith("negative_")), key=lambda c: int(c[9:]))
            if spec.instruction:
                template = reg.query_template
                queries = df["query"].map(lambda q: template.format(instruction=spec.instruction, query=q))
            else:
                queries = df["query"]
            query_ids = _tokenize(pool, queries.tolist(), f"{name} queries")
            texts: list[str] = df["passage"].tolist()
            for col in neg_cols:
                texts += df[col].tolist()
            unique = list(dict.fromkeys(texts))  # the seed: list(set(...)); order-preserving here
            doc_tokens = _tokenize(pool, unique, f"{name} corpus")
            text_to_id = {text: f"{name}_{i}" for i, text in enumerate(unique)}
            qdf = pd.DataFrame({"query_input_ids": query_ids})
            qdf["passage"] = df["passage"].map(text_to_id)
            for col in neg_cols:
                qdf[col] = df[col].map(text_to_id)
            qdf.to_parquet(out_dir / f"{name}{QUERY_SUFFIX}", index=False)
            corpus_ids.extend(text_to_id.values())
            corpus_tokens.extend(doc_tokens)
            counts["queries"] += len(qdf)
            counts["corpus_docs"] += len(unique)
            counts["query_tokens"] += int(sum(len(x) for x in query_ids))
            counts["corpus_tokens"] += int(sum(len(x) for x in doc_tokens))
            del df, qdf, query_ids, doc_tokens, text_to_id
    pd.DataFrame({"doc_id": corpus_ids, "input_ids": corpus_tokens}).to_parquet(out_dir / CORPUS, index=False)
    counts["seconds"] = time.perf_counter() - started
    return counts


# ----------------------------------------------------------------------------------------------------- read
class SeedData:
    """Train-time loading as the seed does it: pandas reads, then a dict over the whole corpus."""

    def __init__(self, root: str | Path) -> None:
        import pandas as pd

        root = Path(root)
        self.queries: dict[str, Any] = {}
        for path in sorted(root.glob(f"*{QUERY_SUFFIX}")):
            self.queries[path.name[: -len(QUERY_SUFFIX)]] = pd.read_parquet(path)
        corpus = pd.read_parquet(root / CORPUS)
        self.docs: dict[str, np.ndarray] = dict(zip(corpus["doc_id"], corpus["input_ids"]))
        del corpus

    def example(self, dataset: str, row: int, neg_slots: list[int]) -> list[np.ndarray]:
        """[query, positive, negatives at `neg_slots`] token arrays of one query row."""
        q = self.queries[dataset]
        rec = q.iloc[row]
        return [rec["query_input_ids"], self.docs[rec["passage"]]] + [
            self.docs[rec[f"negative_{k + 1}"]] for k in neg_slots
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/seed_baseline.py",
        description="The seed's (F2LLM v2) tokenisation method, reimplemented as a benchmark baseline.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="tokenize raw datasets into <name>_query.parquet + corpus.parquet")
    p.add_argument("--raw", required=True, help="directory of raw .parquet/.jsonl datasets")
    p.add_argument("--registry", help="datasets.yaml (instructions applied to queries)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workers", type=int, default=2, help="pool processes (default 2)")
    p.add_argument("--max-len", type=int, default=1024, help="max tokens per sequence, EOS included")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    counts = build(args.raw, args.registry, args.tokenizer, args.out, args.workers, args.max_len)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
