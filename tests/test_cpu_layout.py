"""The CPU decode layouts change how linear layers run, never what the model computes."""

import pytest
import torch
from torch import nn

from reasoning_llama.config import ModelConfig
from reasoning_llama.cpu_layout import (
    FusedLinear,
    OneDNNLinear,
    fuse_projections,
    onednn_linear_works,
    prepare_for_cpu_decode,
    store_linear_weights_transposed,
)
from reasoning_llama.model import Transformer

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
IDS = torch.tensor([[5, 17, 300, 2, 9], [50262, 8, 1, 44, 50258]])

needs_onednn = pytest.mark.skipif(not onednn_linear_works(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


def copy_of(model: Transformer) -> Transformer:
    copy = Transformer(CONFIG).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def assert_same_model(prepared: Transformer, model: Transformer) -> None:
    assert prepared.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(prepared.state_dict()[name], tensor), name
    with torch.inference_mode():
        assert torch.allclose(prepared(IDS), model(IDS), atol=1e-4)
        select = torch.zeros_like(IDS, dtype=torch.bool)
        select[:, -1] = True
        assert torch.allclose(prepared(IDS, select=select), model(IDS)[:, -1], atol=1e-4)


def test_transposed_storage_keeps_values_shapes_and_outputs(model):
    copy = copy_of(model)
    store_linear_weights_transposed(copy)
    assert copy.head.weight.shape == model.head.weight.shape
    assert copy.head.weight.stride() == (1, CONFIG.vocab_size)
    assert_same_model(copy, model)


@needs_onednn
def test_several_threads_get_onednn_linear_layers(model, torch_threads):
    torch_threads(2)
    copy = copy_of(model)
    assert prepare_for_cpu_decode(copy) == "onednn"
    linears = [m for m in copy.modules() if isinstance(m, OneDNNLinear)]
    # q k v o gate up down and the fused qkv and gate-up per layer; the head; the final block's 3 + 1
    assert len(linears) == 9 * CONFIG.n_layers + 1 + 4
    assert not any(isinstance(m, nn.Linear) for m in copy.modules())
    assert copy.head.weight is copy.get_parameter("head.weight")
    assert_same_model(copy, model)


@needs_onednn
def test_fused_projections_share_the_parts_weights(model, torch_threads):
    torch_threads(2)
    copy = copy_of(model)
    prepare_for_cpu_decode(copy)
    swiglus = [copy.final_block, *(layer.mlp for layer in copy.layers)]
    groups = [
        (layer.attn.qkv_proj, [layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj])
        for layer in copy.layers
    ]
    groups += [(mlp.gate_up_proj, [mlp.gate_proj, mlp.up_proj]) for mlp in swiglus]
    for fused, parts in groups:
        assert torch.equal(fused.weight, torch.cat([part.weight for part in parts]))
        storage = fused.weight.untyped_storage().data_ptr()
        assert all(part.weight.untyped_storage().data_ptr() == storage for part in parts)  # not a copy
    # The fused weights are no Parameters: the model's parameters are the plain model's, no more.
    assert sum(p.numel() for p in copy.parameters()) == sum(p.numel() for p in model.parameters())


def test_fused_linear_projections_keep_the_models_outputs(model):
    """The GPU engine's form (`Engine.from_checkpoint` off the CPU: plain products), checked on the CPU."""
    copy = copy_of(model)
    fuse_projections(copy, FusedLinear)
    assert all(isinstance(layer.attn.qkv_proj, FusedLinear) for layer in copy.layers)
    assert all(isinstance(layer.mlp.gate_up_proj, FusedLinear) for layer in copy.layers)
    assert_same_model(copy, model)


def test_one_thread_gets_the_transposed_layout(model, torch_threads):
    torch_threads(1)
    copy = copy_of(model)
    assert prepare_for_cpu_decode(copy) == "transposed"
    assert isinstance(copy.head, nn.Linear)
    assert copy.head.weight.stride() == (1, CONFIG.vocab_size)
    assert_same_model(copy, model)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_onednn_linear_computes_the_plain_product(rows, torch_threads):
    torch_threads(2)
    torch.manual_seed(rows)
    weight = nn.Parameter(torch.randn(1001, 48))
    x = torch.randn(rows, 2, 48)
    with torch.inference_mode():
        assert torch.allclose(OneDNNLinear(weight)(x), nn.functional.linear(x, weight), atol=1e-4)
