"""Many clients at once: continuous batching through the server's one worker thread, the bounded
queue, and cancellation of clients that go away."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from reasoning_llama.sampling import SamplingParams
from reasoning_llama.server import ServerSettings
from reasoning_llama.server.worker import EngineWorker, QueueFull
from reasoning_llama.tokenizer import get_tokenizer
from server_fixtures import MODEL, make_checkpoint, make_engine, scripted_hook, serve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-concurrency") / "tiny-test")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cancelled(server) -> float:
    return metric(server, 'reasoning_llama_generations_total{finish_reason="cancelled"}')


def slow_hook(delay_s: float = 0.02):
    """A long scripted reasoning at `delay_s` a token: time to act mid-generation."""
    return scripted_hook({"": ("word " * 300, "done")}, delay_s=delay_s)


@pytest.mark.slow
def test_sixteen_clients_get_the_answers_each_would_get_alone(checkpoint):
    reference = make_engine(checkpoint)
    engine = make_engine(checkpoint, max_batch_size=4)
    most_active = []
    engine.logits_hook = lambda request, logits: most_active.append(engine.num_active)
    questions = [(f"Question {i}: what comes after {i}?", 8 + 2 * i) for i in range(16)]

    def one(i: int) -> tuple[str, str, str]:
        text, max_tokens = questions[i]
        if i % 2:  # half of the clients stream
            stream = client(server).chat.completions.create(
                model=MODEL, messages=ask(text), max_tokens=max_tokens, stream=True
            )
            reasoning, answer, finish = [], [], None
            for chunk in stream:
                delta = chunk.choices[0].delta
                reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
                answer.append(delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            return "".join(reasoning), "".join(answer), finish
        reply = client(server).chat.completions.create(model=MODEL, messages=ask(text), max_tokens=max_tokens)
        message = reply.choices[0].message
        return message.model_extra["reasoning_content"], message.content, reply.choices[0].finish_reason

    with serve(engine) as server, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
        health = server.wait_idle()
    assert health["active_slots"] == 0 and health["in_flight"] == 0
    for (text, max_tokens), got in zip(questions, results, strict=True):
        ids = get_tokenizer().render_prompt(ask(text))
        expected = reference.generate(ids, SamplingParams(max_new_tokens=max_tokens))
        assert got == (expected.reasoning, expected.answer, expected.finish_reason), text
    assert max(most_active) == 4  # the requests really shared decode steps, all slots in use


def test_a_client_that_disconnects_mid_stream_frees_its_slot(checkpoint):
    with serve(make_engine(checkpoint, logits_hook=slow_hook())) as server:
        body = {"model": MODEL, "messages": ask("Go on and on."), "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # the role chunk and a few deltas
            assert server.health()["active_slots"] == 1
        assert any("reasoning_content" in line for line in received)
        health = server.wait_idle(timeout=20)
        assert (health["active_slots"], health["waiting"], health["in_flight"]) == (0, 0, 0)
        assert cancelled(server) == 1  # stopped, not run to its 200 tokens


def test_a_shutdown_ends_open_streams_with_its_error_and_done(checkpoint):
    """SIGINT or SIGTERM to `serve`: a stream still running a second before uvicorn's grace period
    ends (2 s here) ends with the 503 error event and [DONE], instead of being cut off without a word."""
    with serve(make_engine(checkpoint, logits_hook=slow_hook())) as server:
        body = {"model": MODEL, "messages": ask("Go on and on."), "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert "reasoning_content" in "".join(next(lines) for _ in range(6))
            server.server.handle_exit(signal.SIGTERM, None)  # what the signal calls
            rest = [line.removeprefix("data: ") for line in lines if line]
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["message"] == "the server is shutting down", error
    assert sum("reasoning_content" in line for line in rest) < 100  # not run on to its 200 tokens


def test_during_a_shutdown_requests_running_finish_and_new_ones_are_told_why(checkpoint):
    from reasoning_llama.server import begin_shutdown

    with serve(make_engine(checkpoint, logits_hook=slow_hook(0.01))) as server:
        body = {"model": MODEL, "messages": ask("Briefly."), "max_tokens": 30}
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=30)
            deadline = time.monotonic() + 10
            while server.health()["active_slots"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            begin_shutdown(server.server.config.app, grace_s=20)
            refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
            finished = running.result()
    assert finished.status_code == 200 and finished.json()["choices"][0]["finish_reason"] == "length"
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["message"] == "the server is shutting down"


def test_a_client_that_gives_up_waiting_is_cancelled(checkpoint):
    with serve(make_engine(checkpoint, logits_hook=slow_hook())) as server:
        body = {"model": MODEL, "messages": ask("Take your time."), "max_tokens": 200}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.5)
        health = server.wait_idle(timeout=20)
        assert (health["active_slots"], health["in_flight"]) == (0, 0)
        assert cancelled(server) == 1


def test_a_full_queue_answers_503_with_retry_after(checkpoint):
    settings = ServerSettings(model_name=MODEL, max_queue=1, retry_after_s=3)
    with serve(make_engine(checkpoint, max_batch_size=1, logits_hook=slow_hook()), settings) as server:
        body = {"model": MODEL, "messages": ask("Long one."), "max_tokens": 200, "stream": True}
        url = f"{server.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=30) as running:
            # Keep the line iterators: dropping one closes its connection, which cancels the request.
            running_lines = running.iter_lines()
            next(running_lines)  # headers and the role chunk: it is submitted
            with httpx.stream("POST", url, json=body, timeout=30) as queued:
                queued_lines = queued.iter_lines()
                next(queued_lines)
                health = server.health()
                assert (health["active_slots"], health["waiting"]) == (1, 1)
                with pytest.raises(openai.InternalServerError) as caught:
                    client(server).chat.completions.create(model=MODEL, messages=ask("One more."))
        error = caught.value
        assert error.status_code == 503 and error.response.headers["retry-after"] == "3"
        assert error.code == "server_overloaded" and "capacity" in error.message
        server.wait_idle(timeout=20)
        reply = client(server).chat.completions.create(model=MODEL, messages=ask("Now?"), max_tokens=2)
        assert reply.choices[0].finish_reason == "length"


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(checkpoint):
    script = scripted_hook({"": ("Fine.", "All good.")})

    def hook(request, logits):
        if "[boom]" in get_tokenizer().decode(request.prompt_ids):
            raise RuntimeError("boom")
        return script(request, logits)

    with serve(make_engine(checkpoint, logits_hook=hook)) as server:
        with pytest.raises(openai.InternalServerError) as caught:
            client(server).chat.completions.create(model=MODEL, messages=ask("[boom]"))
        assert caught.value.status_code == 500 and "RuntimeError: boom" in caught.value.message
        body = {"model": MODEL, "messages": ask("[boom]"), "stream": True}
        raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).text
        assert '"error"' in raw and raw.endswith("data: [DONE]\n\n")
        reply = client(server).chat.completions.create(model=MODEL, messages=ask("and now?"))
        assert reply.choices[0].message.content == "All good."
        health = server.wait_idle()
        assert health["status"] == "ok" and "boom" in health["last_error"] and health["in_flight"] == 0


# --- the worker without HTTP ---------------------------------------------------------------------


def test_worker_bounds_its_queue_and_drops_jobs_cancelled_before_admission(checkpoint):
    engine = make_engine(checkpoint, max_batch_size=1)
    worker = EngineWorker(engine, max_queue=1)
    ids = get_tokenizer().render_prompt(ask("hi"))

    async def scenario():
        # Not started yet: submissions pile up, so capacity (1 slot + 1 queued) is exact.
        first = worker.submit(ids, SamplingParams(max_new_tokens=3))
        second = worker.submit(ids, SamplingParams(max_new_tokens=3))
        with pytest.raises(QueueFull):
            worker.submit(ids, SamplingParams(max_new_tokens=3))
        second.cancel()
        worker.start()
        events = [event async for event in first.results()]
        return events

    try:
        events = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        deadline = time.monotonic() + 10
        while worker.outstanding and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.stop()
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 3
    assert worker.outstanding == 0 and not engine.has_work()
    assert not worker.alive
