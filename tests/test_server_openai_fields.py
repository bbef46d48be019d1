"""The API's logprobs, `n` choices, echo, token prompts and the reasoning's two names, read by the
official `openai` client from a real uvicorn server on loopback; figures are checked against an
engine outside the server (random weights write random text, so nothing else could say what is right)."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from reasoning_llama.sampling import SamplingParams
from reasoning_llama.server import ServerSettings
from reasoning_llama.tokenizer import EOT, IM_END, IM_START, N_VOCAB, ROLE_IDS, get_tokenizer
from server_fixtures import MODEL, make_checkpoint, make_engine, scripted_hook, serve

TOKENIZER = get_tokenizer()
THINK, ANSWER = "Let me think.", "The answer is 42."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-fields") / "tiny-test")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return make_engine(checkpoint)


@pytest.fixture(scope="module")
def greedy(checkpoint):
    with serve(make_engine(checkpoint)) as server:
        yield server


def script(chat_hook, raw_ids: list[int]):
    """Chat requests follow `chat_hook`; raw ones write `raw_ids`, then <|endoftext|>."""

    def hook(request, logits):
        if not request.params.raw:
            return chat_hook(request, logits)
        script = [*raw_ids, EOT]
        forced = torch.full_like(logits, -math.inf)
        forced[script[min(len(request.output_ids), len(script) - 1)]] = 0.0
        return forced

    return hook


@pytest.fixture(scope="module")
def scripted(checkpoint):
    hook = script(scripted_hook({"": (THINK, ANSWER)}), TOKENIZER.encode(THINK))
    with serve(make_engine(checkpoint, logits_hook=hook)) as server:
        yield server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def extra(obj, name: str):
    """A field OpenAI's types do not define: the client keeps it among the extras."""
    return (obj.model_extra or {}).get(name)


def assert_same_logprobs(served, entries, *, top: int) -> None:
    """The client's token logprobs equal the engine's TokenLogprobs (text, figure, alternatives)."""
    assert [t.token for t in served] == [TOKENIZER.decode([e.token]) for e in entries]
    assert [t.logprob for t in served] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    for token, entry in zip(served, entries, strict=True):
        assert len(token.top_logprobs) == top
        assert [t.token for t in token.top_logprobs] == [TOKENIZER.decode([i]) for i, _ in entry.top]
        assert [t.logprob for t in token.top_logprobs] == pytest.approx([lp for _, lp in entry.top], abs=1e-5)


# --- the reasoning under both names ----------------------------------------------------------------


def test_reasoning_arrives_under_both_names_streamed_and_not(scripted):
    message = client(scripted).chat.completions.create(model=MODEL, messages=ask("hi")).choices[0].message
    assert extra(message, "reasoning") == extra(message, "reasoning_content") == THINK
    assert message.content == ANSWER
    stream = client(scripted).chat.completions.create(model=MODEL, messages=ask("hi"), stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(extra(d, "reasoning") or "" for d in deltas) == THINK
    assert "".join(extra(d, "reasoning_content") or "" for d in deltas) == THINK


def test_history_may_carry_reasoning_under_either_name_and_it_is_not_rendered(greedy, reference):
    plain = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    for name in ("reasoning", "reasoning_content"):
        with_reasoning = [plain[0], {**plain[1], name: "2 and 2 make 4."}, plain[2]]
        reply = client(greedy).chat.completions.create(model=MODEL, messages=with_reasoning, max_tokens=12)
        expected = reference.generate(TOKENIZER.render_prompt(plain), SamplingParams(max_new_tokens=12))
        assert extra(reply.choices[0].message, "reasoning") == expected.reasoning
        assert reply.usage.prompt_tokens == len(TOKENIZER.render_prompt(plain))


# --- chat logprobs --------------------------------------------------------------------------------


def test_chat_logprobs_are_the_engines(greedy, reference):
    messages = ask("Tell me about logs.")
    reply = client(greedy).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, logprobs=True, top_logprobs=3
    )
    expected = reference.generate(
        TOKENIZER.render_prompt(messages), SamplingParams(max_new_tokens=16, logprobs=3)
    )
    logprobs = reply.choices[0].logprobs
    reasoning = [openai.types.chat.ChatCompletionTokenLogprob(**t) for t in extra(logprobs, "reasoning")]
    assert_same_logprobs(reasoning, expected.logprobs["reasoning"], top=3)
    assert_same_logprobs(logprobs.content, expected.logprobs["answer"], top=3)
    assert len(reasoning) + len(logprobs.content) == len(expected.token_ids)  # no forced ids: no header
    # greedy: each chosen token is its position's best
    assert all(t.logprob >= t.top_logprobs[0].logprob - 1e-6 for t in reasoning)


def test_chat_logprobs_cover_the_answer_and_its_end_streamed_and_not(scripted):
    reply = client(scripted).chat.completions.create(
        model=MODEL, messages=ask("hi"), logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == ANSWER + "<|im_end|>"
    assert content[-1].bytes is None and all(t.bytes == list(t.token.encode()) for t in content[:-1])
    assert all(t.logprob == 0.0 for t in content)  # the script leaves one choice...
    assert all(t.top_logprobs[1].logprob == -9999.0 for t in content)  # ...the rest: -inf, floored for JSON
    reasoning = extra(reply.choices[0].logprobs, "reasoning")
    assert "".join(t["token"] for t in reasoning) == THINK + "<|im_end|>"

    stream = client(scripted).chat.completions.create(
        model=MODEL, messages=ask("hi"), logprobs=True, top_logprobs=2, stream=True
    )
    streamed = {"content": [], "reasoning": []}
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            lp = chunk.choices[0].logprobs
            streamed["content"] += [t.token for t in lp.content or []]
            streamed["reasoning"] += [t["token"] for t in extra(lp, "reasoning") or []]
    assert streamed["content"] == [t.token for t in content]
    assert streamed["reasoning"] == [t["token"] for t in reasoning]


def test_without_logprobs_there_are_none(scripted):
    reply = client(scripted).chat.completions.create(model=MODEL, messages=ask("hi"))
    assert reply.choices[0].logprobs is None


# --- n choices ------------------------------------------------------------------------------------


def test_n_choices_each_sample_with_a_seed_derived_from_the_requests(greedy, reference):
    messages = ask("Pick words.")
    reply = client(greedy).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=1.0, seed=41, n=3
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    prompt = TOKENIZER.render_prompt(messages)
    expected = [
        reference.generate(prompt, SamplingParams(max_new_tokens=10, temperature=1.0, seed=41 + i))
        for i in range(3)
    ]
    assert [extra(c.message, "reasoning") for c in reply.choices] == [e.reasoning for e in expected]
    assert len({extra(c.message, "reasoning") for c in reply.choices}) == 3
    usage = reply.usage
    assert usage.prompt_tokens == len(prompt)  # counted once, as OpenAI does
    assert usage.completion_tokens == sum(e.completion_tokens for e in expected)
    assert usage.completion_tokens_details.reasoning_tokens == sum(e.reasoning_tokens for e in expected)

    stream = client(greedy).chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=1.0,
        seed=41,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage_chunks = ["", "", ""], {}, []
    for chunk in stream:
        if not chunk.choices:
            usage_chunks.append(chunk.usage)
            continue
        (choice,) = chunk.choices
        texts[choice.index] += extra(choice.delta, "reasoning") or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == [e.reasoning for e in expected]
    assert finishes == {i: e.finish_reason for i, e in enumerate(expected)}
    assert usage_chunks == [usage]


def test_n_completions_and_capacity(checkpoint):
    # 4 slots and no queue: 4 choices fit, 5 never do (a 400, as the schema says).
    settings = ServerSettings(model_name=MODEL, max_queue=0)
    with serve(make_engine(checkpoint, max_batch_size=4), settings) as server:
        reply = client(server).completions.create(model=MODEL, prompt="Once", max_tokens=5, n=4)
        assert len({c.text for c in reply.choices}) == 1  # greedy: four times the same
        assert reply.usage.completion_tokens % 4 == 0
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).completions.create(model=MODEL, prompt="Once", max_tokens=5, n=5)
        assert caught.value.param == "n" and "at most 4 choices" in caught.value.message
        schema = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
        assert schema["CompletionRequest"]["properties"]["n"]["anyOf"][0]["maximum"] == 4
        # several prompts: one choice each, as many as the places
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).completions.create(model=MODEL, prompt=["Once", "Twice"], max_tokens=5, n=2)
        assert caught.value.param == "prompt" and "take n = 1" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).completions.create(model=MODEL, prompt=["Once"] * 5, max_tokens=5)
        assert caught.value.param == "prompt" and "at most 4 choices" in caught.value.message
        assert schema["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["maxItems"] == 4
        assert server.wait_idle()["in_flight"] == 0


# --- completions: logprobs, echo, token prompts -------------------------------------------------------


def test_completion_logprobs_with_echo_score_the_prompt(greedy, reference):
    prompt = "The quick brown fox jumps over"
    ids = TOKENIZER.encode(prompt)
    reply = client(greedy).completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=2, echo=True)
    (choice,) = reply.choices
    expected = reference.generate(ids, SamplingParams(max_new_tokens=4, raw=True, logprobs=2))
    prompt_scores = reference.prompt_logprobs(ids, top=2)
    assert choice.text == prompt + expected.answer
    lp = choice.logprobs
    generated = expected.logprobs["answer"]
    assert lp.tokens == [TOKENIZER.decode([t]) for t in ids] + [
        TOKENIZER.decode([e.token]) for e in generated
    ]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    figures = [e.logprob for e in prompt_scores] + [e.logprob for e in generated]
    assert lp.token_logprobs[1:] == pytest.approx(figures, abs=1e-5)
    for top, entry in zip(lp.top_logprobs[1:], [*prompt_scores, *generated], strict=True):
        assert list(top) == [TOKENIZER.decode([i]) for i, _ in entry.top]
    # text_offset: where each token's text starts in the echoed text
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token
    # the loglikelihood of a continuation, as lm-evaluation-harness reads it
    context = len(TOKENIZER.encode("The quick brown"))
    expected_sum = sum(e.logprob for e in prompt_scores[context - 1 :])
    assert sum(lp.token_logprobs[context : -len(generated)]) == pytest.approx(expected_sum, abs=1e-4)


def test_completion_logprobs_without_echo_and_streamed(greedy):
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 6, "logprobs": 1}
    whole = client(greedy).completions.create(**body).choices[0]
    assert len(whole.logprobs.tokens) == 6 and "".join(whole.logprobs.tokens) == whole.text
    assert whole.logprobs.text_offset[0] == 0
    chunks = list(client(greedy).completions.create(**body, echo=True, stream=True))
    first, *rest = chunks
    assert first.choices[0].text == "Hello there" and first.choices[0].logprobs.token_logprobs[0] is None
    tokens = [t for c in rest if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [t for c in rest if c.choices[0].logprobs for t in c.choices[0].logprobs.text_offset]
    figures = [t for c in rest if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens
    assert figures == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    assert offsets == [len("Hello there") + o for o in whole.logprobs.text_offset]  # after the echo


def test_completion_accepts_token_ids_as_the_prompt(greedy):
    ids = TOKENIZER.encode("Once upon a time")
    as_text = client(greedy).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    for prompt in (ids, [ids]):
        as_ids = client(greedy).completions.create(model=MODEL, prompt=prompt, max_tokens=8, echo=True)
        assert as_ids.choices[0].text == "Once upon a time" + as_text.choices[0].text
        assert as_ids.usage.prompt_tokens == len(ids)
    # ids are not text: a chat id may be given (an end id, as evaluation harnesses send for empty contexts)
    reply = client(greedy).completions.create(
        model=MODEL, prompt=[IM_END, IM_START, ROLE_IDS["user"], *ids], max_tokens=2, echo=True, logprobs=0
    )
    (choice,) = reply.choices
    assert choice.text.startswith("<|im_end|><|im_start|>userOnce")
    for token, offset in zip(choice.logprobs.tokens, choice.logprobs.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token  # special ids by their names too


def test_several_prompts_in_one_request_answer_as_each_alone(greedy):
    """A list of prompts (as lm-evaluation-harness sends with --batch_size): one choice per prompt, in
    order, each the answer that prompt gets alone; streamed the same; the usage counts every prompt."""
    texts = ["Once upon a time", "The quick brown fox"]
    body = {"model": MODEL, "max_tokens": 5, "logprobs": 1, "echo": True}
    alone = [client(greedy).completions.create(prompt=t, **body).choices[0] for t in texts]
    for prompts in (texts, [TOKENIZER.encode(t) for t in texts]):
        reply = client(greedy).completions.create(prompt=prompts, **body)
        assert [c.index for c in reply.choices] == [0, 1]
        for choice, single in zip(reply.choices, alone, strict=True):
            assert choice.text == single.text
            assert choice.logprobs.token_logprobs == pytest.approx(single.logprobs.token_logprobs, abs=1e-5)
        assert reply.usage.prompt_tokens == sum(len(TOKENIZER.encode(t)) for t in texts)
    with pytest.raises(openai.BadRequestError) as caught:  # which prompt does not fit is named
        client(greedy).completions.create(model=MODEL, prompt=[[15496], [15496] * 300], max_tokens=5)
    assert caught.value.body["message"].startswith("prompt 1: the prompt (300 tokens)")
    for prompts, problem in (
        (["Once", ""], "prompt 1: the prompt is empty"),
        ([[15496], []], "prompt 1: the prompt is empty"),
        (["Once", [15496]], "prompt 1: a list of prompts holds texts or lists of token ids, not both"),
        ([[15496], [15496, N_VOCAB]], "prompt 1: token ids must be in"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client(greedy).completions.create(model=MODEL, prompt=prompts, max_tokens=5)
        assert caught.value.param == "prompt" and problem in caught.value.message, caught.value.message
    streamed = {0: "", 1: ""}
    for chunk in client(greedy).completions.create(prompt=texts, stream=True, **body):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == {0: alone[0].text, 1: alone[1].text}


def test_logprobs_of_an_end_id_are_reported_without_text(scripted):
    reply = client(scripted).completions.create(model=MODEL, prompt="Say:", max_tokens=50, logprobs=0)
    (choice,) = reply.choices
    assert choice.text == THINK and choice.finish_reason == "stop"
    assert choice.logprobs.tokens == [TOKENIZER.decode([t]) for t in TOKENIZER.encode(THINK)] + [
        "<|endoftext|>"
    ]
    assert choice.logprobs.top_logprobs == [{}] * len(choice.logprobs.tokens)
    assert choice.logprobs.text_offset[-1] == len(THINK)


# --- values as the schema types them -------------------------------------------------------------


def post(server, route: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, **body}, timeout=60)


def test_integers_are_json_integers(greedy):
    ok = post(greedy, "completions", prompt="Hi", max_tokens=3.0)  # JSON Schema: 3.0 is an integer
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3
    for value in ("3", True, 2.5):
        refused = post(greedy, "completions", prompt="Hi", max_tokens=value)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens", value
    refused = post(greedy, "completions", prompt="Hi", logprobs=False)  # not "0 alternatives"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


def test_any_integer_is_a_seed_taken_modulo_2_to_the_63(greedy):
    def sample(seed: int) -> str:
        body = {"messages": ask("Pick."), "max_tokens": 8, "temperature": 1.0, "seed": seed}
        return post(greedy, "chat/completions", **body).json()["choices"][0]["message"]["reasoning"]

    assert sample(1234) == sample(1234 + 2**63) == sample(1234 - 2**63)


def test_max_tokens_and_max_completion_tokens_both_count(greedy):
    both = {"messages": ask("Go on."), "max_tokens": 3, "max_completion_tokens": 9}
    assert post(greedy, "chat/completions", **both).json()["usage"]["completion_tokens"] == 3  # the smaller
    too_long = post(
        greedy, "chat/completions", messages=ask("Go on."), max_tokens=3, max_completion_tokens=10**6
    )
    error = too_long.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_completion_tokens")


def test_null_is_the_default_for_every_optional_field(greedy):
    """OpenAI's clients send null for options left unset; each means the field's default."""
    api = client(greedy)
    unset = {"n": None, "stream": None, "logprobs": None, "presence_penalty": None, "frequency_penalty": None}
    plain = api.chat.completions.create(model=MODEL, messages=ask("Hi."), max_tokens=6)
    nulls = api.chat.completions.create(model=MODEL, messages=ask("Hi."), max_tokens=6, **unset)
    assert len(nulls.choices) == 1 and nulls.choices[0].logprobs is None
    assert extra(nulls.choices[0].message, "reasoning") == extra(plain.choices[0].message, "reasoning")
    raw = {"prompt": "Hi", "max_tokens": 4}
    echo_null = post(greedy, "completions", **raw, echo=None, n=None, stream=None)
    assert echo_null.status_code == 200
    assert (
        echo_null.json()["choices"][0]["text"]
        == post(greedy, "completions", **raw).json()["choices"][0]["text"]
    )


def test_an_unknown_field_is_named_as_sent(greedy):
    for key, shown in (("max-tokens", '"max-tokens"'), ("", '""'), ("str", "str"), ("top_kk", "top_kk")):
        error = post(greedy, "chat/completions", messages=ask("Hi."), **{key: 1}).json()["error"]
        assert error["param"] == key and error["message"].startswith(
            f"unrecognized request argument: {shown} "
        )
    nested = post(greedy, "chat/completions", messages=[{"role": "user", "content": "Hi.", "x-y": 1}])
    assert nested.json()["error"]["param"] == "messages.0.x-y"


def test_a_lone_surrogate_is_read_as_the_tokenizer_reads_it_in_every_field(greedy):
    """JSON can escape half a UTF-16 pair; like the messages, stop strings and prompts take it as U+FFFD."""
    lone = "\ud800"
    for route, fields in (
        ("chat/completions", {"messages": ask(f"{lone} x"), "stop": lone}),
        ("completions", {"prompt": [lone, "b"]}),
    ):
        body = json.dumps({"model": MODEL, "max_tokens": 3, **fields})  # escapes it as JSON does: \ud800
        sent = httpx.post(
            f"{greedy.url}/v1/{route}", content=body, headers={"Content-Type": "application/json"}
        )
        assert sent.status_code == 200, sent.text


# --- the schema ---------------------------------------------------------------------------------------


def test_the_schema_documents_every_status_and_only_accepted_values(greedy):
    schema = httpx.get(f"{greedy.url}/openapi.json").json()
    paths = schema["paths"]
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "500", "503"}
        assert {"application/json", "text/event-stream"} == set(responses["200"]["content"])
        for status in ("400", "401", "404", "413", "500", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == envelope
        assert "Retry-After" in responses["503"]["headers"]
    assert set(paths["/v1/models/{model_id}"]["get"]["responses"]) == {"200", "401", "404"}
    assert set(paths["/health"]["get"]["responses"]) == {"200", "503"}
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components and "security" not in paths["/v1/models"]["get"]
    assert set(components["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    chat, raw = (
        components["ChatCompletionRequest"]["properties"],
        components["CompletionRequest"]["properties"],
    )
    assert "best_of" not in raw and "reasoning_budget" not in raw
    penalty = chat["frequency_penalty"]["anyOf"][0]  # nullable, as OpenAI's optional fields are
    assert penalty["maximum"] == penalty["minimum"] == 0
    assert chat["function_call"]["anyOf"][0]["const"] == "none"
    assert chat["tools"]["anyOf"][0]["maxItems"] == 0 and chat["logit_bias"]["anyOf"][0]["maxProperties"] == 0
    assert raw["suffix"]["anyOf"][0]["maxLength"] == 0
    assert chat["n"]["anyOf"][0]["maximum"] == 16 and chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert not math.isinf(chat["n"]["anyOf"][0]["maximum"])
