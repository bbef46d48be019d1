"""Sampling parameters and the logits transforms behind them (one row of logits at a time).

The order follows transformers: repetition penalty, then temperature, top-k, top-p, min-p.
Log-probabilities reported to callers (`SamplingParams.logprobs`) are the log-softmax of the row
after the repetition penalty, at temperature 1 and before any filter (see `token_logprobs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from reasoning_llama.errors import RequestError
from reasoning_llama.tokenizer import ASSISTANT, EOT, IM_START, N_VOCAB, PAD, REASONING, USER

# Special ids no request may sample (generation.py's module docstring says which may, and why).
NEVER_SAMPLED = (IM_START, USER, REASONING, ASSISTANT, PAD)

# OpenAI's range, so the API schema and the sampler accept the same values; above 2 a sample is
# close to uniform noise anyway.
MAX_TEMPERATURE = 2.0
# OpenAI's limit for top_logprobs: alternatives reported per token.
MAX_LOGPROBS = 20
# Below this a temperature samples greedily (as vLLM does): dividing by it would overflow the logits.
GREEDY_BELOW_TEMPERATURE = 1e-5
# A penalty p divides or multiplies logits by p; beyond these the logits overflow to +-inf.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


@dataclass
class SamplingParams:
    """How one request is decoded."""

    max_new_tokens: int = 512  # bounds reasoning + assistant header + answer together
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers semantics; 1 = off
    seed: int | None = None  # a per-request generator: reproducible whatever else is in the batch
    reasoning_budget: int | None = None  # max reasoning tokens before the engine closes the reasoning
    stop: tuple[str, ...] = ()  # text stop strings, matched in the answer (or the raw text) only
    raw: bool = False  # plain text continuation: no reasoning, no assistant header, no chat turns
    # Report each sampled id's log-probability and this many most likely alternatives (None = off).
    logprobs: int | None = None

    def validate(self) -> None:
        """Raise RequestError naming the first out-of-range value."""

        def bad(param: str, why: str) -> RequestError:
            return RequestError(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be a number in [0, 1]")
        if not _is_number(self.repetition_penalty) or not (
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY
        ):
            raise bad(
                "repetition_penalty",
                f"must be a number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]",
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [0, 2**63) or None")
        if self.reasoning_budget is not None and (
            not _is_int(self.reasoning_budget) or self.reasoning_budget < 0
        ):
            raise bad("reasoning_budget", "must be an integer >= 0 or None")
        if not isinstance(self.raw, bool):
            raise bad("raw", "must be True or False")
        if self.raw and self.reasoning_budget is not None:
            raise bad(
                "reasoning_budget", "does not apply to raw text (there is no reasoning); leave it unset"
            )
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", "must be a sequence of strings")
        if any(s == "" for s in self.stop):
            raise bad("stop", "must not contain an empty string")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def filtered(self) -> bool:
        """Whether top-k, top-p or min-p cut the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' rule for every token in `seen` (ids or a bool mask): logit/p if > 0 else logit*p."""
    if penalty == 1.0:
        return logits
    mask = (
        seen
        if seen.dtype == torch.bool
        else torch.zeros_like(logits, dtype=torch.bool).index_fill_(-1, seen, True)
    )
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(mask, penalised, logits)


def never_sampled_ids(vocab_size: int) -> list[int]:
    """NEVER_SAMPLED and the ids a model's vocabulary has past the tokenizer's (padding rows of the head)."""
    return [*NEVER_SAMPLED, *range(N_VOCAB, vocab_size)]


def mask_unsampled_(logits: Tensor, never: Tensor, eot_banned: Tensor) -> Tensor:
    """Set, in place, the `never` ids of every row (n, V) and `<|endoftext|>` of the rows where
    `eot_banned` (n,) holds (those still reasoning) to -inf; returns `logits`."""
    logits.index_fill_(1, never, -math.inf)
    logits[:, EOT].masked_fill_(eot_banned, -math.inf)
    return logits


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set every token outside the top-k / top-p nucleus / min-p floor to -inf (always keeps the best)."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth_best] = -math.inf
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep tokens until the ones ranked above them already hold top_p of the mass.
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        logits[torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)] = -math.inf
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        floor = min_p * probs.max(dim=-1, keepdim=True).values
        logits[probs < floor] = -math.inf
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from a row of logits (already penalised and masked)."""
    return sample_rows(logits[None], [params], [generator])[0]


def draw_uniform(generator: torch.Generator | None = None) -> float:
    """The one uniform number in [0, 1) a sampled token costs, from `generator` (a CPU generator, or
    torch's default one): drawn on the host, so a seed gives the same numbers on every device."""
    return float(torch.rand(1, generator=generator))


def sample_rows(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token id per row of `logits` (n, V), each row with its own parameters and generator:
    `pick_rows` with one `draw_uniform` from each sampled row's generator."""
    uniforms = [0.0 if p.greedy else draw_uniform(g) for p, g in zip(params, generators, strict=True)]
    return pick_rows(logits, params, uniforms)


def pick_rows(logits: Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float]) -> list[int]:
    """One token id per row of `logits` (n, V): greedy rows their argmax, sampled rows the token
    where their uniform number (`draw_uniform`) falls in their distribution.

    The rows are filtered and normalised together, so a batch of n rows costs a few tensor
    operations, not n; and a seeded request samples the same tokens whatever else shares its batch.
    """
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if len(drawn) < len(params):
        chosen = logits.argmax(dim=-1)
    else:  # every row is sampled: skip a pass over the logits
        chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)
        temperatures = torch.tensor([params[i].temperature for i in drawn], device=logits.device)
        scaled = (logits if len(drawn) == logits.shape[0] else logits[rows]) / temperatures[:, None]
        by_filter: dict[tuple[int, float, float], list[int]] = {}
        for k, i in enumerate(drawn):
            by_filter.setdefault((params[i].top_k, params[i].top_p, params[i].min_p), []).append(k)
        for (top_k, top_p, min_p), members in by_filter.items():
            if (top_k, top_p, min_p) != (0, 1.0, 0.0):
                index = torch.tensor(members, device=logits.device)
                scaled[index] = filter_logits(scaled[index], top_k=top_k, top_p=top_p, min_p=min_p)
        uniform = torch.tensor([uniforms[i] for i in drawn], device=logits.device)
        chosen[rows] = inverse_cdf_(scaled, uniform)
    return chosen.tolist()


def inverse_cdf_(scaled: Tensor, uniform: Tensor) -> Tensor:
    """Each row's id (n,) where `uniform` (n,) falls in the cumulative distribution softmax(`scaled`)
    (n, V), which is overwritten: what `torch.multinomial` does for one draw per row."""
    # Unnormalised: the uniform number is scaled by each row's total instead, which saves the
    # softmax's division.
    weights = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()
    cumulative = weights.cumsum(dim=-1)
    # A token of probability 0 adds nothing to the sum, so `right=True` skips it: exactly so on a CPU,
    # whose scan adds in order. A parallel scan (CUDA's) adds blocks in another order, so a later
    # prefix, or the total, can exceed the last possible id's by an ulp; a draw in that sliver (about
    # one in 10^7) takes the likeliest id, never one of probability 0.
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
    picked.clamp_(max=scaled.shape[-1] - 1)
    impossible = weights.gather(1, picked) == 0
    return torch.where(impossible, weights.argmax(dim=-1, keepdim=True), picked)[:, 0]


@dataclass
class TokenLogprob:
    """One id's log-probability, with the most likely ids at its position (best first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(logits: Tensor, tokens: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Each row's log-probability of its token (`logits` (n, V), `tokens` n ids), with its `top` best ids.

    The engine passes the rows it samples from, after the repetition penalty and before the mask of
    ids it never samples: the model's distribution as the sampler sees it, at temperature 1 and
    before top-k/top-p/min-p, so the figures do not depend on those settings.
    """
    scores = torch.log_softmax(logits.float(), dim=-1)
    chosen = scores.gather(-1, torch.tensor(tokens, device=scores.device).unsqueeze(-1)).squeeze(-1)
    best: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if top:
        values, ids = torch.topk(scores, min(top, scores.shape[-1]), dim=-1)
        best = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, lp, b) for t, lp, b in zip(tokens, chosen.tolist(), best, strict=True)]
