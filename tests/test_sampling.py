"""Sampling transforms on fixed distributions, checked against transformers' logits processors."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from reasoning_llama.errors import RequestError
from reasoning_llama.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    inverse_cdf_,
    sample,
    sample_rows,
    token_logprobs,
)

PROBS = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.20])  # ranked: 1, 3, 4, 2, 0
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(logits > -math.inf).flatten().tolist())


@pytest.mark.parametrize(
    ("top_k", "expected"), [(1, {1}), (2, {1, 3}), (4, {1, 3, 4, 2}), (0, {0, 1, 2, 3, 4})]
)
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept(filter_logits(LOGITS, top_k=top_k)) == expected


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.3, {1}), (0.5, {1, 3}), (0.7, {1, 3, 4}), (0.9, {1, 3, 4, 2}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, expected):
    assert kept(filter_logits(LOGITS, top_p=top_p)) == expected


@pytest.mark.parametrize(
    ("min_p", "expected"), [(0.2, {1, 3, 4, 2}), (0.45, {1, 3, 4}), (0.9, {1}), (0.0, {0, 1, 2, 3, 4})]
)
def test_min_p_drops_tokens_below_a_fraction_of_the_best(min_p, expected):
    assert kept(filter_logits(LOGITS, min_p=min_p)) == expected


def test_filters_agree_with_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    for ours, theirs in [
        ({"top_k": 17}, TopKLogitsWarper(17)),
        ({"top_p": 0.8}, TopPLogitsWarper(0.8)),
        ({"min_p": 0.05}, MinPLogitsWarper(0.05)),
    ]:
        expected = theirs(None, logits.clone()) > -math.inf
        got = torch.stack([filter_logits(row, **ours) for row in logits]) > -math.inf
        assert torch.equal(got, expected), ours


def test_sampling_draws_only_allowed_tokens_and_is_seeded():
    params = SamplingParams(temperature=1.5, top_k=3, top_p=0.9)
    allowed = kept(filter_logits(LOGITS / params.temperature, top_k=3, top_p=0.9))
    draws = [sample(LOGITS, params, torch.Generator().manual_seed(i)) for i in range(200)]
    assert set(draws) == allowed  # 200 draws visit every allowed token, and nothing else
    again = [sample(LOGITS, params, torch.Generator().manual_seed(i)) for i in range(200)]
    assert draws == again


def test_rows_sampled_together_draw_what_each_would_alone():
    torch.manual_seed(3)
    logits = torch.randn(6, 50) * 2
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=2.0),
    ]
    for seed in range(20):
        alone = [
            sample(row, p, torch.Generator().manual_seed(seed + i))
            for i, (row, p) in enumerate(zip(logits, params, strict=True))
        ]
        generators = [torch.Generator().manual_seed(seed + i) for i in range(6)]
        assert sample_rows(logits, params, generators) == alone
        # and in another batch composition: the rows reversed
        generators = [torch.Generator().manual_seed(seed + i) for i in reversed(range(6))]
        assert sample_rows(logits.flip(0), params[::-1], generators) == alone[::-1]


def test_sampled_frequencies_follow_the_distribution():
    draws = sample_rows(LOGITS.expand(8000, -1), [SamplingParams(temperature=1.0)] * 8000, [None] * 8000)
    frequencies = torch.bincount(torch.tensor(draws), minlength=5) / 8000
    assert torch.allclose(frequencies, PROBS, atol=0.02), frequencies  # 4 standard errors at most


def test_a_draw_past_the_last_possible_id_takes_the_likeliest_never_an_impossible_one():
    """A parallel scan may put the total an ulp above the last possible id's prefix; a uniform of 1
    reaches that sliver on any machine: it must not land on the masked ids after it."""
    logits = torch.tensor([[0.0, 2.0, 1.0, -math.inf, -math.inf]] * 2)
    uniform = torch.tensor([1.0, 0.5])
    assert inverse_cdf_(logits.clone(), uniform).tolist() == [1, 1]
    ties = torch.tensor([[-math.inf, 0.0, -math.inf, 0.0, -math.inf]])
    assert inverse_cdf_(ties, torch.tensor([1.0])).tolist() == [1]


def test_greedy_takes_the_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0.0)) == 1


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(1, 50) * 4  # positive and negative scores
    seen = torch.tensor([[3, 7, 7, 11, 42, 3, 0]])  # repeats count once
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    ours = apply_repetition_penalty(logits[0], seen[0], 1.3)
    assert torch.allclose(ours, expected[0])
    mask = torch.zeros(50, dtype=torch.bool)
    mask[seen[0]] = True
    assert torch.allclose(apply_repetition_penalty(logits[0], mask, 1.3), expected[0])
    assert not torch.allclose(ours, logits[0])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", 2.5),  # the API schema's limit too: sampling.MAX_TEMPERATURE
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.2),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 0.005),  # logits divided by it overflow
        ("repetition_penalty", 101.0),
        ("seed", -3),
        ("seed", True),
        ("reasoning_budget", -1),
        ("stop", "STOP"),
        ("stop", ("",)),
        ("raw", 1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", True),
    ],
)
def test_validate_names_the_bad_value(field, value):
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value}).validate()
    assert info.value.param == field
    assert field in str(info.value)


def test_validate_accepts_defaults_and_sensible_values():
    SamplingParams().validate()
    SamplingParams(
        temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=3, stop=("x",)
    ).validate()


def test_validate_refuses_a_reasoning_budget_in_raw_mode():
    SamplingParams(raw=True, stop=("\n",)).validate()
    with pytest.raises(RequestError, match="leave it unset") as info:
        SamplingParams(raw=True, reasoning_budget=0).validate()
    assert info.value.param == "reasoning_budget"


def test_token_logprobs_are_the_log_softmax_with_the_best_ids_first():
    rows = torch.stack([LOGITS, LOGITS.flip(0) + 3.0])  # a shifted row has the same distribution
    first, second = token_logprobs(rows, [2, 0], top=3)
    assert (first.token, second.token) == (2, 0)
    assert first.logprob == pytest.approx(math.log(0.10), abs=1e-6)
    assert second.logprob == pytest.approx(math.log(0.20), abs=1e-6)  # LOGITS[4] after the flip
    assert [i for i, _ in first.top] == [1, 3, 4]
    assert [lp for _, lp in first.top] == pytest.approx([math.log(p) for p in (0.40, 0.25, 0.20)], abs=1e-6)
    assert [i for i, _ in second.top] == [3, 1, 0]
    (alone,) = token_logprobs(LOGITS.unsqueeze(0), [1])
    assert alone.top == [] and alone.logprob == pytest.approx(math.log(0.40), abs=1e-6)


def test_a_temperature_too_small_to_divide_by_samples_greedily():
    params = SamplingParams(temperature=5e-324)
    params.validate()
    assert params.greedy and not SamplingParams(temperature=1e-3).greedy
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert sample(logits, params) == 1
