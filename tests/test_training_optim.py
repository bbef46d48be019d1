"""AdamW groups and the warmup + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from reasoning_llama.config import TrainConfig
from reasoning_llama.model import RMSNorm, Transformer
from reasoning_llama.training.optim import build_optimizer, lr_at, param_groups


def test_no_weight_decay_on_norms_and_embeddings(tiny_config):
    model = Transformer(tiny_config)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    assert norm_params and not norm_params & decayed
    assert id(model.embed.weight) not in decayed
    # Every matrix except the embedding decays: attention, MLP, final block and the (untied) head.
    assert id(model.head.weight) in decayed
    assert {names[i] for i in decayed} == {
        n for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight"
    }
    # Each parameter is in exactly one group.
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_build_optimizer_uses_config_betas_and_groups(tiny_config):
    config = TrainConfig(lr=5e-4, beta1=0.8, beta2=0.9, weight_decay=0.05)
    optimizer = build_optimizer(Transformer(tiny_config), config, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)


def test_schedule_warmup_peak_and_floor():
    args = {"peak": 1e-3, "warmup_steps": 10, "total_steps": 110, "min_lr_ratio": 0.1}
    assert lr_at(0, **args) == pytest.approx(1e-4)  # first warmup step
    assert lr_at(4, **args) == pytest.approx(5e-4)  # linear
    assert lr_at(9, **args) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(10, **args) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **args) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down the cosine
    assert lr_at(110, **args) == pytest.approx(1e-4)  # the floor
    assert lr_at(500, **args) == pytest.approx(1e-4)  # and it stays there
    values = [lr_at(s, **args) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay


def test_schedule_without_warmup_starts_at_peak():
    assert lr_at(0, peak=2e-3, warmup_steps=0, total_steps=100, min_lr_ratio=0.0) == pytest.approx(2e-3)
    assert lr_at(50, peak=2e-3, warmup_steps=0, total_steps=100, min_lr_ratio=0.0) == pytest.approx(1e-3)
    assert math.isclose(
        lr_at(100, peak=2e-3, warmup_steps=0, total_steps=100, min_lr_ratio=0.0), 0.0, abs_tol=1e-12
    )
