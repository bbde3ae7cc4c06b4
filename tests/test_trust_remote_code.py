"""``model.trust_remote_code`` / ``--trust-remote-code``: code a model directory ships runs only when asked for.

A tiny model directory whose config.json maps AutoConfig / AutoModel to classes in a Python file of its own
(transformers' ``auto_map``) fails to load with one line saying so by default, and loads with the flag; every loader
of models, tokenizers and configs (model, tokenizer, teacher, evaluation, scoring, preprocessing) is handed the flag.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DistillConfig, ModelConfig

MODELING = '''
from transformers import BertConfig, BertModel


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote"


class TinyRemoteModel(BertModel):
    config_class = TinyRemoteConfig
'''


def remote_code_model(out: Path) -> Path:
    """A 1-layer BERT saved as a model type transformers does not know, its classes in ``modeling_tiny.py``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    (out / "modeling_tiny.py").write_text(MODELING)
    meta = json.loads((out / "config.json").read_text())
    meta.update(model_type="tiny-remote", auto_map={"AutoConfig": "modeling_tiny.TinyRemoteConfig",
                                                    "AutoModel": "modeling_tiny.TinyRemoteModel"})
    (out / "config.json").write_text(json.dumps(meta))
    return out


def test_a_directory_with_its_own_code_loads_only_when_trusted(tmp_path):
    from pipeline.model.embedding import EmbeddingModel, encode, load_model_dir

    model_dir = remote_code_model(tmp_path / "remote")
    with pytest.raises(ValueError) as refused:  # default: refused at once, no interactive prompt
        EmbeddingModel.from_config(ModelConfig(name_or_path=str(model_dir)), "cpu")
    assert str(refused.value) == (
        f"model.name_or_path: cannot load the model config of {str(model_dir)!r} (ValueError; the directory ships "
        "its own code (auto_map): set model.trust_remote_code true (--trust-remote-code) if it comes from a trusted "
        "source)")

    model = EmbeddingModel.from_config(ModelConfig(name_or_path=str(model_dir), trust_remote_code=True), "cpu")
    assert type(model.backbone).__name__ == "TinyRemoteModel" and model.pooling == "mean"
    emb, _ = encode(model, [np.array([1, 5, 7, 2]), np.array([1, 9, 2])], chunk_size=2)
    assert emb.shape == (2, 16)
    loaded, _ = load_model_dir(str(model_dir), "cpu", trust_remote_code=True)
    assert type(loaded.backbone).__name__ == "TinyRemoteModel"


@pytest.fixture
def recorded(monkeypatch):
    """transformers' AutoConfig / AutoModel / AutoTokenizer.from_pretrained and sentence-transformers' model classes
    replaced by recorders of the trust_remote_code they are given ("missing" when not passed); each then fails with
    OSError, as a directory that cannot load."""
    import sentence_transformers
    import transformers

    calls: list[tuple[str, object]] = []

    def recorder(name: str):
        def load(*args, **kwargs):
            calls.append((name, kwargs.get("trust_remote_code", "missing")))
            raise OSError(f"{name}: recorded")
        return load

    for cls in ("AutoConfig", "AutoModel", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", recorder(cls))
    for cls in ("SentenceTransformer", "CrossEncoder"):
        monkeypatch.setattr(sentence_transformers, cls, recorder(cls))
    return calls


def model_dir(tmp_path: Path) -> str:
    out = tmp_path / "model"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text('{"model_type": "bert"}')
    (out / "modules.json").write_text("[]")
    return str(out)


@pytest.mark.parametrize("trust", [False, True])
def test_the_flag_reaches_the_model_tokenizer_and_teacher_loaders(recorded, tmp_path, trust):
    from pipeline.data.tokenization import encode_spec, load_tokenizer
    from pipeline.model.embedding import build_backbone, load_hf_config, load_tokenizer_for
    from pipeline.training.teacher import check_teacher_tokenizer, load_teacher

    path = model_dir(tmp_path)
    cfg = ModelConfig(name_or_path=path, trust_remote_code=trust)
    with pytest.raises(ValueError, match="^model.name_or_path: cannot load"):
        load_hf_config(cfg)
    with pytest.raises(ValueError, match="^model.tokenizer: cannot load"):
        load_tokenizer_for(cfg)
    with pytest.raises(OSError):
        build_backbone(cfg, attn_implementation="sdpa", dtype=torch.float32, hf_config=object())
    with pytest.raises(OSError):
        load_tokenizer(path, trust)
    with pytest.raises(OSError):
        encode_spec(path, 16, trust_remote_code=trust)
    teacher = DistillConfig(teacher=path)
    with pytest.raises(ValueError, match="^loss.distill.teacher: cannot load the tokenizer"):
        check_teacher_tokenizer(teacher, {}, trust_remote_code=trust)
    with pytest.raises(ValueError):
        load_teacher(teacher, torch.device("cpu"), student_hidden=8, zero_stage=0, world_size=1,
                     trust_remote_code=trust)
    assert recorded == [("AutoConfig", trust), ("AutoTokenizer", trust), ("AutoModel", trust),
                        ("AutoTokenizer", trust), ("AutoTokenizer", trust), ("AutoTokenizer", trust),
                        ("AutoConfig", trust)]


@pytest.mark.parametrize("trust", [False, True])
def test_the_command_lines_pass_the_flag(recorded, tmp_path, trust):
    from pipeline.evaluate import build_parser, run
    from pipeline.evaluation.mteb_eval import load_sentence_transformer
    from pipeline.evaluation.retrieval import EvaluationError
    from preprocess.__main__ import build_parser as preprocess_parser
    from preprocess.score import BiEncoderScorer, CrossEncoderScorer, ScoreError, ScoreOptions

    path = model_dir(tmp_path)
    flag = ["--trust-remote-code"] if trust else []
    args = build_parser().parse_args(["--model", path, "--data", str(tmp_path), *flag])
    with pytest.raises(ValueError, match="cannot load the model config"):
        run(args)
    with pytest.raises(EvaluationError, match="sentence-transformers cannot load it"):
        load_sentence_transformer(path, "cpu", trust_remote_code=args.trust_remote_code)

    parser = preprocess_parser()
    score = parser.parse_args(["score", str(tmp_path), "--teacher", path, *flag])
    build = parser.parse_args(["build", "--raw", "r", "--tokenizer", path, "--out", "o", *flag])
    show = parser.parse_args(["show", "o", "--dataset", "d", *flag])
    assert score.trust_remote_code == build.trust_remote_code == show.trust_remote_code == trust
    opts = ScoreOptions(shards=str(tmp_path), teacher=path, trust_remote_code=score.trust_remote_code)
    with pytest.raises(ValueError, match="cannot load the model config"):
        BiEncoderScorer(opts, reader=None, device="cpu")
    with pytest.raises(ScoreError, match="cannot load as a CrossEncoder"):
        CrossEncoderScorer(opts, reader=None, device="cpu")
    assert recorded == [("AutoConfig", trust), ("SentenceTransformer", trust), ("AutoConfig", trust),
                        ("CrossEncoder", trust)]
