"""`generate` and `chat` through the real command line: subprocesses and a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from subprocess import PIPE

import pexpect
import pytest
import torch

from cli_helpers import run_cli, run_clis
from reasoning_llama.chat import apply_setting
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import RequestError
from reasoning_llama.generation import Engine
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import save_model
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import get_tokenizer
from reasoning_llama.tokenizer.gpt2_ranks import cache_dir as gpt2_cache_dir

# A long context so the chat test can still be generating when it presses Ctrl-C.
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=4096)
QUESTION = "What is 2+2?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli-inference") / "tiny"
    save_model(path, Transformer(CONFIG))
    return path


def expected(checkpoint, params: SamplingParams, system: str | None = None):
    """The same generation, in-process through the engine."""
    engine = Engine.from_checkpoint(checkpoint, device="cpu", max_batch_size=1)
    messages = [{"role": "user", "content": QUESTION}]
    return engine.generate(engine.tokenizer.render_prompt(messages, system=system), params)


# -- generate ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "params", "system"),
    [
        (
            ["--max-new-tokens", "24", "--reasoning-budget", "6"],
            SamplingParams(max_new_tokens=24, reasoning_budget=6),
            None,
        ),
        (
            shlex.split(
                "--max-new-tokens 20 --temperature 1.2 --top-k 40 --top-p 0.9 --min-p 0.01 "
                "--repetition-penalty 1.3 --seed 5 --reasoning-budget 3 --system 'Be brief.'"
            ),
            SamplingParams(
                max_new_tokens=20,
                temperature=1.2,
                top_k=40,
                top_p=0.9,
                min_p=0.01,
                repetition_penalty=1.3,
                seed=5,
                reasoning_budget=3,
            ),
            "Be brief.",
        ),
    ],
)
def test_generate_json_is_the_engine_result(checkpoint, flags, params, system):
    result = run_cli(
        "generate", "--checkpoint", checkpoint, "--prompt", QUESTION, "--device", "cpu", "--json", *flags
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    want = expected(checkpoint, params, system)
    assert (report["reasoning"], report["answer"], report["finish_reason"]) == (
        want.reasoning,
        want.answer,
        want.finish_reason,
    )
    usage = report["usage"]
    assert usage == {
        "prompt_tokens": want.prompt_tokens,
        "completion_tokens": want.completion_tokens,
        "total_tokens": want.prompt_tokens + want.completion_tokens,
        "reasoning_tokens": params.reasoning_budget,
    }
    assert set(report["timings"]) >= {"prefill_s", "decode_s", "decode_tokens_per_s", "time_to_first_token_s"}


@pytest.mark.slow
def test_generate_with_int8_weights_is_the_int8_engines_result(checkpoint):
    flags = ["--max-new-tokens", "16", "--quantize", "int8", "--json"]
    result = run_cli("generate", "--checkpoint", checkpoint, "--prompt", QUESTION, "--device", "cpu", *flags)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    engine = Engine.from_checkpoint(checkpoint, device="cpu", max_batch_size=1, quantize="int8")
    prompt = engine.tokenizer.render_prompt([{"role": "user", "content": QUESTION}])
    want = engine.generate(prompt, SamplingParams(max_new_tokens=16))
    assert (report["reasoning"], report["answer"]) == (want.reasoning, want.answer)


@pytest.mark.slow
def test_generate_with_the_compiled_step_is_the_engines_result(checkpoint):
    flags = ["--max-new-tokens", "16", "--compile", "--json"]
    result = run_cli("generate", "--checkpoint", checkpoint, "--prompt", QUESTION, "--device", "cpu", *flags)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    want = expected(checkpoint, SamplingParams(max_new_tokens=16))
    assert (report["reasoning"], report["answer"]) == (want.reasoning, want.answer)


@pytest.mark.slow
def test_compile_without_a_cpp_compiler_says_so_and_how_to_go_on(checkpoint, tmp_path):
    # A fresh cache (nothing compiled to load), with the GPT-2 files the tokenizer needs.
    shutil.copytree(gpt2_cache_dir(), tmp_path / "gpt2")
    flags = ["--max-new-tokens", "4", "--compile"]
    environment = {"CXX": str(tmp_path / "no-such-compiler"), "REASONING_LLAMA_CACHE": str(tmp_path)}
    args = ("generate", "--checkpoint", checkpoint, "--prompt", QUESTION, "--device", "cpu", *flags)
    result, without = run_clis([args, (*args[:-1], "--no-compile")], env=environment)
    assert result.returncode != 0
    assert "needs a C++ compiler" in result.stderr and "run without --compile" in result.stderr
    assert "Traceback" not in result.stderr
    assert without.returncode == 0, without.stderr


@pytest.mark.slow
def test_generate_streams_reasoning_to_stderr_and_answer_to_stdout(checkpoint):
    result = run_cli(
        "generate",
        "--checkpoint",
        checkpoint,
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        "24",
        "--reasoning-budget",
        "6",
    )
    assert result.returncode == 0, result.stderr
    want = expected(checkpoint, SamplingParams(max_new_tokens=24, reasoning_budget=6))
    assert result.stdout == want.answer + "\n"
    assert result.stderr.startswith("Thinking\n" + want.reasoning + "\n")
    assert "24 tokens (6 reasoning)" in result.stderr


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_closed_stdout_ends_the_command_quietly(checkpoint, command, tmp_path):
    """`reasoning-llama generate ... | head -c 1`: the next write meets a closed pipe; the command
    stops generating and exits with 1 (click's answer to a broken pipe), never aborting inside torch."""
    args = [sys.executable, "-m", "reasoning_llama", command, "--checkpoint", str(checkpoint)]
    args += ["--max-new-tokens", "3000", "--reasoning-budget", "0"]
    args += ["--prompt", QUESTION] if command == "generate" else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (tmp_path / "question").write_text(QUESTION + "\n")  # chat's one question (generate reads none)
    with (tmp_path / "question").open() as stdin:
        process = subprocess.Popen(args, stdin=stdin, stdout=PIPE, stderr=PIPE, text=True, env=env)
    assert process.stdout is not None
    assert process.stdout.read(1)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_generate_stop_strings_cut_the_answer(checkpoint):
    full = expected(checkpoint, SamplingParams(max_new_tokens=24, reasoning_budget=2)).answer
    assert len(full) > 6
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    flags = ["--max-new-tokens", "24", "--reasoning-budget", "2", "--stop", "@@never@@", "--stop", stop]
    result = run_cli("generate", "--checkpoint", checkpoint, "--prompt", QUESTION, "--json", *flags)
    report = json.loads(result.stdout)
    assert report["answer"] == full[: full.index(stop)]
    assert report["finish_reason"] == "stop"


def _broken_checkpoints(checkpoint, root):
    """A directory without weights, and one whose config does not match its weights."""
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(checkpoint / "config.json", no_weights / "config.json")
    mismatch = root / "mismatch"
    shutil.copytree(checkpoint, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["ffn_dim"] = 96
    (mismatch / "config.json").write_text(json.dumps(config))
    return no_weights, mismatch


@pytest.mark.slow
def test_bad_input_is_one_line_without_traceback(checkpoint, tmp_path):
    no_weights, mismatch = _broken_checkpoints(checkpoint, tmp_path)
    cases = [
        (["--checkpoint", tmp_path / "missing", "--prompt", "hi"], "does not exist"),
        (["--checkpoint", no_weights, "--prompt", "hi"], "has no model.safetensors"),
        (["--checkpoint", mismatch, "--prompt", "hi"], "shape mismatch"),
        (["--checkpoint", checkpoint, "--prompt", "  "], "--prompt is empty"),
        (
            ["--checkpoint", checkpoint, "--prompt", "hi", "--max-new-tokens", "5000"],
            "(9 tokens) plus --max-new-tokens (5000) is 5009 tokens, beyond the model's context of 4096; "
            "shorten the prompt or lower --max-new-tokens",
        ),
        (["--checkpoint", checkpoint, "--prompt", "word " * 4100], "fills the model's context of 4096"),
        # (the flags' names, not the API's: /set in chat takes the API's)
        (["--checkpoint", checkpoint, "--prompt", "hi", "--top-p", "1.5"], "error: --top-p must be"),
        (
            ["--checkpoint", checkpoint, "--prompt", "hi", "--max-new-tokens", "0"],
            "error: --max-new-tokens must",
        ),
    ]
    results = run_clis([("generate", *args) for args, _ in cases])
    for (args, message), result in zip(cases, results, strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
        assert result.stdout == ""


def test_an_output_that_cannot_be_written_is_one_line(checkpoint):
    """A full disk (here /dev/full) behind stdout: `error: ...`, exit 2, not a traceback."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "reasoning_llama", "generate", "--checkpoint", str(checkpoint), "--prompt", "hi",
             "--max-new-tokens", "2", "--json"],
            stdout=full, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
        )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: cannot write the output: No space left on device"
    ]


# -- chat ---------------------------------------------------------------------------------


def test_the_chat_session_drops_the_oldest_exchanges_and_refuses_what_cannot_fit():
    """Each turn keeps room for the answer (max_new_tokens, at most half the context) by dropping the
    oldest exchanges; a message that alone fills the context is refused and the history kept.
    `/set` echoes values as typed (no markup) and `/show` lists what `/set` changes."""
    import io

    from rich.console import Console

    from reasoning_llama.chat import ChatSession, chat_settings

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=96))
    engine = Engine(model.eval(), get_tokenizer(), max_batch_size=1)
    out = io.StringIO()
    session = ChatSession(
        engine, SamplingParams(max_new_tokens=16, reasoning_budget=2), Console(file=out, width=200)
    )
    session.handle("/set stop [red]")
    assert "stop = ['[red]']" in out.getvalue()
    session.handle("/set stop none")
    session.handle("/history")
    assert out.getvalue().splitlines()[-1] == "(no messages yet)"
    session.handle("/show")
    shown = out.getvalue().splitlines()[-1]
    assert [item.split("=")[0] for item in shown.split(", ")] == chat_settings(session.params)
    assert "raw=" not in shown and "logprobs=" not in shown
    questions = [f"Question {i}: what is {i} plus {i} plus {i}?" for i in range(6)]
    for question in questions:
        session.handle(question)
        asked = [m["content"] for m in session.messages if m["role"] == "user"]
        assert (
            asked[-1] == question
            and asked == questions[questions.index(asked[0]) : len(asked) + questions.index(asked[0])]
        )
        fitted = session.messages[:-1]  # the prompt this turn ran on
        assert len(engine.tokenizer.render_prompt(fitted)) + 16 <= 96
    assert session.messages[0]["content"] != questions[0]  # some were dropped
    history = list(session.messages)
    session.handle("word " * 100)
    assert "error: the prompt (" in out.getvalue() and "fills the model's context of 96" in out.getvalue()
    assert session.messages == history
    # A max_new_tokens asked for keeps that much room, beyond half the context (older exchanges go).
    session.handle("/set max_new_tokens 60")
    session.handle("Last question?")
    assert len(engine.tokenizer.render_prompt(session.messages[:-1])) + 60 <= 96
    # Text is shown as typed: no emoji codes, no wrapping of long lines.
    session.handle("/set stop :smile:")
    session.handle("/history")
    assert "stop = [':smile:']" in out.getvalue() and "😄" not in out.getvalue()
    # A system prompt that alone fills the context is named, not "the prompt".
    long_system = ChatSession(
        engine, SamplingParams(max_new_tokens=8), Console(file=out, width=200), system="word " * 100
    )
    long_system.handle("hi")
    assert (
        "the system prompt (" in out.getvalue() and "start the chat with a shorter --system" in out.getvalue()
    )


def test_set_parses_and_validates_values():
    params = SamplingParams()
    assert apply_setting(params, "temperature", "0.7").temperature == 0.7
    assert apply_setting(params, "top-k", "40").top_k == 40
    assert apply_setting(params, "seed", "none").seed is None
    assert apply_setting(params, "reasoning_budget", "12").reasoning_budget == 12
    assert apply_setting(params, "stop", "END OF").stop == ("END OF",)
    for key, value, message in [
        ("temperature", "hot", "needs a number"),
        ("top_k", "2.5", "needs an integer"),
        ("top_p", "2", "top_p must be"),
        ("warmth", "1", "unknown setting"),
        ("raw", "1", "unknown setting"),  # the API's: a chat has turns and shows no logprobs
        ("logprobs", "3", "unknown setting"),
        ("min_p", "", "needs a value"),
        ("max_new_tokens", "0", "max_new_tokens must be"),
    ]:
        with pytest.raises(RequestError, match=message):
            apply_setting(params, key, value)


def spawn_chat(checkpoint, *flags: str) -> pexpect.spawn:
    """The chat in a real pseudo-terminal, started with SIGINT ignored as a background job would be."""
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")
    args = ["-m", "reasoning_llama", "chat", "--checkpoint", str(checkpoint), "--device", "cpu", *flags]
    return pexpect.spawn(
        sys.executable,
        args,
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 250),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )


PROMPT = "you>"
SUMMARY = r"\[(done|length limit) · \d+ tokens"


@pytest.mark.slow
def test_chat_in_a_terminal(checkpoint):
    chat = spawn_chat(checkpoint, "--max-new-tokens", "16", "--reasoning-budget", "4")
    try:
        chat.expect(PROMPT)
        chat.send(QUESTION + "\r")
        chat.expect("Thinking")
        chat.expect(SUMMARY)
        chat.expect(PROMPT)

        chat.send("/set temperature 0.7\r")
        chat.expect("temperature = 0.7")
        chat.send("/set temperature hot\r")
        chat.expect("error: temperature needs a number")
        chat.send("/set top_p 2\r")
        chat.expect(r"error: top_p must be a number in \(0, 1\]")

        chat.send("line one\x1b\rline two\r")  # Esc-Enter: a newline inside one message
        chat.expect(SUMMARY)
        chat.send("/history\r")
        chat.expect(f"user: {QUESTION}")
        chat.expect("user: line one\r\nline two")
        chat.expect(PROMPT)
        chat.send("/reset\r")
        chat.expect("history cleared")
        chat.send("/history\r/show\r")
        chat.expect(r"\(no messages yet\)")
        chat.expect(r"temperature=0\.7")
        assert "user:" not in chat.before

        chat.send("/set max_new_tokens 4000\r")
        chat.expect("max_new_tokens = 4000")
        chat.send("/set reasoning_budget none\r")
        chat.expect("reasoning_budget = none")
        chat.send("Tell me a long story.\r")
        chat.expect("Thinking")
        chat.sendintr()  # Ctrl-C mid-answer stops it and keeps the chat
        chat.expect(r"\[stopped · (\d+) tokens")
        assert int(chat.match.group(1)) < 4000
        chat.expect(PROMPT)
        chat.send("/history\r")
        chat.expect("user: Tell me a long story.")

        chat.send("/quit\r")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0


@pytest.mark.slow
def test_chat_hides_reasoning_and_quits_on_ctrl_d(checkpoint):
    chat = spawn_chat(checkpoint, "--max-new-tokens", "12", "--reasoning-budget", "3", "--hide-reasoning")
    try:
        chat.expect(PROMPT)
        chat.send(QUESTION + "\r")
        chat.expect(SUMMARY)
        assert "Thinking" not in chat.before
        chat.expect(PROMPT)
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0
