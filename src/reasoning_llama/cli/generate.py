"""`generate`: answer one prompt from the terminal.

Human output: the reasoning streams to stderr (dim, under a "Thinking" label) and the answer to
stdout, so `generate ... > answer.txt` keeps only the answer. `--json` prints one JSON object on
stdout instead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Annotated

import typer

from reasoning_llama.cli import options
from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.cli.options import INTERRUPTED_EXIT, in_flag_terms, sampling_params
from reasoning_llama.errors import RequestError

if TYPE_CHECKING:
    from reasoning_llama.generation import GenerationResult


def generate(
    checkpoint: ModelDir,
    prompt: Annotated[str, typer.Option(help="The user message.")],
    system: options.System = None,
    max_new_tokens: options.MaxNewTokens = None,
    temperature: options.Temperature = 0.0,
    top_k: options.TopK = 0,
    top_p: options.TopP = 1.0,
    min_p: options.MinP = 0.0,
    repetition_penalty: options.RepetitionPenalty = 1.0,
    seed: options.Seed = None,
    reasoning_budget: options.ReasoningBudget = None,
    stop: options.Stop = None,
    hide_reasoning: options.HideReasoning = False,
    device: options.Device = "auto",
    quantize: options.Quantize = None,
    compile_step: options.Compile = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of streaming.")
    ] = False,
) -> None:
    """Answer one prompt: stream the reasoning (stderr, dim) and the answer (stdout)."""
    from rich.console import Console

    from reasoning_llama.chat import StdoutConsole, StreamView, run_cancellable
    from reasoning_llama.generation import Engine

    params = sampling_params(locals())  # the options named like SamplingParams fields
    if not prompt.strip():
        raise RequestError("--prompt is empty; give the text to answer")
    engine = Engine.from_checkpoint(
        resolve_model_dir(checkpoint),
        device=device,
        max_batch_size=1,
        quantize=quantize,
        compile=compile_step,
    )
    prompt_ids = engine.tokenizer.render_prompt([{"role": "user", "content": prompt}], system=system)
    if max_new_tokens is None:  # the default shrinks to fit; an explicit value must fit
        room = engine.room_for_reply(len(prompt_ids))
        params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
    with in_flag_terms():
        engine.check_request(prompt_ids, params)

    if as_json:
        result = run_cancellable(engine, prompt_ids, params, lambda delta: None)
        print(json.dumps(result_json(result)))
    else:
        err = Console(stderr=True, highlight=False)
        view = StreamView(err, StdoutConsole(), hide_reasoning)
        result = run_cancellable(engine, prompt_ids, params, view.show)
        view.end(result)
    if result.finish_reason == "cancelled":  # (the partial result is out; scripts see it was cut)
        raise typer.Exit(INTERRUPTED_EXIT)


def result_json(result: GenerationResult) -> dict:
    """The `--json` object: texts, finish reason, OpenAI-style usage and timings."""
    return {
        "reasoning": result.reasoning,
        "answer": result.answer,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "reasoning_tokens": result.reasoning_tokens,
        },
        "timings": result.timings,
    }


def register(app: typer.Typer) -> None:
    app.command()(generate)
