"""The fused, vocabulary-chunked head + cross-entropy against the plain form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reasoning_llama.data.batching import BatchLoader
from reasoning_llama.data.prepare import TokenizedSplit
from reasoning_llama.evaluation import batch_loss_sum
from reasoning_llama.model import Transformer
from reasoning_llama.tokenizer import get_tokenizer
from reasoning_llama.training import loss as loss_module
from reasoning_llama.training.loss import fused_batch_loss_sum, linear_cross_entropy

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


def test_no_loss_tokens_gives_zero_and_zero_gradients():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(weight.grad) == 0


def test_fused_batch_loss_matches_the_model_logits_path(tiny_config):
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
    batch = next(iter(BatchLoader(split, seq_len=64, batch_size=2, packing=True, seed=0)))
    model = Transformer(tiny_config)
    fused = fused_batch_loss_sum(model, batch)
    plain = batch_loss_sum(model, batch)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert isinstance(model.head, torch.nn.Linear)  # the head is back in place
