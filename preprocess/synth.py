"""`preprocess example`: generate raw example datasets (no download) in both input formats, with a registry.

The text is synthetic but shaped like real training data: words follow a Zipf law over a pseudo-word vocabulary,
every text is about a topic (60% of its words drawn from the topic's 12 own words), hard negatives are passages of
neighbouring topics (which share a third of their words with the query's topic), query lengths centre on ~30
tokens and passage lengths are log-normal around ~200 tokens (WordPiece), capped at ~1024.

Writes ``web_search.parquet`` (retrieval, F2LLM layout, ``negative_1``..``negative_K``),
``product_reviews.jsonl`` (classification, FlagEmbedding JSONL), ``paper_topics.parquet`` (clustering) and
``datasets.yaml`` (the registry).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

SYLLABLES = (
    "ka lo mi ne ru sa ti vo ber con der en fa gen in ment pro ta tion un ver al ex re com st ing ed er ly "
    "mar pol dis ant ive ous ber cal lin tor sen qui ran por mo na"
).split()
WORDS_PER_TOKEN = 0.40  # measured: these pseudo-words average 2.5 WordPiece tokens (all-MiniLM-L6-v2 vocabulary)


@dataclass(frozen=True)
class SynthOptions:
    out: str
    passages: int = 20_000
    negatives: int = 7
    seed: int = 0


class _TextModel:
    """Topic-mixture unigram text generator over a Zipf-distributed pseudo-word vocabulary."""

    def __init__(self, rng: np.random.Generator, vocab_size: int = 6000, topics: int = 4000, topic_words: int = 12):
        n_syl = rng.integers(1, 4, size=vocab_size)
        words = {"".join(rng.choice(SYLLABLES, size=k)) for k in n_syl}
        self.vocab = np.array(sorted(words), dtype=object)
        ranks = np.arange(1, len(self.vocab) + 1)
        self.p = (1.0 / ranks) / (1.0 / ranks).sum()
        self.rng = rng
        self.on_topic = 0.6
        self.n_topics = topics
        base = rng.integers(0, len(self.vocab), size=(topics, topic_words))
        # Neighbouring topics share a third of their words: hard negatives are plausibly close.
        shared = topic_words // 3
        base[1:, :shared] = base[:-1, -shared:]
        self.topic_words = base

    def texts(self, topics: np.ndarray, n_words: np.ndarray) -> list[str]:
        total = int(n_words.sum())
        background = self.rng.choice(len(self.vocab), size=total, p=self.p)
        on_topic = self.rng.random(total) < self.on_topic
        slot = self.rng.integers(0, self.topic_words.shape[1], size=total)
        row = np.repeat(topics, n_words)
        idx = np.where(on_topic, self.topic_words[row, slot], background)
        words = self.vocab[idx]
        bounds = np.concatenate([[0], np.cumsum(n_words)])
        return [" ".join(words[bounds[i] : bounds[i + 1]]).capitalize() + "." for i in range(len(n_words))]


def _query_words(rng: np.random.Generator, n: int) -> np.ndarray:
    tokens = np.clip(rng.normal(30, 8, size=n), 6, 80)
    return np.maximum((tokens * WORDS_PER_TOKEN).astype(np.int64), 3)


def _passage_words(rng: np.random.Generator, n: int) -> np.ndarray:
    tokens = np.minimum(rng.lognormal(np.log(200), 0.6, size=n), 1024)
    return np.maximum((tokens * WORDS_PER_TOKEN).astype(np.int64), 5)


def _retrieval_rows(model: _TextModel, rng: np.random.Generator, n_passages: int, k: int) -> dict[str, list]:
    """Corpus of `n_passages`; every 4th passage is a positive of one query; negatives from neighbour topics."""
    topics = rng.integers(0, model.n_topics, size=n_passages)
    corpus = model.texts(topics, _passage_words(rng, n_passages))
    by_topic: dict[int, list[int]] = {}
    for i, t in enumerate(topics):
        by_topic.setdefault(int(t), []).append(i)
    n_queries = max(n_passages // 4, 1)
    pos = rng.choice(n_passages, size=n_queries, replace=False)
    queries = model.texts(topics[pos], _query_words(rng, n_queries))
    columns: dict[str, list] = {"query": queries, "passage": [corpus[i] for i in pos]}
    negs = np.empty((n_queries, k), dtype=np.int64)
    for qi, p in enumerate(pos):
        t = int(topics[p])
        pool = [j for d in (-1, 1, 0) for j in by_topic.get(t + d, []) if j != p]
        if len(pool) < k:
            pool = pool + list(rng.choice(n_passages, size=k, replace=False))
        negs[qi] = rng.choice(pool, size=k, replace=False)
    for j in range(k):
        columns[f"negative_{j + 1}"] = [corpus[i] for i in negs[:, j]]
    return columns


def generate(opts: SynthOptions) -> dict[str, Path]:
    """Write the example datasets and the registry; returns {name: path}."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(opts.seed)
    model = _TextModel(rng)
    written: dict[str, Path] = {}
    with tqdm(total=3, desc="example datasets", unit="dataset") as bar:
        web = _retrieval_rows(model, rng, opts.passages, opts.negatives)
        written["web_search"] = out / "web_search.parquet"
        pq.write_table(pa.table(web), written["web_search"])
        bar.update()

        n_reviews = max(opts.passages // 20, 10)
        labels = [f"The review expresses a {lab} opinion about the product." for lab in ("positive", "negative", "neutral")]
        label_of = rng.integers(0, 3, size=n_reviews)
        reviews = model.texts(rng.integers(0, model.n_topics, size=n_reviews), _query_words(rng, n_reviews) * 2)
        written["product_reviews"] = out / "product_reviews.jsonl"
        with open(written["product_reviews"], "w") as handle:
            for text, lab in zip(reviews, label_of):
                neg = labels[(lab + 1 + rng.integers(0, 2)) % 3]
                handle.write(json.dumps({"query": text, "pos": [labels[lab]], "neg": [neg]}) + "\n")
        bar.update()

        clusters = _retrieval_rows(model, rng, max(opts.passages // 10, 40), 3)
        written["paper_topics"] = out / "paper_topics.parquet"
        pq.write_table(pa.table(clusters), written["paper_topics"])
        bar.update()

    registry = {
        "query_template": "Instruct: {instruction}\nQuery: {query}",
        "datasets": {
            "web_search": {"type": "retrieval", "instruction": "Given a web search query, retrieve relevant passages"},
            "product_reviews": {
                "type": "classification",
                "instruction": "Classify the sentiment of the given product review",
            },
            "paper_topics": {"type": "clustering", "instruction": "Identify the topic of the given paper abstract"},
        },
    }
    (out / "datasets.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    return written
