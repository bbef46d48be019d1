from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from reasoning_llama.config import PRESETS, ModelConfig, get_preset
from reasoning_llama.errors import ConfigError
from reasoning_llama.model import (
    KVCache,
    Transformer,
    default_positions,
    document_block_mask,
    document_segments,
    example_starts,
    one_query_attention,
    varlen_call_form,
)


def test_small_100m_parameter_count():
    with torch.device("meta"):
        model = Transformer(get_preset("small-100m"))
    parts = model.parameter_breakdown()
    assert parts["total"] == 100_217_088
    assert parts["embedding"] == parts["head"] == 38_601_984
    assert parts["per_layer"] == 3_540_480
    assert parts["final_norm"] == 768
    assert parts["final_block"] == 1_769_472


def test_final_block_switch_removes_its_parameters():
    with torch.device("meta"):
        model = Transformer(ModelConfig(final_block=False))
    assert model.num_parameters() == 100_217_088 - 1_769_472
    assert not any(name.startswith("final_block") for name, _ in model.named_parameters())


def test_no_biases_anywhere():
    with torch.device("meta"):
        model = Transformer(get_preset("small-100m"))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    config = get_preset(name)
    assert config.dim % config.n_heads == 0


def test_invalid_config_is_reported():
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_initialisation_scales_residual_projections(tiny_config):
    config = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=4096)
    model = Transformer(config)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * config.n_layers)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(config.dim))


def test_causality(tiny_config):
    model = Transformer(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, tiny_config.vocab_size, (2, 6))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(tiny_config, side):
    model = Transformer(tiny_config).eval()
    real = torch.randint(0, tiny_config.vocab_size, (1, 9))
    pad = torch.full((1, 5), 50262)
    ids = torch.cat([pad, real] if side == "left" else [real, pad], dim=1)
    mask = torch.cat(
        [torch.zeros(1, 5), torch.ones(1, 9)] if side == "left" else [torch.ones(1, 9), torch.zeros(1, 5)], 1
    )
    with torch.no_grad():
        alone = model(real)
        padded = model(ids, attention_mask=mask.bool())
    real_logits = padded[mask.bool()].view(1, 9, -1)
    assert (real_logits - alone).abs().max().item() <= 1e-5
    assert torch.isfinite(padded).all()


def test_packed_rows_match_examples_alone(tiny_config):
    model = Transformer(tiny_config).eval()
    lengths = [5, 7, 4]
    examples = [torch.randint(0, tiny_config.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(examples, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    positions = default_positions(1, packed.shape[1], packed.device, doc_ids=doc_ids)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
    with torch.no_grad():
        packed_logits = model(packed, doc_ids=doc_ids)
        start = 0
        for example, n in zip(examples, lengths, strict=True):
            diff = (packed_logits[:, start : start + n] - model(example)).abs().max().item()
            assert diff <= 1e-5
            start += n


def test_select_returns_logits_only_where_asked(tiny_config):
    model = Transformer(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 6))
    select = torch.zeros(2, 6, dtype=torch.bool)
    select[0, 2] = select[1, 5] = select[1, 0] = True
    with torch.no_grad():
        full, picked = model(ids), model(ids, select=select)
    assert picked.shape == (3, tiny_config.vocab_size)
    assert torch.allclose(picked, full[select], atol=1e-6)


def test_kv_cache_prefill_and_decode_match_full_forward(tiny_config):
    """The cache path itself; the engine's own tests cover full generation."""
    model = Transformer(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    cache = KVCache(tiny_config, batch_size=2, max_len=32)
    with torch.no_grad():
        full = model(ids)
        pos = torch.arange(8).expand(2, 8)
        first = model(ids[:, :8], pos, kv_cache=cache)
        steps = [model(ids[:, t : t + 1], torch.full((2, 1), t), kv_cache=cache) for t in range(8, 12)]
    assert (first - full[:, :8]).abs().max().item() <= 1e-5
    for t, step in zip(range(8, 12), steps, strict=True):
        assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5


def test_kv_cache_rows_hold_independent_sequences_of_different_lengths(tiny_config):
    model = Transformer(tiny_config).eval()
    a = torch.randint(0, tiny_config.vocab_size, (1, 5))
    b = torch.randint(0, tiny_config.vocab_size, (1, 9))
    cache = KVCache(tiny_config, batch_size=3, max_len=16)
    with torch.no_grad():
        model(b, torch.arange(9).view(1, 9), kv_cache=cache, cache_rows=torch.tensor([2]))
        model(a, torch.arange(5).view(1, 5), kv_cache=cache, cache_rows=torch.tensor([0]))
        nxt = torch.randint(0, tiny_config.vocab_size, (2, 1))
        step = model(nxt, torch.tensor([[5], [9]]), kv_cache=cache, cache_rows=torch.tensor([0, 2]))
        ref_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    assert (step[0, 0] - ref_a[0]).abs().max().item() <= 1e-5
    assert (step[1, 0] - ref_b[0]).abs().max().item() <= 1e-5


def test_one_query_attention_is_what_sdpa_computes():
    """The compiled CPU decode step's written-out attention: grouped heads, masked key slots."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.arange(10).view(1, 1, 1, 10) <= torch.tensor([9, 4, 0]).view(3, 1, 1, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(one_query_attention(q, k, v, mask), expected)
    assert (one_query_attention(q, k, v, mask)[2] - v[:, :, :1].repeat_interleave(4, 1)[2]).abs().max() < 1e-6


def test_positions_beyond_context_raise(tiny_config):
    model = Transformer(tiny_config)
    with pytest.raises(ValueError, match="beyond the model's context"):
        model(torch.zeros(1, tiny_config.max_seq_len + 1, dtype=torch.long))


def test_config_json_round_trip(tmp_path):
    config = get_preset("tiny")
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config
    (tmp_path / "bad.json").write_text('{"dim": 64, "wings": 2}')
    with pytest.raises(ConfigError, match="unknown model config keys: wings"):
        ModelConfig.load(tmp_path / "bad.json")


@pytest.mark.slow
def test_flex_attention_document_mask_gives_the_dense_mask_outputs():
    """The GPU path (FlexAttention block mask, compiled kernel) against SDPA with the dense mask, on
    packed rows with padding, over several blocks (FlexAttention has no CPU backward: forward only).
    The mask built through torch.compile, as on CUDA, is the eagerly built one."""
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256)
    model = Transformer(config).eval()
    length = 200  # not a multiple of the 128-token block
    doc_ids = torch.zeros(2, length, dtype=torch.long)
    for row, starts in enumerate(([0, 37, 90, 170], [0, 130, 185])):
        for doc, start in enumerate(starts):
            doc_ids[row, start:] = doc
    doc_ids[1, 190:] = 3  # padding: a doc id of its own
    ids = torch.randint(0, config.vocab_size, (2, length))
    positions = default_positions(2, length, ids.device, doc_ids=doc_ids)
    block_mask = document_block_mask(doc_ids, compiled=True)
    eager_mask = document_block_mask(doc_ids, compiled=False)
    assert torch.equal(block_mask.to_dense(), eager_mask.to_dense())
    assert torch.equal(block_mask.full_kv_num_blocks, eager_mask.full_kv_num_blocks)
    with torch.no_grad():
        dense = model.hidden_states(ids, positions, doc_ids=doc_ids)
        flex = model.hidden_states(ids, positions, block_mask=block_mask)
    assert (flex - dense).abs().max().item() <= 1e-4


def written_out_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, causal, grouped):
    """What flash attention's variable-length kernel (CUDA only) computes, written out for a CPU:
    causal attention inside each sequence `cu_seq_q[i]:cu_seq_q[i + 1]` of the (N, H, D) rows."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and max_q == max_k
    assert causal
    groups = q.shape[1] // k.shape[1]
    assert groups == 1 or grouped
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu_seq_q.tolist()
    assert bounds[-1] == q.shape[0] and all(b - a <= max_q for a, b in itertools.pairwise(bounds))
    pieces = [
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True)
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]
    return torch.cat(pieces, dim=1).transpose(0, 1)


# The three signatures `torch.nn.attention.varlen.varlen_attn` has had, each taking only its own options.
def varlen_with_is_causal(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return written_out_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, False)


def varlen_with_window(
    q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    return written_out_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), False)


def varlen_with_gqa(
    q,
    k,
    v,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    return written_out_varlen_attn(
        q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), enable_gqa
    )


def test_document_segments_cut_the_flattened_rows_at_every_example():
    doc_ids = torch.zeros(2, 200, dtype=torch.long)
    for row, starts in enumerate(([0, 37, 90, 170], [0, 130, 185, 190])):
        for doc, start in enumerate(starts):
            doc_ids[row, start:] = doc
    segments = document_segments(doc_ids, per_row=5)
    expected = [0, 37, 90, 170, 200, 330, 385, 390] + [400] * 3  # two spare, empty sequences
    assert segments.offsets.tolist() == expected and segments.offsets.dtype == torch.int32
    assert segments.longest == 200


@pytest.mark.parametrize("kernel", [varlen_with_is_causal, varlen_with_window, varlen_with_gqa])
def test_varlen_attention_gives_the_dense_paths_loss_and_gradients(monkeypatch, kernel):
    """The GPU's varlen path (rows flattened into one sequence per example, grouped key heads, the
    output put back) against the dense mask on packed rows with padding. Flash attention itself
    runs on CUDA only (tests/test_gpu.py); here a written-out kernel stands in for it, under each
    of the signatures PyTorch releases have had."""
    from reasoning_llama import model as model_module
    from reasoning_llama.loss import ModelWithLoss, batch_loss
    from test_loss import packed_batch

    monkeypatch.setattr(model_module, "varlen_attn", kernel)
    causal, grouped = varlen_call_form(kernel)
    monkeypatch.setattr(model_module, "VARLEN_CAUSAL", causal)
    monkeypatch.setattr(model_module, "VARLEN_TAKES_GQA", grouped)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    model = Transformer(config)
    batch = packed_batch(seq_len=64)
    assert example_starts(batch.doc_ids).sum(dim=1).tolist() == [3, 2]  # two examples, one; padding
    results = []
    for attention in ("sdpa", "varlen"):
        model.zero_grad()
        loss = batch_loss(ModelWithLoss(model, attention=attention, segments_per_row=4), batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
