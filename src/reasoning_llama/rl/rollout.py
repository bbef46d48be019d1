"""Sampling groups of answers through the engine, and their log-probabilities under the trained model.

The engine samples (the same engine `generate`, `chat` and the server use, so the reasoning budget and
the forced assistant header behave exactly as they do for users). Log-probabilities are never taken
from the sampler: the trained model recomputes them over the sampled tokens, with gradients. Tokens
the turn grammar forced (the assistant header, a spent budget's `<|im_end|>`) were not chosen by the
policy and carry no gradient; nor does the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from reasoning_llama.generation import Engine
from reasoning_llama.loss import token_log_probs
from reasoning_llama.model import Transformer
from reasoning_llama.rl.rewards import Checker
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import PAD, Turn


@dataclass
class Sample:
    """One sampled answer to one prompt, scored."""

    prompt_ids: list[int]
    completion_ids: list[int]
    sampled: list[bool]  # per completion id: chosen by the sampler (True) or forced by the turn grammar
    answer: str
    reward: float
    correct: bool
    well_formed: bool

    @property
    def n_sampled(self) -> int:
        return sum(self.sampled)


def sampled_positions(completion_ids: Sequence[int], reasoning_budget: int | None) -> list[bool]:
    """Which generated ids the sampler chose, replaying the turn grammar that forced the others."""
    turn = Turn(reasoning_budget=reasoning_budget)
    chosen = []
    for token in completion_ids:
        chosen.append(turn.forced is None)
        turn.feed(token)
    return chosen


def sample_groups(
    engine: Engine,
    rows: Sequence[dict[str, str]],
    group_size: int,
    params: SamplingParams,
    seeds: Sequence[int],
    checker: Checker,
    *,
    format_reward: float = 0.0,
) -> list[list[Sample]]:
    """`group_size` samples for each row (seeds[i * group_size + g] for sample g of row i), scored."""
    prompts = [engine.tokenizer.render_prompt([{"role": "user", "content": row["user"]}]) for row in rows]
    requests = [p for p in prompts for _ in range(group_size)]
    per_request = [dataclasses.replace(params, seed=seed) for seed in seeds[: len(requests)]]
    results = engine.generate_batch(requests, per_request)
    groups = []
    for i, row in enumerate(rows):
        group = []
        for result in results[i * group_size : (i + 1) * group_size]:
            correct = checker(row, result.answer)
            group.append(
                Sample(
                    prompt_ids=prompts[i],
                    completion_ids=result.token_ids,
                    sampled=sampled_positions(result.token_ids, params.reasoning_budget),
                    answer=result.answer,
                    reward=correct + format_reward * result.well_formed,
                    correct=correct == 1.0,
                    well_formed=result.well_formed,
                )
            )
        groups.append(group)
    return groups


def sampled_log_probs(model: Transformer, samples: Sequence[Sample], *, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of every sampled token of `samples` (in order, concatenated), with gradients.

    The samples are right-padded into one batch; causal attention never lets a position see the
    padding after it. `temperature` gives the log-probabilities of the distribution that sampled.
    """
    device = model.head.weight.device
    sequences = [s.prompt_ids + s.completion_ids for s in samples]
    width = max(len(seq) for seq in sequences) - 1
    inputs = torch.full((len(samples), width), PAD, dtype=torch.long)
    targets = torch.full((len(samples), width), PAD, dtype=torch.long)
    chosen = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, (seq, sample) in enumerate(zip(sequences, samples, strict=True)):
        inputs[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets[i, : len(seq) - 1] = torch.tensor(seq[1:])
        start = len(sample.prompt_ids) - 1  # the position whose target is the first generated id
        chosen[i, start : start + len(sample.completion_ids)] = torch.tensor(sample.sampled)
    inputs, targets, chosen = inputs.to(device), targets.to(device), chosen.to(device)
    positions = torch.arange(width, device=device).expand(len(samples), width)
    hidden = model.hidden_states(inputs, positions, select=chosen)
    return token_log_probs(hidden, model.head.weight, targets[chosen], temperature=temperature)
