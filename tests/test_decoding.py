"""The decode steps give `decode`'s logits: the eager step, and the static step (padded batch sizes, the
whole cache) eager and compiled on a CPU. Its CUDA-graph form is tested in test_gpu.py."""

import pytest
import torch

from reasoning_llama.config import ModelConfig
from reasoning_llama.cpu_layout import FusedLinear, prepare_for_gpu_decode
from reasoning_llama.decoding import (
    Draws,
    DynamicDecodeStep,
    StaticDecodeStep,
    decode,
    padded_batch_sizes,
    prefill,
)
from reasoning_llama.model import KVCache, Transformer
from reasoning_llama.tokenizer import PAD

CONFIG = ModelConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128, final_block=False, init_std=0.1
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


def test_padded_batch_sizes_are_powers_of_two_then_the_cache():
    assert padded_batch_sizes(1) == [1]
    assert padded_batch_sizes(8) == [1, 2, 4, 8]
    assert padded_batch_sizes(6) == [1, 2, 4, 6]
    assert padded_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def run_against_decode(model, make_step, *, steps: int = 12, tolerance: float = 1e-4) -> None:
    """Rows 0 and 2 decode (prompts of different lengths), row 1 idles, row 3 is never used; one row
    leaves half-way. Every step's logits must be those of plain `decode` on a cache of its own."""
    device = next(model.parameters()).device
    prompts = {0: [5, 17, 300, 2, 9, 44, 1000], 2: [7, 8, 9]}
    reference_cache, cache = (KVCache(model.config, 4, device=device) for _ in range(2))
    with torch.inference_mode():
        step = make_step(model, cache)
        for c in (reference_cache, cache):
            logits = prefill(model, c, list(prompts.values()), list(prompts))
        sequences = {
            row: [*p, int(t)] for (row, p), t in zip(prompts.items(), logits.argmax(-1), strict=True)
        }
        for n in range(steps):
            if n == steps // 2:
                del sequences[2]  # row 2 finishes: the batch shrinks to row 0 alone
            active = sorted(sequences)
            rows = active[-1] + 1
            tokens, positions = [PAD] * rows, [0] * rows
            for row in active:
                tokens[row], positions[row] = sequences[row][-1], len(sequences[row]) - 1
            as_tensor = torch.tensor
            expected = decode(
                model,
                reference_cache,
                as_tensor(tokens, device=device),
                as_tensor(positions, device=device),
                as_tensor(active, device=device),
            )
            logits = step(tokens, positions, active)
            torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)
            for row, token in zip(active, expected.argmax(-1).tolist(), strict=True):
                sequences[row].append(token)


def test_eager_step_gives_the_logits_of_decode(model):
    run_against_decode(model, DynamicDecodeStep)


def test_static_step_pads_rows_and_attends_over_the_whole_cache(model):
    def make(model, cache):
        step = StaticDecodeStep(model, cache, cuda_graphs=False, compile=False)
        assert step.sizes == [1, 2, 4]
        return step

    run_against_decode(model, make)


@pytest.mark.slow
# The GPU layout with q/k/v and gate/up as one product, and every product of the batch-1 step
# written as a sum (`one_row_as_sum`; its other sizes run the fused products).
@pytest.mark.parametrize("gpu_layout", [False, True])
def test_compiled_static_step_matches_eager_on_a_cpu(model, one_torch_thread, gpu_layout):
    if gpu_layout:
        plain, model = model, Transformer(CONFIG).eval()
        model.load_state_dict(plain.state_dict())
        prepare_for_gpu_decode(model, one_row_as_sum=True)
        assert isinstance(model.head, FusedLinear) and isinstance(model.layers[0].attn.qkv_proj, FusedLinear)
    run_against_decode(model, lambda m, c: StaticDecodeStep(m, c, cuda_graphs=False, compile=True))


def greedy_draws(eot_banned: list[int]) -> Draws:
    draws = Draws.all_greedy(len(eot_banned))
    draws.eot_banned[:] = eot_banned
    return draws


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_static_step_picks_the_masked_greedy_id_and_can_run_ahead(model, compile):
    """`pick` at temperature 0 gives the argmax of the step's logits with the never-sampled ids and
    (where banned) <|endoftext|> masked; run ahead, the next step is already computed on those ids
    (in the compiled step too, which writes them into its inputs), and a call on exactly those
    inputs takes it without launching again."""
    from reasoning_llama.sampling import never_sampled_ids
    from reasoning_llama.tokenizer import EOT

    cache, reference = KVCache(CONFIG, 4), KVCache(CONFIG, 4)
    prompts = {0: [5, 17, 300, 2, 9], 1: [7, 8, 9]}
    with torch.inference_mode():
        step = StaticDecodeStep(model, cache, cuda_graphs=False, compile=compile)
        for c in (cache, reference):
            prefill(model, c, list(prompts.values()), list(prompts))
        tokens, positions = [11, 12], [5, 3]
        for n in range(4):
            banned = [int(n >= 2), 1]
            expected = decode(model, reference, torch.tensor(tokens), torch.tensor(positions))
            expected[:, never_sampled_ids(CONFIG.vocab_size)] = -float("inf")
            expected[torch.tensor(banned, dtype=torch.bool), EOT] = -float("inf")
            launched = step.counts["launched"]
            ids = step.pick(tokens, positions, [0, 1], greedy_draws(banned), may_run_ahead=True)
            assert ids == expected.argmax(-1).tolist()
            # the first call launches, the next finds its step already run; at the third, row 0's
            # ban changes, which means launching again
            assert step.counts["launched"] - launched == (1 if n in (0, 2) else 0)
            assert step.ahead is not None and step.ahead.tokens[:2] == ids
            tokens, positions = ids, [p + 1 for p in positions]
        # Run outside any graph on the buffers as they are (what gpu_profile times), the step
        # writes its next inputs: every live row one position on.
        before = step.inputs.buffer[:2, 1].tolist()
        step.run_uncaptured(2)
        assert step.inputs.buffer[:2, 1].tolist() == [p + 1 for p in before]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_static_step_samples_as_the_host_sampler_does_and_runs_ahead(model, compile):
    """Rows 0 and 2 sampled at their temperatures, row 1 greedy, row 3 idle: each step's picks are
    `pick_rows`' on `decode`'s masked logits with the same uniform numbers, the step run ahead
    (on the next numbers) is taken when those are the numbers asked for, and a changed number
    means launching again."""
    from reasoning_llama.sampling import SamplingParams, mask_unsampled_, never_sampled_ids, pick_rows

    never = torch.tensor(never_sampled_ids(CONFIG.vocab_size))
    params = [SamplingParams(temperature=t) for t in (0.8, 0.0, 1.7)]
    uniforms = torch.rand(8, 3, generator=torch.Generator().manual_seed(1)).tolist()
    cache, reference = KVCache(CONFIG, 4), KVCache(CONFIG, 4)
    prompts = {0: [5, 17, 300, 2, 9], 1: [7, 8, 9], 2: [40, 41]}
    with torch.inference_mode():
        step = StaticDecodeStep(model, cache, cuda_graphs=False, compile=compile)
        for c in (cache, reference):
            prefill(model, c, list(prompts.values()), list(prompts))
        tokens, positions = [11, 12, 13], [5, 3, 2]
        not_argmax = 0  # sampled picks that greedy would not have made
        for n in range(6):
            banned = [1, 0, 1]
            logits = decode(model, reference, torch.tensor(tokens), torch.tensor(positions))
            mask_unsampled_(logits, never, torch.tensor(banned, dtype=torch.bool))
            expected = pick_rows(logits, params, uniforms[n])
            not_argmax += sum(expected[i] != int(logits[i].argmax()) for i in (0, 2))
            # run ahead at step 4 on other numbers than step 5 then asks for: it launches again
            ahead = [0.5, 0.0, 0.5] if n == 4 else uniforms[n + 1]
            draws = Draws(banned, [p.temperature for p in params], uniforms[n], ahead)
            launched = step.counts["launched"]
            ids = step.pick(tokens, positions, [0, 1, 2], draws, may_run_ahead=True)
            assert ids == expected, n
            assert step.counts["launched"] - launched == (1 if n in (0, 5) else 0), n
            tokens, positions = ids, [p + 1 for p in positions]
        assert step.counts["used_ahead"] == 4 and not_argmax > 3


def test_a_prefill_makes_the_step_run_ahead_stale(model):
    """A row refilled with another prompt whose next inputs happen to be those the step ran ahead
    on: after `drop_ahead` (the engine calls it after every prefill) the step runs again on the new
    prompt's cache."""
    cache, reference = KVCache(CONFIG, 1), KVCache(CONFIG, 1)
    with torch.inference_mode():
        step = StaticDecodeStep(model, cache, cuda_graphs=False, compile=False)
        prefill(model, cache, [[5, 17, 300]], [0])
        (first,) = step.pick([2], [3], [0], greedy_draws([0]), may_run_ahead=True)
        other = [40, 41, 42, 43]  # as long as the first prompt and its generated id
        for c in (cache, reference):
            prefill(model, c, [other], [0])
        step.drop_ahead()
        expected = decode(model, reference, torch.tensor([first]), torch.tensor([4]))
        ids = step.pick([first], [4], [0], greedy_draws([0]), may_run_ahead=False)
        assert ids == expected.argmax(-1).tolist()
        assert step.counts["used_ahead"] == 0


def test_a_cache_view_made_in_inference_mode_serves_outside_it(model):
    """`leading_rows` views are made once per row count; one made during an engine step (inference
    mode) must still take writes from a later call with gradients on."""
    cache = KVCache(CONFIG, 4)
    with torch.inference_mode():
        prefill(model, cache, [[1, 2, 3], [4, 5]], [0, 1])
        decode(model, cache, torch.tensor([7, 8]), torch.tensor([3, 2]))
    for mode in (torch.no_grad(), torch.enable_grad()):
        with mode:
            assert decode(model, cache, torch.tensor([9, 10]), torch.tensor([4, 3])).shape == (
                2,
                CONFIG.vocab_size,
            )


@pytest.mark.slow
def test_the_compiled_static_step_compiles_twice_for_all_its_sizes(model, one_torch_thread):
    """The batch dimension is dynamic from the first compilation (the largest size, as captured
    first); size 1 gets its own. After those two, no size compiles again."""
    torch.compiler.reset()
    with torch.inference_mode():
        step = StaticDecodeStep(model, KVCache(CONFIG, 8), cuda_graphs=False, compile=True)
        for rows in (8, 1):
            step([PAD] * rows, [0] * rows, list(range(rows)))
        with torch.compiler.set_stance("fail_on_recompile"):
            for rows in (4, 3, 2, 8, 1):
                step([PAD] * rows, [0] * rows, list(range(rows)))


def test_cuda_graphs_need_a_cuda_cache(model):
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecodeStep(model, KVCache(CONFIG, 2), cuda_graphs=True)


@pytest.mark.slow
def test_compiled_dynamic_step_matches_eager_in_the_onednn_layout(model, torch_threads):
    """torch.compile's step (the engine's on CUDA without graphs; on a CPU it compiles ahead of
    time, test_aot_step.py), here on the layout whose one-row products it writes out."""
    from reasoning_llama.cpu_layout import prepare_for_cpu_decode

    torch_threads(2)
    prepared = Transformer(CONFIG).eval()
    prepared.load_state_dict(model.state_dict())
    prepare_for_cpu_decode(prepared)
    run_against_decode(prepared, lambda m, c: DynamicDecodeStep(m, c, compile=True))
