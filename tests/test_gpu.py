"""The CUDA training path where a GPU is present (skipped elsewhere): no host sync inside a step, and
FlexAttention and the compiled layers against the eager dense-mask path, gradients included."""

from __future__ import annotations

import pytest
import torch

from reasoning_llama.config import ModelConfig
from reasoning_llama.loss import ModelWithLoss, batch_loss
from reasoning_llama.model import Transformer
from reasoning_llama.training.loop import Trainer
from test_loss import packed_batch
from test_training_loop import tiny_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_training_step_never_waits_on_the_host(tmp_path):
    trainer = Trainer(tiny_run(tmp_path, "train.device=cuda"), tmp_path / "run", progress=False)
    assert trainer.compiled and trainer.loss_model.flex and not trainer.loss_model.select_positions
    batches = iter(trainer.train_loader)
    trainer.step([next(batches).pin_memory() for _ in range(trainer.accum)], 1e-3)  # compiles
    micro = [next(batches).pin_memory() for _ in range(trainer.accum)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(micro, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.close()


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_and_compiled_layers_match_the_dense_path_with_gradients(compiled):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256)
    batch = packed_batch(seq_len=256).to("cuda")
    reference = Transformer(config).cuda()
    model = Transformer(config).cuda()
    model.load_state_dict(reference.state_dict())
    if compiled:
        for layer in model.layers:
            layer.compile(dynamic=False)
    results = []
    for m, flex in ((reference, False), (model, True)):
        loss = batch_loss(ModelWithLoss(m, select_positions=False, flex=flex), batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
