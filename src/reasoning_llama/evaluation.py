"""Evaluation: masked loss and perplexity, and greedy generations scored for exact match,
format adherence and reasoning length, per synthetic task family.

Generations go through the inference engine (`Engine.generate_batch`, greedy), so what is scored
is exactly what `generate`, `chat` and the server would produce.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from reasoning_llama.data.batching import BatchLoader
from reasoning_llama.data.prepare import TokenizedSplit
from reasoning_llama.errors import ConfigError
from reasoning_llama.generation import Engine, GenerationResult
from reasoning_llama.loss import LossReport, evaluate_loss
from reasoning_llama.model import Transformer
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tasks import FAMILIES, check_answer, families_or_default, generate_examples
from reasoning_llama.tokenizer import ChatTokenizer

NO_FAMILY = "data"  # the bucket of rows without a synthetic `family`
ANSWER_ONLY_BUDGET = 128  # tokens to reason and answer in, for rows that give no reasoning to size it by


# --- loss on raw rows ------------------------------------------------------------------


def tokenize_for_eval(
    rows: Sequence[dict[str, str]], tokenizer: ChatTokenizer, max_tokens: int, *, system: str | None = None
) -> tuple[TokenizedSplit, int]:
    """Render rows as training examples, cut to `max_tokens` ids (so overlong rows still count what
    fits); also how many were cut."""
    ids, masks, cut = [], [], 0
    for row in rows:
        example = tokenizer.render_example(row["user"], row["reasoning"], row["assistant"], system=system)
        cut += len(example.ids) > max_tokens
        ids.append(np.asarray(example.ids[:max_tokens], dtype=np.int32))
        masks.append(np.asarray(example.loss_mask[:max_tokens], dtype=np.bool_))
    split = TokenizedSplit(
        ids=ids, loss_mask=masks, rows=list(rows), families=[r.get("family") for r in rows]
    )
    return split, cut


def loss_on_rows(
    model: Transformer,
    tokenizer: ChatTokenizer,
    rows: Sequence[dict[str, str]],
    *,
    batch_size: int = 8,
    amp_dtype: torch.dtype | None = None,
    system: str | None = None,
) -> LossReport:
    """Masked loss and perplexity of the model on raw rows, packed into rows of the model's context
    (a row longer than the context is scored on what fits, and counted in `cut_rows`)."""
    seq_len = model.config.max_seq_len
    split, cut = tokenize_for_eval(rows, tokenizer, seq_len + 1, system=system)
    keep = [i for i, x in enumerate(split.ids) if len(x) >= 2]
    split = TokenizedSplit([split.ids[i] for i in keep], [split.loss_mask[i] for i in keep])
    if not len(split):
        return LossReport(math.nan, math.nan, 0, cut)
    seq_len = min(seq_len, max(len(x) for x in split.ids) - 1)
    loader = BatchLoader(split, seq_len=seq_len, batch_size=batch_size, packing=True, seed=0, shuffle=False)
    report = evaluate_loss(model, loader.iter_epoch_once(), amp_dtype=amp_dtype)
    return dataclasses.replace(report, cut_rows=cut)


# --- generations -----------------------------------------------------------------------------


@dataclass
class Score:
    """Generation metrics over a group of problems."""

    n: int = 0
    exact_match: float = 0.0  # share of answers equal to the reference after normalisation
    format_adherence: float = 0.0  # share of well-formed outputs: reasoning, assistant header, answer, closed
    finished: float = 0.0  # share that ended by themselves rather than hitting max_new_tokens
    mean_reasoning_tokens: float = 0.0  # over the problems whose prompt fits the context
    prompts_not_fitting: int = 0  # prompts that fill the model's context: not attempted, counted wrong


@dataclass
class GenerationReport:
    overall: Score
    families: dict[str, Score]
    examples: list[dict[str, Any]] = field(default_factory=list)  # one per row: prompt, reference, output

    def to_dict(self, *, with_examples: bool = False) -> dict[str, Any]:
        out = {"overall": asdict(self.overall), "families": {k: asdict(v) for k, v in self.families.items()}}
        if with_examples:
            out["examples"] = self.examples
        return out


def row_is_correct(row: dict[str, str], predicted: str) -> bool:
    """`check_answer` with the row's synthetic family; rows of other data have none (normalised text)."""
    family = row.get("family")
    return check_answer(family if family in FAMILIES else None, row["assistant"], predicted)


def default_max_new_tokens(rows: Sequence[dict[str, str]], tokenizer: ChatTokenizer) -> int:
    """Room for twice the longest reference generation, so a slightly verbose model is not cut off;
    rows without reasoning (only an answer to check) leave room for one: at least ANSWER_ONLY_BUDGET."""
    longest = max(len(tokenizer.render_generation(r.get("reasoning", ""), r["assistant"])) for r in rows)
    if any("reasoning" not in r for r in rows):
        return max(ANSWER_ONLY_BUDGET, 2 * longest)
    return 2 * longest + 16


def _score(items: list[dict[str, Any]]) -> Score:
    n = len(items)
    if not n:
        return Score()
    attempted = [i for i in items if i["prompt_fits"]]
    return Score(
        n=n,
        exact_match=sum(i["correct"] for i in items) / n,
        format_adherence=sum(i["well_formed"] for i in items) / n,
        finished=sum(i["finished"] for i in items) / n,
        mean_reasoning_tokens=sum(i["reasoning_tokens"] for i in attempted) / max(1, len(attempted)),
        prompts_not_fitting=n - len(attempted),
    )


def evaluate_generations(
    engine: Engine,
    rows: Sequence[dict[str, str]],
    *,
    max_new_tokens: int | None = None,
    system: str | None = None,
    progress: bool = False,
    correct: Callable[[dict[str, str], str], bool] | None = None,
) -> GenerationReport:
    """Greedy-generate an answer to every row's `user` and score it against the row's `assistant`
    (with `correct(row, answer)`, by default `row_is_correct`)."""
    correct = correct or row_is_correct
    if not rows:
        raise ConfigError("nothing to evaluate: no rows")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokenizer = engine.tokenizer
    budget = default_max_new_tokens(rows, tokenizer) if max_new_tokens is None else max_new_tokens
    prompts, params, fits = [], [], []
    for row in rows:
        prompt = tokenizer.render_prompt([{"role": "user", "content": row["user"]}], system=system)
        room = min(budget, engine.max_context - len(prompt))
        fits.append(room >= 1)
        if room >= 1:
            prompts.append(prompt)
            params.append(SamplingParams(max_new_tokens=room, temperature=0.0))
    results = iter(engine.generate_batch(prompts, params, progress=progress) if prompts else [])
    items = []
    for row, fit in zip(rows, fits, strict=True):
        result: GenerationResult | None = next(results) if fit else None
        items.append(
            {
                "family": row.get("family") or NO_FAMILY,
                "user": row["user"],
                "reference": row["assistant"],
                "reasoning": result.reasoning if result else "",
                "answer": result.answer if result else "",
                "correct": bool(result and correct(row, result.answer)),
                "well_formed": bool(result and result.well_formed),
                "finished": bool(result and result.finish_reason == "stop"),
                "reasoning_tokens": result.reasoning_tokens if result else 0,
                "prompt_fits": fit,
            }
        )
    families = sorted({i["family"] for i in items})
    return GenerationReport(
        overall=_score(items),
        families={f: _score([i for i in items if i["family"] == f]) for f in families},
        examples=items,
    )


# --- synthetic tasks -------------------------------------------------------------------------


def parse_task_spec(spec: str) -> list[str]:
    """`synthetic` (the default families) or `synthetic:chain_sum,sort_digits` -> family names."""
    kind, colon, names = spec.partition(":")
    named = [n.strip() for n in names.split(",") if n.strip()]
    if kind != "synthetic" or (colon and not named):
        raise ConfigError(f"unknown task {spec!r}; use synthetic or synthetic:FAMILY[,FAMILY...]")
    families = families_or_default(named)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown synthetic family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    return families


def synthetic_test_rows(
    families: Sequence[str], per_family: int, *, seed: int = 0, difficulty: int | dict[str, int] | None = None
) -> list[dict[str, str]]:
    """`per_family` problems of each family from the synthetic TEST split (never trained on)."""
    try:
        examples = generate_examples(
            list(families), per_family * len(families), split="test", seed=seed, difficulty=difficulty
        )
    except ValueError as e:
        raise ConfigError(f"synthetic task: {e}") from None
    return [e.as_row() for e in examples]
