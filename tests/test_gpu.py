"""The CUDA paths where a GPU is present (skipped elsewhere). Training: no host sync inside a step, and
FlexAttention and the compiled layers against the eager dense-mask path, gradients included.
Decoding: the CUDA-graph decode step against `decode` and the eager engine, without host syncs or
recompilation, and bf16 through `Engine.from_checkpoint`."""

from __future__ import annotations

import math

import pytest
import torch

from reasoning_llama.config import ModelConfig
from reasoning_llama.cpu_layout import FusedLinear, prepare_for_gpu_decode
from reasoning_llama.decoding import StaticDecodeStep
from reasoning_llama.generation import Engine
from reasoning_llama.loss import ModelWithLoss, batch_loss
from reasoning_llama.model import KVCache, Transformer
from reasoning_llama.model_files import save_model
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import EOT, IM_END, get_tokenizer
from reasoning_llama.training.loop import Trainer
from test_loss import packed_batch
from test_training_loop import tiny_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from nothing: the compiled decode step is one function for every engine of a
    process, whose cache entries (one per layout, dtype and device) would otherwise add up across
    tests to dynamo's recompile limit, an error under fullgraph=True."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.mark.parametrize("attention", ["auto", "varlen"])
def test_a_training_step_never_waits_on_the_host(tmp_path, attention):
    settings = ("train.device=cuda", f"train.attention={attention}")
    trainer = Trainer(tiny_run(tmp_path, *settings), tmp_path / "run", progress=False)
    expected = "flex" if attention == "auto" else attention
    assert trainer.compiled and trainer.loss_model.attention == expected
    assert not trainer.loss_model.select_positions
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


def against_the_dense_path(attention: str, compiled: bool, amp_dtype: torch.dtype | None = None) -> list:
    """(loss, gradients) of the dense-mask path and of `attention` (its layers compiled or not), from
    the same weights on the same packed rows."""
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256)
    batch = packed_batch(seq_len=256).to("cuda")
    reference = Transformer(config).cuda()
    model = Transformer(config).cuda()
    model.load_state_dict(reference.state_dict())
    if compiled:
        for layer in model.layers:
            layer.compile(dynamic=False)
    results = []
    for m, kind in ((reference, "sdpa"), (model, attention)):
        loss_model = ModelWithLoss(
            m, select_positions=False, attention=kind, segments_per_row=4, amp_dtype=amp_dtype
        )
        with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = batch_loss(loss_model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    return results


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_and_compiled_layers_match_the_dense_path_with_gradients(compiled):
    (loss, grads), (flex_loss, flex_grads) = against_the_dense_path("flex", compiled)
    torch.testing.assert_close(flex_loss, loss, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("compiled", [False, True])
def test_varlen_attention_matches_the_dense_path_in_bf16_with_gradients(compiled):
    """Flash attention's variable-length kernel takes bf16 only: both sides under bf16 autocast, so
    they agree to bf16 rounding (the layout itself is checked exactly on CPU, tests/test_model.py)."""
    (loss, grads), (varlen_loss, varlen_grads) = against_the_dense_path("varlen", compiled, torch.bfloat16)
    torch.testing.assert_close(varlen_loss, loss, rtol=2e-2, atol=1e-2)
    for name, grad in grads.items():
        error = (varlen_grads[name] - grad).norm() / grad.norm()
        assert error < 3e-2, (name, float(error))


# -- decoding ------------------------------------------------------------------------------

DECODE_TEXTS = ["What is 2 + 3?", "hi", "Tell me a long story about dragons.", "Sort 3 1 2.", "Why?"]
DECODE_CONFIG = ModelConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256, final_block=False, init_std=0.1
)


def no_ends(request, logits):
    """Keep raw continuations going for all their tokens."""
    logits[[IM_END, EOT]] = -math.inf


def decode_model(device: str = "cuda") -> Transformer:
    """fp32 on the GPU, so graph and eager runs must agree to rounding, not to bf16's luck."""
    torch.manual_seed(0)
    return Transformer(DECODE_CONFIG).to(device).eval()


@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_decode_step_gives_the_logits_of_decode(compiled):
    from test_decoding import run_against_decode

    run_against_decode(
        decode_model(),
        lambda m, c: StaticDecodeStep(m, c, cuda_graphs=True, compile=compiled),
        tolerance=1e-3,
    )


def test_a_graph_decode_step_never_waits_on_the_host():
    model = decode_model()
    step = StaticDecodeStep(model, KVCache(DECODE_CONFIG, 4, device="cuda"), cuda_graphs=True)
    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = step([5, 6, 7, 8], [0, 0, 0, 0], [0, 1, 2, 3])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (4, DECODE_CONFIG.vocab_size)


def test_graph_engine_gives_the_eager_engines_tokens_and_never_recompiles():
    """64 tokens, batch 1 and a continuous batch of mixed prompt lengths (requests joining and
    leaving, so the padded size changes), with torch.compile forbidden to compile again; the graphs
    run the fused projections, the eager engine the plain model."""
    model, fused = decode_model(), decode_model()
    prepare_for_gpu_decode(fused)  # as Engine.from_checkpoint does
    tokenizer = get_tokenizer()
    prompts = [tokenizer.render_prompt([{"role": "user", "content": t}]) for t in DECODE_TEXTS]
    params = [SamplingParams(max_new_tokens=n, raw=True) for n in (64, 20, 64, 40, 64)]
    eager = Engine(model, tokenizer, max_batch_size=4, logits_hook=no_ends)
    graphed = Engine(fused, tokenizer, max_batch_size=4, compile=True, cuda_graphs=True, logits_hook=no_ends)
    alone = [eager.generate(p, q).token_ids for p, q in zip(prompts, params, strict=True)]
    with torch.compiler.set_stance("fail_on_recompile"):
        assert [graphed.generate(p, q).token_ids for p, q in zip(prompts, params, strict=True)] == alone
        assert [r.token_ids for r in graphed.generate_batch(prompts, params)] == alone
    assert [len(ids) for ids in alone] == [64, 20, 64, 40, 64]


def assert_graph_engine_runs_ahead_as_eager(
    params: list[SamplingParams], *, head_scale: float = 1.0, device: str = "cuda"
) -> None:
    """The CUDA-graph engine (compiled, fused projections) gives the eager engine's results for
    DECODE_TEXTS, batch 1 and a continuous batch (five requests, four slots), with no recompilation,
    and most steps were launched before the host read the one before."""
    from test_generation import summary

    model, fused = decode_model(device), decode_model(device)
    for m in (model, fused):
        with torch.no_grad():
            m.head.weight.mul_(head_scale)
    prepare_for_gpu_decode(fused)
    tokenizer = get_tokenizer()
    prompts = [tokenizer.render_prompt([{"role": "user", "content": t}]) for t in DECODE_TEXTS]
    eager = Engine(model, tokenizer, max_batch_size=4)
    graphed = Engine(fused, tokenizer, max_batch_size=4, compile=True, cuda_graphs=True)
    alone = [summary(eager.generate(p, q)) for p, q in zip(prompts, params, strict=True)]
    with torch.compiler.set_stance("fail_on_recompile"):
        assert [summary(graphed.generate(p, q)) for p, q in zip(prompts, params, strict=True)] == alone
        assert [summary(r) for r in graphed.generate_batch(prompts, params)] == alone
    counts = graphed.decode_step.counts
    assert counts["used_ahead"] > 2 * counts["launched"] > 0


# Greedy chat requests whose reasoning budgets force <|im_end|> and the header mid-run.
GREEDY_WITH_BUDGETS = [
    SamplingParams(max_new_tokens=n, reasoning_budget=b)
    for n, b in ((64, 10), (20, None), (64, 30), (40, 5), (48, None))
]


def test_graph_engine_runs_greedy_steps_ahead_and_gives_the_eager_engines_results():
    """No hook: greedy requests take the graph's own pick, the next step launched before the host
    reads it."""
    assert_graph_engine_runs_ahead_as_eager(GREEDY_WITH_BUDGETS)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graph_engine_on_a_gpu_that_is_not_the_current_one():
    """Streams, events and graph captures follow the engine's device, not the current one."""
    assert torch.cuda.current_device() == 0
    assert_graph_engine_runs_ahead_as_eager(GREEDY_WITH_BUDGETS, device="cuda:1")


def test_graph_engine_samples_in_the_graph_and_gives_the_eager_engines_results():
    """Seeded requests at temperatures (greedy ones among them) take the graph's own pick, drawn
    with the uniform numbers the host drew from each request's generator, and run ahead. The head
    is scaled up so that a draw does not hinge on the logits' last bits (see test_generation's
    `peaked_model`)."""
    assert_graph_engine_runs_ahead_as_eager(
        [
            SamplingParams(max_new_tokens=n, temperature=t, seed=i, reasoning_budget=b)
            for i, (n, t, b) in enumerate(
                ((64, 1.0, 10), (20, 0.0, None), (64, 0.7, 30), (40, 1.3, 5), (48, 1.0, None))
            )
        ],
        head_scale=8,
    )


def test_from_checkpoint_on_cuda_decodes_bf16_through_graphs(tmp_path):
    save_model(tmp_path / "ckpt", decode_model().cpu())
    engine = Engine.from_checkpoint(tmp_path / "ckpt", device="cuda", max_batch_size=2)
    assert engine.cache.keys[0].dtype == torch.bfloat16
    assert isinstance(engine.decode_step, StaticDecodeStep) and engine.decode_step.graphs
    assert isinstance(engine.model.layers[0].attn.qkv_proj, FusedLinear)
    prompt = get_tokenizer().render_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    results = engine.generate_batch([prompt, prompt[:-3]], SamplingParams(max_new_tokens=16))
    assert all(r.completion_tokens >= 1 and r.finish_reason in ("stop", "length") for r in results)
