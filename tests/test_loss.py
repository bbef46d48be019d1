"""The fused, vocabulary-chunked head + cross-entropy against the plain form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reasoning_llama import loss as loss_module
from reasoning_llama.data.batching import Batch, BatchLoader
from reasoning_llama.data.prepare import TokenizedSplit
from reasoning_llama.loss import ModelWithLoss, batch_loss, linear_cross_entropy
from reasoning_llama.model import Transformer
from reasoning_llama.tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("keep_logits", [True, False])
@pytest.mark.parametrize("chunk", [64, 100, 1000, 5000])
def test_value_and_gradients_match_plain_cross_entropy(chunk, keep_logits, monkeypatch):
    # Small batches keep the forward's logits for the backward pass; big ones recompute them.
    monkeypatch.setattr(loss_module, "KEEP_LOGITS_LIMIT", 2**25 if keep_logits else 0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    targets[:3] = torch.tensor([0, 999, chunk % 1000])  # first, last, and a chunk boundary
    fused = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-5)


def test_bf16_matmuls_stay_close_and_gradients_keep_parameter_dtypes():
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (torch.randn(3000, 32) * 0.1).requires_grad_()
    targets = torch.randint(0, 3000, (64,))
    fused = linear_cross_entropy(hidden, weight, targets, dtype=torch.bfloat16)
    fused.backward()
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert fused.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=0.0)


def test_bf16_loss_of_a_confident_model_is_the_cross_entropy_of_its_bf16_logits():
    # Late in training the target's logit is large and the loss near zero; bf16 rounding of a logit
    # of ~40 is ~0.1, so a target logit computed apart from the log-sum-exp made the loss negative.
    torch.manual_seed(0)
    weight = torch.randn(3000, 32)
    targets = torch.randint(0, 3000, (64,))
    hidden = weight[targets] * 1.3 + 0.01 * torch.randn(64, 32)
    per_token = [
        linear_cross_entropy(hidden[i : i + 1], weight, targets[i : i + 1], dtype=torch.bfloat16)
        for i in range(64)
    ]
    assert min(loss.item() for loss in per_token) >= 0.0
    bf16_logits = (hidden.bfloat16() @ weight.bfloat16().T).float()
    plain = F.cross_entropy(bf16_logits, targets, reduction="sum")
    torch.testing.assert_close(sum(per_token), plain, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_form_cuda_uses_gives_the_chunked_value_and_gradients(dtype):
    """What CUDA runs (torch.compile of the plain form), compiled here on the CPU, with row weights."""
    torch.manual_seed(0)
    hidden = torch.randn(48, 16, requires_grad=True)
    weight = (torch.randn(1000, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 1000, (48,))
    keep = torch.rand(48) < 0.7
    results = []
    for compiled in (False, True):
        loss = linear_cross_entropy(hidden, weight, targets, row_weights=keep, dtype=dtype, compiled=compiled)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    (chunked, *chunked_grads), (compiled_loss, *compiled_grads) = results
    assert compiled_loss.dtype == torch.float32
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(compiled_loss, chunked, **tolerance)
    for got, want in zip(compiled_grads, chunked_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, **tolerance)
    assert torch.count_nonzero(compiled_grads[0][~keep]) == 0


def test_no_loss_tokens_gives_zero_and_zero_gradients():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(weight.grad) == 0


def test_row_weights_equal_selecting_the_rows(monkeypatch):
    """The sync-free form (every row, weight 0 off the mask) against the selected rows alone."""
    monkeypatch.setattr(loss_module, "KEEP_LOGITS_LIMIT", 0)  # the recomputing backward too
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    keep = torch.rand(40) < 0.6
    selected = linear_cross_entropy(hidden[keep], weight, targets[keep], chunk=128)
    selected.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    weighted = linear_cross_entropy(hidden, weight, targets, row_weights=keep, chunk=128)
    weighted.backward()
    torch.testing.assert_close(weighted, selected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, grads[1], rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(hidden.grad[~keep]) == 0


def packed_batch(seq_len: int = 64) -> Batch:
    tokenizer = get_tokenizer()
    examples = [
        tokenizer.render_example("What is 2 + 3?", "2 + 3 = 5", "5"),
        tokenizer.render_example("Sort 3 1 2.", "1 | 3 2\n1 2 | 3\n1 2 3", "1 2 3"),
        tokenizer.render_example("Hi", "greeting", "Hello!"),
    ]
    split = TokenizedSplit(
        ids=[np.array(e.ids, dtype=np.int32) for e in examples],
        loss_mask=[np.array(e.loss_mask, dtype=np.bool_) for e in examples],
    )
    return next(iter(BatchLoader(split, seq_len=seq_len, batch_size=2, packing=True, seed=0)))


def plain_loss(model: Transformer, batch: Batch) -> torch.Tensor:
    """The unfused reference: full logits from the model's forward, then cross-entropy."""
    logits = model(batch.inputs, batch.positions, doc_ids=batch.doc_ids)
    return F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask], reduction="sum")


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("select_positions", [True, False])
def test_model_with_loss_matches_the_model_logits_path(tiny_config, select_positions):
    batch = packed_batch()
    model = Transformer(tiny_config)
    fused = batch_loss(ModelWithLoss(model, select_positions=select_positions), batch)
    fused_grads = gradients(model, fused)
    plain = plain_loss(model, batch)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for name, grad in gradients(model, plain).items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert isinstance(model.head, torch.nn.Linear)


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_config):
    """What training does on a GPU by default (compiled decoder layers), checked on the CPU."""
    batch = packed_batch()
    eager = Transformer(tiny_config)
    compiled = Transformer(tiny_config)
    compiled.load_state_dict(eager.state_dict())
    for layer in compiled.layers:
        layer.compile(dynamic=False)
    results = []
    for model in (eager, compiled):
        loss = batch_loss(ModelWithLoss(model, select_positions=False), batch)
        results.append((loss.detach(), gradients(model, loss)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # compiling in place keeps the names

    # Another batch of the same shape runs the graphs already compiled (and, with one layer index
    # read only by the KV cache, every layer shares them).
    other = packed_batch()
    other.inputs = other.inputs.roll(1, dims=1)
    with torch._dynamo.config.patch(error_on_recompile=True):  # noqa: SLF001 (no public switch)
        batch_loss(ModelWithLoss(compiled, select_positions=False), other).backward()
