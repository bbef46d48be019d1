"""The engine on tiny random-weight models: cache parity, HF parity, turn structure, streaming, batching."""

import dataclasses
import math
import threading

import pytest
import torch

from reasoning_llama.aot_step import AOTDecodeStep
from reasoning_llama.config import ModelConfig
from reasoning_llama.decoding import StaticDecodeStep
from reasoning_llama.errors import ConfigError, RequestError
from reasoning_llama.generation import Delta, Engine, GenerationResult, decode, prefill
from reasoning_llama.model import KVCache, Transformer
from reasoning_llama.model_files import save_model
from reasoning_llama.sampling import SamplingParams, apply_repetition_penalty
from reasoning_llama.tokenizer import (
    ASSISTANT,
    ASSISTANT_HEADER,
    EOT,
    IM_END,
    IM_START,
    PAD,
    REASONING,
    USER,
    Turn,
    get_tokenizer,
)

# final_block off: the model is then exactly a LlamaForCausalLM. A larger init spreads the
# logits so greedy choices are not decided by rounding.
CONFIG = ModelConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256, final_block=False, init_std=0.1
)
TEXTS = ["What is 2 + 3?", "hi", "Tell me a long story about dragons and their gold, please."]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.render_prompt([{"role": "user", "content": t}]) for t in TEXTS]


def force(logits: torch.Tensor, token: int) -> torch.Tensor:
    forced = torch.full_like(logits, -math.inf)
    forced[token] = 0.0
    return forced


def script(reasoning: list[int], answer: list[int]):
    """A logits hook that makes the model say exactly `reasoning`, then `answer`, each closed by <|im_end|>."""

    def hook(request, logits):
        if request.phase == "reasoning":
            i = request.reasoning_tokens
            return force(logits, reasoning[i] if i < len(reasoning) else IM_END)
        i = len(request.output_ids) - request.reasoning_tokens - 1 - len(ASSISTANT_HEADER)
        return force(logits, answer[i] if i < len(answer) else IM_END)

    return hook


def script_raw(text: list[int], end: int = EOT):
    """A logits hook that makes a raw continuation say exactly `text`, then `end`."""

    def hook(request, logits):
        i = len(request.output_ids)
        return force(logits, text[i] if i < len(text) else end)

    return hook


def run_stream(engine, prompt, params, cancel_after=None):
    """Collect a stream's deltas by kind and its result; optionally cancel after that many deltas."""
    cancel = threading.Event()
    texts = {"reasoning": [], "answer": []}
    result = None
    for n, item in enumerate(engine.stream(prompt, params, cancel=cancel)):
        if isinstance(item, Delta):
            assert item.text  # no empty deltas
            texts[item.kind].append(item.text)
        else:
            result = item
        if cancel_after is not None and n + 1 >= cancel_after:
            cancel.set()
    return texts, result


# -- the two model calls ------------------------------------------------------------------


@pytest.mark.parametrize("final_block", [False, True])
def test_cached_decode_matches_full_recompute_batched(final_block):
    config = dataclasses.replace(CONFIG, final_block=final_block)
    torch.manual_seed(1)
    model = Transformer(config).eval()
    sequences = [[5, 17, 300, 2, 9, 44, 1000, 8], [7, 8, 9]]  # different lengths share one prefill
    cache = KVCache(config, 3)  # a spare row: decode then works on a view of the first rows
    with torch.inference_mode():
        logits = prefill(model, cache, sequences, rows=[0, 1])
        for _ in range(12):
            expected = torch.stack([model(torch.tensor([s]))[0, -1] for s in sequences])
            assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
            chosen = logits.argmax(-1).tolist()
            for seq, token in zip(sequences, chosen, strict=True):
                seq.append(token)
            positions = torch.tensor([len(s) - 1 for s in sequences])
            logits = decode(model, cache, torch.tensor(chosen), positions)


def test_cached_decode_matches_full_recompute_single_beside_an_idle_row(model):
    sequence = [50, 60, 70, 80, 90]
    cache = KVCache(CONFIG, 2)
    with torch.inference_mode():
        logits = prefill(model, cache, [sequence], rows=[1])
        for _ in range(10):
            expected = model(torch.tensor([sequence]))[0, -1]
            assert torch.allclose(logits[0], expected, atol=1e-4)
            sequence.append(int(logits[0].argmax()))
            # Row 0 idles on a PAD at slot 0; only row 1's logits come back.
            tokens = torch.tensor([PAD, sequence[-1]])
            positions = torch.tensor([0, len(sequence) - 1])
            logits = decode(model, cache, tokens, positions, active=torch.tensor([1]))
            assert logits.shape == (1, CONFIG.vocab_size)


# -- greedy parity with transformers --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["plain", "transposed", "onednn"])
def test_greedy_matches_transformers_generate_token_for_token(model, prompts, layout, torch_threads):
    from transformers import LlamaConfig, LlamaForCausalLM

    from reasoning_llama.cpu_layout import onednn_linear_works, prepare_for_cpu_decode
    from reasoning_llama.interop.names import to_hf_config, to_hf_state_dict

    if layout == "onednn" and not onednn_linear_works():
        pytest.skip("this torch build has no oneDNN linear")

    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(CONFIG))).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict()))
    # Keep both from closing the turn so the comparison runs all 64 tokens of raw decoding.
    banned = [EOT, IM_START, IM_END, USER, REASONING, ASSISTANT, PAD]

    def no_im_end(request, logits):
        logits[IM_END] = -math.inf

    ours = Transformer(CONFIG).eval()
    ours.load_state_dict(model.state_dict())
    if layout != "plain":  # the layouts Engine.from_checkpoint picks on a CPU by thread count
        torch_threads(2 if layout == "onednn" else 1)
        assert prepare_for_cpu_decode(ours) == layout
    engine = Engine(ours, get_tokenizer(), logits_hook=no_im_end)
    for prompt in prompts[:2]:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=64,
                do_sample=False,
                suppress_tokens=banned,
                eos_token_id=None,
                pad_token_id=PAD,
            )
        expected = out[0, len(prompt) :].tolist()
        result = engine.generate(prompt, SamplingParams(max_new_tokens=64))
        assert len(expected) == 64
        assert result.token_ids == expected
        assert result.finish_reason == "length"


def greedy_by_recompute(model, prompt, n, banned):
    """The plain model's greedy continuation: the whole sequence through the model for every token."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            logits[banned] = -math.inf
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("threads", [1, 2])  # the transposed and the oneDNN layout (cpu_layout.py)
def test_the_engines_cpu_decoding_gives_the_plain_models_greedy_tokens(
    model, prompts, tmp_path, torch_threads, threads
):
    """64 tokens of raw continuation: batch 1, and a continuous batch of mixed prompt lengths with
    two slots, so requests join and leave while others decode."""
    banned = [IM_START, USER, REASONING, ASSISTANT, PAD, IM_END, EOT]
    expected = [greedy_by_recompute(model, p, 64, banned) for p in prompts]
    torch_threads(threads)
    engine = Engine.from_checkpoint(save_model(tmp_path / "ckpt", model), device="cpu", max_batch_size=2)
    engine.logits_hook = lambda request, logits: logits.index_fill_(0, torch.tensor([IM_END, EOT]), -math.inf)
    alone = [engine.generate(p, SamplingParams(max_new_tokens=64, raw=True)).token_ids for p in prompts]
    assert alone == expected
    lengths = (64, 30, 64)
    batched = engine.generate_batch(prompts, [SamplingParams(max_new_tokens=n, raw=True) for n in lengths])
    assert [r.token_ids for r in batched] == [e[:n] for e, n in zip(expected, lengths, strict=True)]


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_eager_engines_tokens(model, prompts, tmp_path, torch_threads):
    torch_threads(2)
    checkpoint = save_model(tmp_path / "ckpt", model)
    eager = Engine.from_checkpoint(checkpoint, device="cpu", max_batch_size=2)
    compiled = Engine.from_checkpoint(checkpoint, device="cpu", max_batch_size=2, compile=True)
    assert isinstance(compiled.decode_step, AOTDecodeStep)  # on a CPU, compiled ahead of time
    params = [SamplingParams(max_new_tokens=n) for n in (40, 20, 40)]
    expected = [r.token_ids for r in eager.generate_batch(prompts, params)]
    assert [r.token_ids for r in compiled.generate_batch(prompts, params)] == expected


def static_step_engine(model, tokenizer, *, max_batch_size: int = 4) -> Engine:
    """An engine on the decode step a GPU replays from CUDA graphs (decoding.StaticDecodeStep), here
    run eagerly on a CPU (compiled: test_decoding.py): greedy requests take its in-step pick and run ahead."""
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size)
    engine.decode_step = StaticDecodeStep(engine.model, engine.cache, cuda_graphs=False, compile=False)
    return engine


def summary(result: GenerationResult) -> tuple:
    return result.token_ids, result.reasoning, result.answer, result.finish_reason, result.well_formed


def test_greedy_requests_running_ahead_get_the_engines_tokens(model, tokenizer, prompts):
    """Budgets force <|im_end|> and the header mid-run, lengths differ, requests join (five for
    four slots, then one joining a running batch): every result is the default engine's, and most
    steps were run ahead while the host read the one before."""
    more = [*prompts, tokenizer.render_prompt([{"role": "user", "content": "Sort 3 1 2."}]), prompts[1][:-3]]
    params = [
        SamplingParams(max_new_tokens=n, reasoning_budget=b)
        for n, b in ((64, 10), (20, None), (64, 30), (40, 5), (48, None))
    ]
    plain = Engine(model, tokenizer, max_batch_size=4)
    expected = [summary(plain.generate(p, q)) for p, q in zip(more, params, strict=True)]
    engine = static_step_engine(model, tokenizer)
    assert [summary(engine.generate(p, q)) for p, q in zip(more, params, strict=True)] == expected
    assert [summary(r) for r in engine.generate_batch(more, params)] == expected
    first = engine.add_request(more[0], params[0])
    for _ in range(6):
        engine.step()
    assert engine.decode_step.ahead is not None
    joining = engine.add_request(more[2], params[2])
    while engine.has_work():
        engine.step()
    assert [summary(first.result), summary(joining.result)] == [expected[0], expected[2]]
    counts = engine.decode_step.counts
    assert counts["used_ahead"] > 2 * counts["launched"] > 0


@pytest.fixture(scope="module")
def peaked_model(model):
    """`model` with its head scaled up: distributions peaked enough that a sample does not hinge on
    the logits' last bits (which the static step, attending over the whole cache, sums in another
    order); the random model's are near-uniform over 50k ids, where any rounding moves a draw."""
    peaked = Transformer(CONFIG).eval()
    peaked.load_state_dict(model.state_dict())
    with torch.no_grad():
        peaked.head.weight.mul_(8)
    return peaked


def test_sampled_requests_running_ahead_get_the_engines_tokens(peaked_model, tokenizer, prompts):
    """Seeded requests at temperatures, with greedy ones among them, take the step's own pick and
    run ahead: every result is the default engine's (each token drawn with the same number of its
    request's generator), alone and batched. A request with top-k joining sends the batch back to
    the host's sampler until it ends, without changing anyone's tokens."""
    model = peaked_model
    params = [
        SamplingParams(max_new_tokens=40, temperature=0.9, seed=1, reasoning_budget=12),
        SamplingParams(max_new_tokens=24),
        SamplingParams(max_new_tokens=32, temperature=1.4, seed=2),
        SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, seed=3),
    ]
    more = [*prompts, prompts[0][:-2]]
    plain = Engine(model, tokenizer, max_batch_size=4)
    expected = [summary(plain.generate(p, q)) for p, q in zip(more, params, strict=True)]
    engine = static_step_engine(model, tokenizer)
    assert [summary(engine.generate(p, q)) for p, q in zip(more[:3], params[:3], strict=True)] == expected[:3]
    counts = engine.decode_step.counts
    assert counts["used_ahead"] > 2 * counts["launched"] > 0
    assert [summary(r) for r in engine.generate_batch(more, params)] == expected
    again = [summary(r) for r in plain.generate_batch(more, [dataclasses.replace(q, seed=9) for q in params])]
    assert again[0] != expected[0]  # the seed decides: these are samples, not argmaxes


def test_greedy_steps_run_ahead_while_requests_wait_for_a_slot(model, tokenizer, prompts):
    """Six requests for two slots: while the queue holds requests, steps still run ahead, except
    the step before a request reaches its length (another then joins, which a step run ahead
    could not have known)."""
    engine = static_step_engine(model, tokenizer, max_batch_size=2)
    params = [SamplingParams(max_new_tokens=n, raw=True) for n in (12, 20, 12, 16, 20, 12)]
    requests = [engine.add_request(prompts[i % 3], p) for i, p in enumerate(params)]
    for _ in range(6):
        engine.step()
    assert engine.num_waiting == 4 and engine.decode_step.counts["used_ahead"] >= 4
    while engine.has_work():
        engine.step()
    plain = Engine(model, tokenizer, max_batch_size=2)
    expected = [summary(r) for r in plain.generate_batch([prompts[i % 3] for i in range(6)], params)]
    assert [summary(r.result) for r in requests] == expected
    counts = engine.decode_step.counts
    assert counts["ran_ahead"] == counts["used_ahead"]  # none in vain: every join was foreseen


def test_greedy_running_ahead_on_a_trained_model_ends_turns_as_the_engine_does(trained_quickstart, tokenizer):
    """A model that closes its reasoning and ends its answers itself (the quickstart's, trained):
    the same results from the step's own greedy pick, running ahead, as from the default engine."""
    from reasoning_llama.evaluation import synthetic_test_rows
    from reasoning_llama.model_files import load_model

    rows = synthetic_test_rows(["chain_sum", "sort_digits", "max_digit"], 4, seed=5)
    prompts = [tokenizer.render_prompt([{"role": "user", "content": r["user"]}]) for r in rows]
    model = load_model(trained_quickstart)
    params = SamplingParams(max_new_tokens=200)
    expected = [
        summary(r) for r in Engine(model, tokenizer, max_batch_size=4).generate_batch(prompts, params)
    ]
    assert sum(well_formed for *_, well_formed in expected) >= 6  # turns the model ended itself
    engine = static_step_engine(model, tokenizer)
    assert [summary(r) for r in engine.generate_batch(prompts, params)] == expected
    assert engine.decode_step.counts["used_ahead"] > 0


# -- batching -----------------------------------------------------------------------------


def test_batched_generation_equals_each_alone(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=24)
    engine = Engine(model, tokenizer, max_batch_size=4)
    alone = [engine.generate(p, params) for p in prompts]
    batched = engine.generate_batch(prompts, params)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [(r.reasoning, r.answer) for r in batched] == [(r.reasoning, r.answer) for r in alone]
    assert [r.prompt_tokens for r in batched] == [len(p) for p in prompts]


def test_generate_batch_survives_steps_without_events(model, tokenizer, prompts):
    """Forced header tokens and held-back bytes give a request an empty event list in a step."""
    tok = tokenizer
    emoji = tok.encode("😀")  # several byte-level tokens: nothing is emitted until the last one
    engine = Engine(model, tok, max_batch_size=2, logits_hook=script(emoji, emoji))
    results = engine.generate_batch(prompts, SamplingParams(max_new_tokens=32))
    assert [(r.reasoning, r.answer, r.finish_reason) for r in results] == [("😀", "😀", "stop")] * len(
        prompts
    )


def test_continuous_batching_admits_requests_while_others_run(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, max_batch_size=2)
    lengths = [30, 20, 16]
    alone = [
        engine.generate(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths, strict=True)
    ]
    first = engine.add_request(prompts[0], SamplingParams(max_new_tokens=lengths[0]))
    for _ in range(5):
        engine.step()
    later = [
        engine.add_request(p, SamplingParams(max_new_tokens=n))
        for p, n in zip(prompts[1:], lengths[1:], strict=True)
    ]
    assert (engine.num_active, engine.num_waiting) == (1, 2)
    engine.step()
    assert (engine.num_active, engine.num_waiting) == (2, 1)  # one slot free only after a finish
    while engine.has_work():
        engine.step()
    results = [r.result for r in [first, *later]]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]


def test_more_requests_than_slots(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, max_batch_size=1)
    params = [SamplingParams(max_new_tokens=n) for n in (9, 5, 7)]
    results = engine.generate_batch(prompts, params, progress=False)
    assert [r.completion_tokens for r in results] == [9, 5, 7]
    assert not engine.has_work()


def test_cancel_finishes_the_request_and_frees_its_slot(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, max_batch_size=1)
    running = engine.add_request(prompts[0], SamplingParams(max_new_tokens=100))
    for _ in range(3):
        engine.step()
    waiting = engine.add_request(prompts[1], SamplingParams(max_new_tokens=10))
    assert engine.num_waiting == 1
    running.cancel()
    events = dict(engine.step())
    assert running.result.finish_reason == "cancelled"
    assert events[running][-1] is running.result
    assert running.result.completion_tokens == 4  # prefill's token plus three decode steps
    assert engine.num_active == 1 and engine.num_waiting == 0  # the freed slot went to `waiting`
    assert waiting.output_ids
    while engine.has_work():
        engine.step()
    assert (
        waiting.result.token_ids == engine.generate(prompts[1], SamplingParams(max_new_tokens=10)).token_ids
    )


def test_cancel_before_admission(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, max_batch_size=1)
    request = engine.add_request(prompts[0], SamplingParams(max_new_tokens=5))
    request.cancel()
    engine.step()
    assert request.result.finish_reason == "cancelled"
    assert request.result.completion_tokens == 0
    assert not engine.has_work()


# -- turn structure ----------------------------------------------------------------------


def test_early_im_end_gets_the_assistant_header_and_an_answer(model, tokenizer, prompts):
    reasoning, answer = tokenizer.encode("Add them."), tokenizer.encode(" 5")
    engine = Engine(model, tokenizer, logits_hook=script(reasoning, answer))
    result = engine.generate(prompts[0], SamplingParams(max_new_tokens=50))
    assert result.token_ids == [*reasoning, IM_END, *ASSISTANT_HEADER, *answer, IM_END]
    assert (result.reasoning, result.answer, result.finish_reason) == ("Add them.", " 5", "stop")
    assert result.reasoning_tokens == len(reasoning)
    assert result.completion_tokens == len(result.token_ids)
    parsed = tokenizer.parse(result.token_ids)
    assert parsed.well_formed and (parsed.reasoning, parsed.answer) == ("Add them.", " 5")
    assert result.well_formed


def test_answer_may_end_with_endoftext(model, tokenizer, prompts):
    def hook(request, logits):
        if request.phase == "reasoning":
            return force(logits, IM_END)
        return force(logits, EOT if request.output_ids[-1] == 11 else 11)  # "," then <|endoftext|>

    result = Engine(model, tokenizer, logits_hook=hook).generate(
        prompts[0], SamplingParams(max_new_tokens=20)
    )
    assert result.token_ids == [IM_END, *ASSISTANT_HEADER, 11, EOT]
    assert (result.reasoning, result.answer, result.finish_reason) == ("", ",", "stop")
    assert result.well_formed


@pytest.mark.parametrize("budget", [0, 4])
def test_reasoning_budget_closes_the_reasoning(model, tokenizer, prompts, budget):
    def reason_forever(request, logits):
        if request.phase == "reasoning":
            logits[IM_END] = -math.inf

    engine = Engine(model, tokenizer, logits_hook=reason_forever)
    result = engine.generate(prompts[0], SamplingParams(max_new_tokens=20, reasoning_budget=budget))
    assert result.reasoning_tokens == budget
    assert result.token_ids[budget : budget + 5] == [IM_END, *ASSISTANT_HEADER]
    assert result.completion_tokens == 20 and result.finish_reason == "length"
    parsed = tokenizer.parse(result.token_ids)
    assert (parsed.reasoning, parsed.answer) == (result.reasoning, result.answer)
    assert len(result.answer) > 0


def test_max_new_tokens_bounds_reasoning_and_answer_together(model, tokenizer, prompts):
    engine = Engine(
        model, tokenizer, logits_hook=script(tokenizer.encode("a b c d"), tokenizer.encode(" e f g h"))
    )
    result = engine.generate(prompts[0], SamplingParams(max_new_tokens=8))
    assert result.completion_tokens == 8 and result.finish_reason == "length"
    assert result.token_ids[4:8] == [IM_END, *ASSISTANT_HEADER[:3]]  # cut inside the header
    assert (result.reasoning, result.answer) == ("a b c d", "")
    assert not result.well_formed and not tokenizer.parse(result.token_ids).well_formed


def test_special_ids_never_reach_the_text(model, tokenizer, prompts):
    always_banned = [IM_START, USER, REASONING, ASSISTANT, PAD]

    def push_specials(request, logits):
        logits[always_banned] += 1000.0
        if request.phase == "reasoning":
            logits[EOT] += 1000.0  # only <|im_end|> may close the reasoning

    engine = Engine(model, tokenizer, logits_hook=push_specials)
    result = engine.generate(prompts[0], SamplingParams(max_new_tokens=20, reasoning_budget=3))
    ids = result.token_ids
    assert ids[3:8] == [IM_END, *ASSISTANT_HEADER]
    assert all(t < EOT for t in ids[:3] + ids[8:])
    assert tokenizer.parse(ids).reasoning == result.reasoning


# -- stop strings, streaming, UTF-8 ----------------------------------------------------------


def test_stop_string_split_across_tokens_never_leaks(model, tokenizer, prompts):
    st, op = tokenizer.encode("ST"), tokenizer.encode("OP")
    assert len(st) == 1 and len(op) == 1
    answer = tokenizer.encode("The answer is ") + st + op + tokenizer.encode(" hidden")
    engine = Engine(
        model, tokenizer, logits_hook=script(tokenizer.encode("STOP in reasoning is fine"), answer)
    )
    texts, result = run_stream(engine, prompts[0], SamplingParams(max_new_tokens=60, stop=("STOP",)))
    assert result.answer == "The answer is " == "".join(texts["answer"])
    assert not any("S" in t for t in texts["answer"])
    assert result.reasoning == "STOP in reasoning is fine"  # stop strings apply to the answer only
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] == op[0]  # generation ended on the token completing the stop string


def test_held_back_partial_stop_is_emitted_when_it_does_not_complete(model, tokenizer, prompts):
    answer = tokenizer.encode("Be ") + tokenizer.encode("ST") + tokenizer.encode("ay")
    engine = Engine(model, tokenizer, logits_hook=script([], answer))
    texts, result = run_stream(engine, prompts[0], SamplingParams(max_new_tokens=30, stop=("STOP", "xyz")))
    assert "".join(texts["answer"]) == result.answer == "Be STay"
    assert result.finish_reason == "stop"


def test_stop_string_inside_one_token_is_cut(model, tokenizer, prompts):
    answer = tokenizer.encode("one two three")
    engine = Engine(model, tokenizer, logits_hook=script([], answer))
    texts, result = run_stream(engine, prompts[0], SamplingParams(max_new_tokens=30, stop=("wo",)))
    assert result.answer == "".join(texts["answer"]) == "one t"


def test_streaming_is_utf8_safe_for_emoji_and_cjk(model, tokenizer, prompts):
    text = "Emoji 😀🎉 and 你好世界, ünïcödé."
    ids = tokenizer.encode(text)

    def is_partial(token):
        try:
            tokenizer.token_bytes(token).decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True

    assert sum(map(is_partial, ids)) >= 4  # the text really splits characters across tokens
    engine = Engine(model, tokenizer, logits_hook=script(ids, ids))
    texts, result = run_stream(engine, prompts[0], SamplingParams(max_new_tokens=200))
    for kind in ("reasoning", "answer"):
        assert "".join(texts[kind]) == text
        assert not any("\ufffd" in t for t in texts[kind])
    assert (result.reasoning, result.answer) == (text, text)


def test_stream_concatenation_equals_result_and_ends_with_it(model, tokenizer, prompts):
    texts, result = run_stream(Engine(model, tokenizer), prompts[2], SamplingParams(max_new_tokens=30))
    assert isinstance(result, GenerationResult)
    assert "".join(texts["reasoning"]) == result.reasoning
    assert "".join(texts["answer"]) == result.answer
    assert set(result.timings) >= {"prefill_s", "decode_s", "decode_tokens_per_s", "time_to_first_token_s"}


def test_stream_cancel_event_stops_between_tokens(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    texts, result = run_stream(engine, prompts[0], SamplingParams(max_new_tokens=100), cancel_after=3)
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < 10
    assert "".join(texts["reasoning"]) == result.reasoning
    assert not engine.has_work()


def test_interleaved_streams_on_one_engine_each_get_all_their_events(model, tokenizer, prompts):
    """Each stream's step also advances the other: no caller may swallow another's events."""
    engine = Engine(model, tokenizer, max_batch_size=2)
    params = SamplingParams(max_new_tokens=12)
    alone = [engine.generate(p, params) for p in prompts[:2]]
    streams = [engine.stream(p, params) for p in prompts[:2]]
    collected: list[list] = [[], []]
    live = {0, 1}
    while live:
        for i in sorted(live):
            event = next(streams[i], None)
            if event is None:
                live.discard(i)
            else:
                collected[i].append(event)
    for events, reference in zip(collected, alone, strict=True):
        *deltas, result = events
        assert isinstance(result, GenerationResult) and result.token_ids == reference.token_ids
        assert "".join(d.text for d in deltas if d.kind == "reasoning") == reference.reasoning
        assert "".join(d.text for d in deltas if d.kind == "answer") == reference.answer
    assert not engine.has_work()


def test_streams_from_two_threads_on_one_engine(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, max_batch_size=2)
    params = SamplingParams(max_new_tokens=12)
    alone = [engine.generate(p, params) for p in prompts[:2]]
    got: dict[int, tuple] = {}

    def consume(i: int) -> None:
        got[i] = run_stream(engine, prompts[i], params)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, reference in enumerate(alone):
        texts, result = got[i]
        assert result.token_ids == reference.token_ids
        assert ("".join(texts["reasoning"]), "".join(texts["answer"])) == (
            reference.reasoning,
            reference.answer,
        )


def test_abandoned_stream_frees_its_slot(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, max_batch_size=1)
    stream = engine.stream(prompts[0], SamplingParams(max_new_tokens=100))
    next(stream)
    stream.close()
    assert not engine.has_work()


# -- raw mode (plain text continuation) -------------------------------------------------------

RAW = SamplingParams(max_new_tokens=60, raw=True)


@pytest.mark.parametrize("end", [EOT, IM_END])
def test_raw_continuation_is_all_text_and_ends_at_either_end_token(model, tokenizer, end):
    text = "Once upon a time 😀 你好, said the user."  # multi-token characters and a role word
    ids = tokenizer.encode(text)
    engine = Engine(model, tokenizer, logits_hook=script_raw(ids, end))
    texts, result = run_stream(engine, tokenizer.encode("Story:"), RAW)
    assert result.token_ids == [*ids, end]
    assert (result.answer, result.reasoning, result.finish_reason) == (text, "", "stop")
    assert (result.reasoning_tokens, result.completion_tokens) == (0, len(ids) + 1)
    assert texts["reasoning"] == [] and "".join(texts["answer"]) == text  # no header, no reasoning
    assert not any("\ufffd" in t for t in texts["answer"])


def test_raw_stop_string_split_across_tokens_never_leaks(model, tokenizer):
    st, op = tokenizer.encode("ST"), tokenizer.encode("OP")
    ids = tokenizer.encode("The answer is ") + st + op + tokenizer.encode(" hidden")
    engine = Engine(model, tokenizer, logits_hook=script_raw(ids))
    params = dataclasses.replace(RAW, stop=("STOP", "zzz"))
    texts, result = run_stream(engine, tokenizer.encode("Q:"), params)
    assert result.answer == "".join(texts["answer"]) == "The answer is "
    assert not any("S" in t for t in texts["answer"])  # the partial "ST" was held back, then dropped
    assert result.finish_reason == "stop" and result.token_ids[-1] == op[0]
    assert engine.generate(tokenizer.encode("Q:"), params).answer == "The answer is "


def test_raw_max_new_tokens_ends_with_length_and_specials_never_appear(model, tokenizer):
    banned = [IM_START, USER, REASONING, ASSISTANT, PAD]

    def push_specials(request, logits):
        logits[banned] += 1000.0  # never sampled, however likely
        logits[[EOT, IM_END]] = -math.inf  # keep the continuation going to the limit

    engine = Engine(model, tokenizer, logits_hook=push_specials)
    prompt = tokenizer.encode("<|im_start|>assistant\n user reasoning")  # plain text, never specials
    result = engine.generate(prompt, dataclasses.replace(RAW, max_new_tokens=12))
    assert (result.finish_reason, result.completion_tokens) == ("length", 12)
    assert all(t < EOT for t in result.token_ids)
    assert result.answer == tokenizer.decode(result.token_ids) and result.reasoning == ""


def test_raw_rejects_a_reasoning_budget(model, tokenizer):
    engine = Engine(model, tokenizer)
    with pytest.raises(RequestError, match="raw text") as info:
        engine.add_request([1, 2], SamplingParams(raw=True, reasoning_budget=4))
    assert info.value.param == "reasoning_budget"
    assert not engine.has_work()


def test_raw_and_chat_requests_batched_together_equal_each_alone(model, tokenizer, prompts):
    raw_prompts = [tokenizer.encode(t) for t in TEXTS[:2]]
    work = [
        (raw_prompts[0], SamplingParams(max_new_tokens=20, raw=True)),
        (prompts[0], SamplingParams(max_new_tokens=24)),
        (raw_prompts[1], SamplingParams(max_new_tokens=16, raw=True, temperature=1.0, seed=3)),
        (prompts[2], SamplingParams(max_new_tokens=18, reasoning_budget=5)),
    ]
    engine = Engine(model, tokenizer, max_batch_size=4)
    alone = [engine.generate(prompt, params) for prompt, params in work]
    batched = engine.generate_batch([w[0] for w in work], [w[1] for w in work])

    def summary(r):
        return r.token_ids, r.reasoning, r.answer, r.finish_reason, r.reasoning_tokens

    assert [summary(r) for r in batched] == [summary(r) for r in alone]
    for r in (alone[0], alone[2]):
        assert (r.reasoning, r.reasoning_tokens) == ("", 0)
        assert r.answer == tokenizer.decode([t for t in r.token_ids if t < EOT])
    assert alone[1].reasoning and alone[3].reasoning_tokens == 5  # the chat ones kept their turns


# -- sampling through the engine -----------------------------------------------------------


def test_seeded_sampling_reproduces_alone_and_batched(model, tokenizer, prompts):
    engine = Engine(model, tokenizer, max_batch_size=4)
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=200, seed=7)
    first = engine.generate(prompts[0], seeded)
    assert engine.generate(prompts[0], seeded).token_ids == first.token_ids
    others = [
        SamplingParams(max_new_tokens=25),
        seeded,
        SamplingParams(max_new_tokens=15, temperature=1.0, seed=99),
    ]
    batched = engine.generate_batch([prompts[1], prompts[0], prompts[2]], others)
    assert batched[1].token_ids == first.token_ids
    reseeded = engine.generate(prompts[0], dataclasses.replace(seeded, seed=8))
    assert reseeded.token_ids != first.token_ids


def test_repetition_penalty_avoids_every_seen_token(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    plain = engine.generate(prompts[0], SamplingParams(max_new_tokens=40))
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # this random model repeats itself
    penalised = engine.generate(prompts[0], SamplingParams(max_new_tokens=40, repetition_penalty=5.0))
    text_ids = [t for t in penalised.token_ids if t < EOT]
    assert len(set(text_ids)) == len(text_ids)
    assert not set(text_ids) & set(prompts[0])


# -- log-probabilities ------------------------------------------------------------------------


def sampled_positions(token_ids: list[int]) -> list[int]:
    """Positions of the generated ids the model chose (not the engine's forced header)."""
    turn, positions = Turn(), []
    for position, token in enumerate(token_ids):
        if turn.forced is None:
            positions.append(position)
        turn.feed(token)
    return positions


def test_logprobs_are_the_penalised_distribution_before_the_special_mask(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=24, repetition_penalty=1.3, logprobs=5)
    result = engine.generate(prompts[0], params)
    entries = result.logprobs["reasoning"] + result.logprobs["answer"]
    positions = sampled_positions(result.token_ids)
    assert [e.token for e in entries] == [result.token_ids[p] for p in positions]
    with torch.inference_mode():
        logits = model(torch.tensor([prompts[0] + result.token_ids]))[0]
    for entry, position in zip(entries, positions, strict=True):
        seen = torch.tensor(sorted(set(prompts[0] + result.token_ids[:position])))
        row = apply_repetition_penalty(logits[len(prompts[0]) + position - 1], seen, 1.3)
        expected = torch.log_softmax(row, dim=-1)
        assert entry.logprob == pytest.approx(float(expected[entry.token]), abs=1e-4)
        best = torch.topk(expected, 5)
        assert [i for i, _ in entry.top] == best.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # greedy: the chosen id is the best of those the sampler may pick
    assert all(e.logprob >= max(lp for i, lp in e.top if i < EOT) - 1e-5 for e in entries)


def test_logprobs_travel_with_their_text_and_end_ids_come_last(model, tokenizer, prompts):
    text = "Emoji 😀 and 你好 done"
    ids = tokenizer.encode(text)
    engine = Engine(model, tokenizer, logits_hook=script(ids, ids))
    deltas = []
    for event in engine.stream(prompts[0], SamplingParams(max_new_tokens=100, logprobs=2)):
        if isinstance(event, Delta):
            deltas.append(event)
        else:
            result = event
    for kind in ("reasoning", "answer"):
        mine = [d for d in deltas if d.kind == kind]
        carried = [e for d in mine for e in d.logprobs]
        assert carried == result.logprobs[kind]
        assert [e.token for e in carried] == [*ids, IM_END]  # the sampled <|im_end|> closes each part
        assert all(e.logprob == 0.0 and len(e.top) == 2 for e in carried)  # the hook leaves one choice
        assert "".join(d.text for d in mine) == text
        # a delta's ids are those whose bytes begin in its text; the end id comes with no text
        for delta in mine[:-1]:
            assert delta.text and delta.logprobs
        assert mine[-1].text == "" and [e.token for e in mine[-1].logprobs] == [IM_END]


def test_logprobs_of_ids_cut_by_a_stop_string_are_dropped(model, tokenizer, prompts):
    kept = tokenizer.encode("The answer is ")
    answer = kept + tokenizer.encode("ST") + tokenizer.encode("OP") + tokenizer.encode(" hidden")
    engine = Engine(model, tokenizer, logits_hook=script([], answer))
    result = engine.generate(prompts[0], SamplingParams(max_new_tokens=60, stop=("STOP",), logprobs=0))
    assert result.answer == "The answer is "
    assert [e.token for e in result.logprobs["answer"]] == kept
    assert [e.token for e in result.logprobs["reasoning"]] == [IM_END]


def test_without_logprobs_nothing_is_reported(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    events = list(engine.stream(prompts[1], SamplingParams(max_new_tokens=10)))
    assert events[-1].logprobs is None
    assert all(e.text and not e.logprobs for e in events[:-1])


@pytest.mark.parametrize("rows_at_once", [256, 3])  # one slice of positions, or several
def test_prompt_logprobs_are_the_models_next_token_distribution(model, tokenizer, monkeypatch, rows_at_once):
    from reasoning_llama import generation

    monkeypatch.setattr(generation, "PROMPT_SCORE_ROWS", rows_at_once)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    entries = Engine(model, tokenizer).prompt_logprobs(ids, top=3)
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], dim=-1)
    assert [e.token for e in entries] == ids[1:]
    for position, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(expected[position, entry.token]), abs=1e-4)
        assert [i for i, _ in entry.top] == torch.topk(expected[position], 3).indices.tolist()
    assert Engine(model, tokenizer).prompt_logprobs(ids[:1]) == []


# -- bad requests ---------------------------------------------------------------------------


def test_context_overflow_names_both_numbers(model, tokenizer, prompts):
    engine = Engine(model, tokenizer)
    prompt = prompts[2]
    room = CONFIG.max_seq_len - len(prompt)
    engine.check_request(prompt, SamplingParams(max_new_tokens=room))  # exactly full is fine
    with pytest.raises(RequestError) as info:
        engine.add_request(prompt, SamplingParams(max_new_tokens=room + 1))
    assert info.value.code == "context_length_exceeded"
    message = str(info.value)
    assert (
        f"({len(prompt)} tokens)" in message
        and f"({room + 1})" in message
        and str(CONFIG.max_seq_len) in message
    )
    with pytest.raises(RequestError, match=r"the prompt \(1 token\) plus max_new_tokens"):
        engine.add_request(prompt[:1], SamplingParams(max_new_tokens=CONFIG.max_seq_len))
    assert engine.room_for_reply(CONFIG.max_seq_len - 1) == 1
    with pytest.raises(RequestError, match="fills the model's context") as info:
        engine.room_for_reply(CONFIG.max_seq_len, param="messages")
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")
    assert not engine.has_work()


def test_bad_requests_raise_request_errors(model, tokenizer):
    engine = Engine(model, tokenizer)
    with pytest.raises(RequestError, match="empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        engine.generate([1, CONFIG.vocab_size], SamplingParams(max_new_tokens=2))
    with pytest.raises(RequestError) as info:
        engine.generate([1, 2], SamplingParams(top_p=0.0))
    assert info.value.param == "top_p"
    with pytest.raises(RequestError, match="2 prompts but 1"):
        engine.generate_batch([[1], [2]], [SamplingParams()])


def test_engine_refuses_a_model_without_the_chat_ids(tokenizer):
    small = Transformer(dataclasses.replace(CONFIG, vocab_size=1000))
    with pytest.raises(ConfigError, match="vocab_size"):
        Engine(small, tokenizer)


def test_from_checkpoint_generates_like_the_model(model, tokenizer, prompts, tmp_path):
    save_model(tmp_path / "ckpt", model)
    engine = Engine.from_checkpoint(tmp_path / "ckpt", device="cpu", max_batch_size=2)
    params = SamplingParams(max_new_tokens=12)
    assert engine.max_context == CONFIG.max_seq_len
    assert (
        engine.generate(prompts[0], params).token_ids
        == Engine(model, tokenizer).generate(prompts[0], params).token_ids
    )
