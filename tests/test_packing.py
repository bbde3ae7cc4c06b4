"""Packing: packed embeddings equal padded ones (fp32, <= 1e-5), chunk planning, encoder handling, batch/DS config."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers_model import minilm_dir, one_torch_thread, tiny_model, tiny_model_config
from pipeline.data.batch import ContrastiveBatch, random_batch
from pipeline.config import ModelConfig
from pipeline.training.ds_config import load_ds_config
from pipeline.model.embedding import EmbeddingModel, encode, resolve_attn_implementation
from pipeline.model.packing import build_inputs, chunk_cost, pack, pad, plan_chunks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def seqs_with_edge_lengths(rng: np.random.Generator) -> list[np.ndarray]:
    lengths = [1, 2, 37, 5, 64, 1, 13, 90, 3]
    out = []
    for n in lengths:
        s = rng.integers(1000, 30000, size=n)
        s[-1] = 102
        out.append(s.astype(np.uint16))  # shard dtype
    return out


@pytest.mark.parametrize(
    "pooling,attn", [("last_token", "sdpa"), ("mean", "sdpa"), ("cls", "sdpa"), ("last_token", "varlen")]
)
def test_packed_equals_padded_and_separate(pooling, attn):
    """Packed rows (sdpa with transformers' block-diagonal mask, or segment attention) == padded == one by one."""
    model = tiny_model(0, pooling=pooling, attn_implementation=attn)
    reference = tiny_model(0, pooling=pooling, attn_implementation="sdpa")  # same weights
    model.eval()
    reference.eval()
    seqs = seqs_with_edge_lengths(np.random.default_rng(1))
    with torch.no_grad():
        packed = model(pack(seqs))
        padded = reference(pad(seqs, pad_id=0))
        separate = torch.cat([reference(pad([s], pad_id=0)) for s in seqs])
    assert packed.dtype == torch.float32 and packed.shape == (len(seqs), 64)
    assert (packed - padded).abs().max() <= 1e-5
    assert (packed - separate).abs().max() <= 1e-5
    assert torch.allclose(packed.norm(dim=-1), torch.ones(len(seqs)), atol=1e-5)


def test_packing_without_position_restarts_leaks_across_sequences():
    """Negative control: the same row with position_ids 0..T-1 (no restarts) mixes sequences - the test above is
    sensitive to the block-diagonal mask."""
    model = tiny_model(0, attn_implementation="sdpa")
    model.eval()
    seqs = seqs_with_edge_lengths(np.random.default_rng(1))
    inputs = pack(seqs)
    leaky = pack(seqs)
    leaky.position_ids = torch.arange(inputs.input_ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        diff = (model(inputs) - model(leaky)).abs().max()
    assert diff > 1e-2


def test_varlen_attention_rejects_padded_inputs():
    model = tiny_model(0, attn_implementation="varlen")
    with pytest.raises(ValueError, match="varlen attention needs packed inputs"):
        model(pad([np.array([5, 6, 102])], pad_id=0))
    with pytest.raises(ValueError, match="varlen needs packed chunks"):
        tiny_model(0, attn_implementation="varlen", packing="padded")


def test_encode_chunks_restore_input_order_and_count_padding():
    model = tiny_model(0, attn_implementation="sdpa")  # runs both layouts
    model.eval()
    seqs = seqs_with_edge_lengths(np.random.default_rng(2)) * 3
    with torch.no_grad():
        whole = model(pack(seqs))
        emb, stats = encode(model, seqs, chunk_tokens=100)
        model.packed = False
        emb_pad, stats_pad = encode(model, seqs, chunk_size=4)
    assert (emb - whole).abs().max() <= 1e-5 and (emb_pad - whole).abs().max() <= 1e-5
    assert stats.chunks > 3 and stats.padding_efficiency == 1.0
    assert stats.real_tokens == sum(len(s) for s in seqs) == stats_pad.real_tokens
    assert 0 < stats_pad.padding_efficiency < 1.0


def test_plan_chunks_budget_and_coverage():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=200)
    lengths[7] = 5000  # longer than the budget: a chunk of its own
    for packed in (True, False):
        chunks = plan_chunks(lengths, packed=packed, chunk_tokens=1024)
        flat = np.sort(np.concatenate(chunks))
        assert (flat == np.arange(200)).all()
        for c in chunks:
            assert chunk_cost(lengths[c], packed=packed) <= 1024 or len(c) == 1
    packed_chunks = plan_chunks(lengths, packed=True, chunk_tokens=1024)  # balanced (test below), in index order
    assert all((np.diff(c) > 0).all() for c in packed_chunks)
    assert [int(c[0]) for c in packed_chunks] == sorted(int(c[0]) for c in packed_chunks)
    # length bucketing: padded cost with bucketing well below the cost without
    bucketed = sum(chunk_cost(lengths[c], packed=False) for c in plan_chunks(lengths, packed=False, chunk_size=8))
    unsorted = sum(chunk_cost(lengths[c], packed=False)
                   for c in plan_chunks(lengths, packed=False, chunk_size=8, bucket=False))
    assert bucketed < 0.8 * unsorted
    assert [len(c) for c in plan_chunks(lengths, packed=True, chunk_size=64)] == [64, 64, 64, 8]
    assert len(plan_chunks(lengths, packed=True)) == 1
    with pytest.raises(ValueError, match="chunk_tokens"):
        plan_chunks(lengths, packed=True, chunk_tokens=0)


def _filled_in_order(lengths: np.ndarray, budget: int) -> int:
    """Chunks of the planner before balancing: each filled up to the budget in input order (the count)."""
    chunks, load = 0, 0
    for length in lengths:
        if chunks == 0 or load + length > budget:
            chunks, load = chunks + 1, 0
        load += int(length)
    return chunks


def test_packed_chunks_are_few_and_balanced():
    """Packed chunks under a token budget: the fewest that can hold the step (ceil(S / budget)) on F2LLM-shaped
    steps, never more than filling each chunk in turn, and balanced - chunk loads differ by at most the longest
    sequence (LPT) - instead of budget, budget, ..., remainder; every chunk's cost is what its inputs compute."""
    rng = np.random.default_rng(0)
    at_bound = steps = 0
    for budget in (4096, 16384, 65536):
        for _ in range(50):
            queries = np.clip(rng.lognormal(np.log(34), 0.45, size=16), 4, 1024)
            passages = np.clip(rng.lognormal(np.log(229), 0.56, size=16 * 8), 4, 1024)
            lengths = np.rint(np.concatenate([queries, passages])).astype(np.int64)
            chunks = plan_chunks(lengths, packed=True, chunk_tokens=budget)
            loads = [int(lengths[c].sum()) for c in chunks]
            assert np.array_equal(np.sort(np.concatenate(chunks)), np.arange(lengths.size))
            assert max(loads) <= budget and max(loads) - min(loads) <= lengths.max()
            assert len(chunks) <= _filled_in_order(lengths, budget)
            at_bound += len(chunks) == -(-int(lengths.sum()) // budget)
            steps += 1
    assert at_bound >= 0.98 * steps, (at_bound, steps)
    loads = [int(lengths[c].sum()) for c in plan_chunks(lengths, packed=True, chunk_tokens=16384)]
    assert len(loads) == 3 and max(loads) - min(loads) <= lengths.max(), loads  # ~36k: 3 x ~12k, not 16k, 16k, 4k
    lengths = np.array([5000, 10, 20, 900, 700])  # longer than the budget: a chunk of its own
    assert [c.tolist() for c in plan_chunks(lengths, packed=True, chunk_tokens=1024)] == [[0], [1, 2, 4], [3]]
    seqs = seqs_with_edge_lengths(np.random.default_rng(3)) * 4
    for packed in (True, False):
        for c in plan_chunks([len(s) for s in seqs], packed=packed, chunk_tokens=128):
            inputs = build_inputs([seqs[i] for i in c], packed=packed, pad_id=0, max_length=512)
            assert chunk_cost([len(seqs[i]) for i in c], packed=packed) == inputs.computed_tokens
            assert not packed or (inputs.computed_tokens == inputs.real_tokens and inputs.max_length == 512)


def test_pack_layout():
    inputs = pack([np.array([5, 6, 7]), np.array([8]), np.array([9, 10])])
    assert inputs.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert inputs.cu_seqlens.tolist() == [0, 3, 4, 6] and inputs.cu_seqlens.dtype == torch.int32
    assert inputs.attention_mask is None and inputs.max_length == 3
    padded = pad([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert padded.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded.real_tokens == 4 and padded.computed_tokens == 6


def test_encoder_minilm_padded_matches_sentence_transformers():
    """BERT encoder: 'auto' resolves to padded chunks and the model dir's mean pooling; equals sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = minilm_dir()
    model = EmbeddingModel.from_config(ModelConfig(name_or_path=path), "cpu")
    assert model.pooling == "mean" and model.packed is False and model.attn_implementation == "sdpa"
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["a short one", "a somewhat longer sentence about gradient caching and packing", "x"]
    seqs = [np.array(ids) for ids in tok(texts)["input_ids"]]
    with torch.no_grad():
        ours, stats = encode(model, seqs, chunk_size=2)
    ref = SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert (ours - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="encoders ignore packed"):
        EmbeddingModel.from_config(ModelConfig(name_or_path=path, packing="packed"), "cpu")


def test_settings_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu) == "sdpa"
    assert resolve_attn_implementation("auto", cpu, packed=True) == "varlen"
    assert resolve_attn_implementation("varlen", cpu, packed=True) == "varlen"
    with pytest.raises(ValueError, match="varlen needs packed chunks"):
        resolve_attn_implementation("varlen", cpu, packed=False)
    with pytest.raises(ValueError, match="flash_attention_2 needs CUDA"):
        resolve_attn_implementation("flash_attention_2", torch.device("cpu"))
    model = tiny_model(0)
    assert model.attn_implementation == "varlen"  # auto: packed decoder
    assert model.pooling == "last_token" and model.packed and next(model.parameters()).dtype == torch.float32
    assert model.backbone.config.use_cache is False
    with pytest.raises(ValueError, match="exactly one"):
        EmbeddingModel.from_config(ModelConfig(), "cpu")
    ckpt = EmbeddingModel.from_config(tiny_model_config(gradient_checkpointing=True), "cpu")
    flag = getattr(ckpt.backbone, "is_activation_checkpointing", None)
    assert flag if flag is not None else ckpt.backbone.is_gradient_checkpointing


def test_batch_validation():
    rng = np.random.default_rng(0)
    b = random_batch(rng, batch_size=2, n_neg=3, vocab_size=100, eos_id=7)
    assert len(b.sequences()) == 2 + 2 + 6 and all(s[-1] == 7 for s in b.sequences())
    with pytest.raises(ValueError, match="expected 2 \\* 2 negatives"):
        ContrastiveBatch(b.queries, b.positives, b.negatives, 2, "retrieval")
    with pytest.raises(ValueError, match="dataset_type"):
        ContrastiveBatch(b.queries, b.positives, b.negatives, 3, "qa")


def test_ds_config_batch_fields_follow_training_config(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for name in ("zero2.json", "zero3.json"):
        cfg = load_ds_config(repo / "ds_configs" / name, micro_batch=16, grad_accum=1, world_size=4, use_bf16=False)
        assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 16
        assert cfg["gradient_accumulation_steps"] == 1 and cfg["bf16"]["enabled"] is False
        assert cfg["optimizer"]["type"] == "AdamW"
    z3 = load_ds_config(repo / "ds_configs" / "zero3.json", micro_batch=2, world_size=1, use_bf16=True)
    assert z3["bf16"]["enabled"] is True
    zo = z3["zero_optimization"]
    assert zo["stage"] == 3 and zo["overlap_comm"] and zo["contiguous_gradients"]
    assert zo["stage3_gather_16bit_weights_on_model_save"] is True
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_ds_config(bad, micro_batch=1, world_size=1, use_bf16=False)
    assert json.loads((repo / "ds_configs" / "zero3.json").read_text())["bf16"]["enabled"] == "auto"
