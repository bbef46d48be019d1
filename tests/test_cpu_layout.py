"""The CPU decode layout changes how weights sit in memory, never what the model computes."""

import pytest
import torch
from torch import nn

from reasoning_llama.config import ModelConfig
from reasoning_llama.cpu_layout import (
    ColumnBlockLinear,
    prepare_for_cpu_decode,
    store_linear_weights_transposed,
)
from reasoning_llama.model import Transformer

# An odd vocabulary (like the real 50,263) leaves a remainder after the column blocks.
CONFIG = ModelConfig(
    vocab_size=50263, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def copy_of(model: Transformer) -> Transformer:
    copy = Transformer(CONFIG).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_transposed_storage_keeps_values_shapes_and_outputs(model):
    copy = copy_of(model)
    store_linear_weights_transposed(copy)
    assert copy.head.weight.shape == model.head.weight.shape
    assert copy.head.weight.stride() == (1, CONFIG.vocab_size)
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    with torch.inference_mode():
        assert torch.allclose(copy(ids), model(ids), atol=1e-5)
    assert torch.equal(copy.state_dict()["head.weight"], model.state_dict()["head.weight"])


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_column_blocks_compute_the_plain_product(rows, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(rows)
        weight = nn.Parameter(torch.randn(1001, 48).t().contiguous().t())  # stored transposed
        layer = ColumnBlockLinear(weight)
        x = torch.randn(rows, 1, 48)
        with torch.inference_mode():
            assert torch.allclose(layer(x), nn.functional.linear(x, weight), atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_column_blocks_take_the_bmm_path_for_a_few_rows(two_threads, monkeypatch):
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a[1].shape) or real_bmm(*a))
    layer = ColumnBlockLinear(nn.Parameter(torch.randn(1001, 48).t().contiguous().t()))
    with torch.inference_mode():
        layer(torch.randn(1, 48))
        assert calls == [(2, 48, 500)]  # two blocks of 500 columns; the last column separately
        layer(torch.randn(17, 48))  # above max_rows: MKL's own product
    assert len(calls) == 1


def test_prepared_model_keeps_its_state_dict_and_outputs(model, two_threads):
    copy = copy_of(model)
    prepare_for_cpu_decode(copy)
    assert isinstance(copy.head, ColumnBlockLinear)
    assert copy.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(copy.state_dict()[name], tensor), name
    assert copy.num_parameters() == model.num_parameters()
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    with torch.inference_mode():
        assert torch.allclose(copy(ids), model(ids), atol=1e-4)
        select = torch.tensor([[False, False, False, False, True]])
        assert torch.allclose(copy(ids, select=select), model(ids)[:, -1], atol=1e-4)
