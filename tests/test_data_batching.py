"""Batches: packing never mixes examples, every example once per epoch, seeded order, exact resume, rank shards."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reasoning_llama.data.batching import Batch, BatchLoader
from reasoning_llama.data.packing import best_fit_pack
from reasoning_llama.data.prefetch import Prefetcher
from reasoning_llama.data.prepare import TokenizedSplit
from reasoning_llama.errors import ConfigError, DataError
from reasoning_llama.model import Transformer, example_starts
from reasoning_llama.tokenizer import PAD, get_tokenizer


def random_split(n: int, min_len: int = 2, max_len: int = 40, seed: int = 0) -> TokenizedSplit:
    """Examples whose first token is their index (so they can be recognised), the prompt masked out."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        tokens = rng.integers(0, 50000, size=length).astype(np.int32)
        tokens[0] = i
        mask = np.ones(length, dtype=np.bool_)
        mask[: int(rng.integers(1, length))] = False
        ids.append(tokens)
        masks.append(mask)
    return TokenizedSplit(ids=ids, loss_mask=masks, rows=[{} for _ in range(n)])


def loader(split: TokenizedSplit, **kwargs) -> BatchLoader:
    settings = {"seq_len": 64, "batch_size": 4, "packing": True, "seed": 0} | kwargs
    return BatchLoader(split, **settings)


def examples_in(batch: Batch) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """(tokens, loss mask of targets) of every example in a batch, read back from its rows."""
    found = []
    for b in range(batch.inputs.shape[0]):
        real = batch.inputs[b] != PAD
        for doc in batch.doc_ids[b][real].unique().tolist():
            at = real & (batch.doc_ids[b] == doc)
            tokens = (*batch.inputs[b][at].tolist(), batch.targets[b][at][-1].item())
            found.append((tokens, tuple(batch.loss_mask[b][at].tolist())))
    return found


def epoch_examples(batches) -> list[tuple[int, ...]]:
    return sorted(tokens for batch in batches for tokens, _ in examples_in(batch))


def as_tuples(split: TokenizedSplit) -> list[tuple[int, ...]]:
    return sorted(tuple(ids.tolist()) for ids in split.ids)


# --- row layout --------------------------------------------------------------------------------------


def test_packed_predictions_equal_each_example_alone(tiny_config):
    split = random_split(12, min_len=3, max_len=30, seed=1)
    model = Transformer(tiny_config).eval()
    batch = next(iter(loader(split, seq_len=tiny_config.max_seq_len, batch_size=2)))
    assert (batch.doc_ids.amax(dim=1) >= 3).all()  # several examples share each row
    with torch.no_grad():
        packed = model(batch.inputs, batch.positions, doc_ids=batch.doc_ids)
        checked = 0
        for b in range(2):
            for doc in batch.doc_ids[b][batch.inputs[b] != PAD].unique().tolist():
                at = (batch.doc_ids[b] == doc) & (batch.inputs[b] != PAD)
                alone = model(batch.inputs[b][at].unsqueeze(0))[0]
                torch.testing.assert_close(packed[b][at], alone, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked >= 6


def test_row_layout_targets_positions_masks_and_padding():
    split = random_split(5, min_len=5, max_len=12, seed=2)
    batch = next(iter(loader(split, shuffle=False, batch_size=1)))
    real = batch.inputs[0] != PAD
    n_real = int(real.sum())
    assert real[:n_real].all() and not real[n_real:].any()  # padding only at the row end
    assert (batch.targets[0][~real] == PAD).all() and not batch.loss_mask[0][~real].any()
    docs, positions = batch.doc_ids[0], batch.positions[0]
    assert (docs[~real] == 5).all()  # five examples (ids 0..4), padding has an id of its own
    start = 0
    for doc in range(5):
        length = int((docs == doc).sum())
        assert (docs[start : start + length] == doc).all()
        assert positions[start : start + length].tolist() == list(range(length))  # RoPE restarts
        start += length
    assert batch.n_tokens == n_real == sum(len(ids) - 1 for ids in split.ids)
    # Each example: inputs e[:-1], targets e[1:], loss mask m[1:].
    expected = sorted(
        (tuple(e.tolist()), tuple(m[1:].tolist())) for e, m in zip(split.ids, split.loss_mask, strict=True)
    )
    assert sorted(examples_in(batch)) == expected
    assert batch.n_loss_tokens == sum(int(m[1:].sum()) for m in split.loss_mask) == int(batch.loss_mask.sum())
    assert batch.loss_token_fraction == batch.n_loss_tokens / 64


def test_loss_mask_covers_exactly_the_generated_part():
    tokenizer = get_tokenizer()
    rows = [("2 + 2?", "2 + 2 = 4", "4"), ("Sort 3 1 2.", "1 2 3", "1 2 3")]
    rendered = [tokenizer.render_example(*row) for row in rows]
    split = TokenizedSplit(
        ids=[np.array(r.ids, np.int32) for r in rendered],
        loss_mask=[np.array(r.loss_mask, np.bool_) for r in rendered],
    )
    batch = next(iter(loader(split, shuffle=False, batch_size=2)))
    generated = [tokenizer.render_generation(reasoning, answer) for _, reasoning, answer in rows]
    for b in range(2):
        docs = batch.doc_ids[b]
        for doc in docs[batch.inputs[b] != PAD].unique().tolist():
            at = (docs == doc) & (batch.inputs[b] != PAD)
            assert batch.targets[b][at][batch.loss_mask[b][at]].tolist() in generated


def test_unpacked_rows_hold_one_example_each():
    split = random_split(10, seed=3)
    batches = list(loader(split, packing=False, batch_size=3).epoch_batches(0))
    assert len(batches) == 4
    for batch in batches:
        for b in range(3):
            real = batch.inputs[b] != PAD
            if real.any():  # example 0, then padding with id 1
                assert (batch.doc_ids[b][real] == 0).all() and (batch.doc_ids[b][~real] == 1).all()
    assert epoch_examples(batches) == as_tuples(split)
    last = batches[-1]
    assert (last.inputs[1:] == PAD).all() and not last.loss_mask[1:].any()  # filled up with empty rows
    assert last.inputs.shape == (3, 64)


def test_batch_to_moves_every_tensor():
    batch = next(iter(loader(random_split(3))))
    moved = batch.to("cpu")
    assert moved.n_loss_tokens == batch.n_loss_tokens and torch.equal(moved.positions, batch.positions)


# --- epochs, order, resume, shards -------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False])
def test_every_example_exactly_once_per_epoch_in_a_new_order(packing):
    split = random_split(50, seed=4)
    data = loader(split, packing=packing, batch_size=3, seed=11)
    stream = iter(data)
    epochs = [[next(stream) for _ in range(data.batches_per_epoch)] for _ in range(2)]
    for batches in epochs:
        assert epoch_examples(batches) == as_tuples(split)
    first_order = [tokens[0] for b in epochs[0] for tokens, _ in examples_in(b)]
    second_order = [tokens[0] for b in epochs[1] for tokens, _ in examples_in(b)]
    assert first_order != second_order
    assert data.epoch == 2 and data.batch_index == 0


@pytest.mark.parametrize("packing", [True, False])
def test_segments_per_row_is_the_most_runs_any_row_holds(packing):
    """Varlen attention's room: every row of an epoch fits it, and some row fills it."""
    data = loader(random_split(60, max_len=30, seed=5), packing=packing, batch_size=3)
    runs = torch.cat([example_starts(b.doc_ids).sum(dim=1) for b in data.epoch_batches()])
    assert int(runs.max()) == data.segments_per_row == (2 if not packing else data.segments_per_row)
    assert data.segments_per_row > (2 if packing else 1)


def test_order_is_deterministic_per_seed():
    split = random_split(40, seed=5)

    def first_inputs(seed: int) -> list[torch.Tensor]:
        return [b.inputs for b in loader(split, seed=seed).epoch_batches(0)]

    same = zip(first_inputs(1), first_inputs(1), strict=True)
    assert all(torch.equal(a, b) for a, b in same)
    assert not all(torch.equal(a, b) for a, b in zip(first_inputs(1), first_inputs(2), strict=True))


def test_resume_continues_at_exactly_the_next_batch():
    split = random_split(30, seed=6)
    original = loader(split, batch_size=2, seed=3)
    stream = iter(original)
    for _ in range(original.batches_per_epoch + 2):  # into the second epoch
        next(stream)
    state = original.state_dict()
    expected = [next(stream) for _ in range(original.batches_per_epoch)]

    resumed = loader(split, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    got = [batch for batch, _ in zip(resumed, range(len(expected)), strict=False)]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.loss_mask, b.loss_mask)
        assert torch.equal(a.doc_ids, b.doc_ids) and torch.equal(a.positions, b.positions)


def test_resume_refuses_a_different_setup():
    split = random_split(30, seed=6)
    state = loader(split, batch_size=2).state_dict()
    with pytest.raises(DataError, match=r"cannot resume the data position: .*packing True -> False"):
        loader(split, batch_size=2, packing=False).load_state_dict(state)
    moved = loader(split, batch_size=2)
    next(iter(moved))  # 2 rows consumed: no whole number of 3-row batches
    # Steps of 6 rows: micro-batches of 2 rows divide both the 2 rows consumed and a step.
    with pytest.raises(DataError, match=r"no whole number of batches of 3 x 1 rows.*micro_batch_size=2 or"):
        loader(split, batch_size=3, batches_per_step=2).load_state_dict(moved.state_dict())
    loader(split, batch_size=2, batches_per_step=3).load_state_dict(moved.state_dict())  # as suggested
    with pytest.raises(DataError, match=r"micro_batch_size=1 or"):  # steps of 3 rows: 2 would not do
        loader(split, batch_size=3).load_state_dict(moved.state_dict())
    with pytest.raises(DataError, match="examples 30 -> 31"):
        loader(random_split(31, seed=6), batch_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="layout_crc32"):
        loader(random_split(30, seed=7), batch_size=2).load_state_dict(state)


def test_rank_shards_are_disjoint_and_cover_the_epoch():
    split = random_split(47, seed=7)
    shards = [loader(split, batch_size=2, seed=9, rank=r, world_size=3) for r in range(3)]
    assert len({s.batches_per_epoch for s in shards}) == 1
    for epoch in (0, 1):
        per_rank = [epoch_examples(s.epoch_batches(epoch)) for s in shards]
        assert all(per_rank)
        assert sorted(t for tokens in per_rank for t in tokens) == as_tuples(split)
        assert not set(per_rank[0]) & set(per_rank[1]) and not set(per_rank[1]) & set(per_rank[2])
    # Each rank knows the whole global batch's counts, which its share's counts add up to.
    for shares in zip(*(s.epoch_batches(0) for s in shards), strict=True):
        assert {b.n_loss_tokens_all_ranks for b in shares} == {sum(b.n_loss_tokens for b in shares)}
        assert {b.n_tokens_all_ranks for b in shares} == {sum(b.n_tokens for b in shares)}


@pytest.mark.parametrize("saved, resumed", [((4, 1), (2, 2)), ((2, 2), (4, 1)), ((1, 4), (2, 2))])
def test_a_position_moves_to_another_world_size(saved, resumed):
    """(batch_size, world_size) changes, the global batch does not: the next global rows are the same."""
    split = random_split(61, seed=4)

    def global_batches(batch_size: int, world_size: int, state: dict | None, count: int) -> list[list]:
        shards = [
            loader(split, batch_size=batch_size, seed=5, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        streams = []
        for shard in shards:
            if state is not None:
                shard.load_state_dict(state)
            streams.append(iter(shard))
        out = []
        for _ in range(count):
            rows = [next(stream) for stream in streams]
            out.append(sorted(epoch_examples(rows)))
        return out, shards[0].state_dict()

    _, state = global_batches(*saved, None, 3)  # into the epoch
    expected, _ = global_batches(*saved, state, 6)  # and across its end
    got, _ = global_batches(*resumed, state, 6)
    assert got == expected


@pytest.mark.parametrize(
    "accumulated, shared", [((4, 1, 2), (4, 2, 1)), ((2, 1, 4), (2, 2, 2)), ((1, 1, 4), (1, 4, 1))]
)
def test_a_step_holds_the_same_rows_whatever_shares_it(accumulated, shared):
    """(batch_size, world_size, batches_per_step): one process accumulating micro-batches and several
    processes sharing them take the same rows each optimizer step, across epoch ends too (the last
    step of an epoch is partly empty rather than borrowing the next epoch's first rows)."""
    split = random_split(61, seed=4)  # 15 packed rows: no step size here divides them

    def steps(batch_size: int, world_size: int, per_step: int, count: int) -> list[list]:
        streams = [
            iter(
                loader(
                    split,
                    batch_size=batch_size,
                    seed=5,
                    rank=r,
                    world_size=world_size,
                    batches_per_step=per_step,
                )
            )
            for r in range(world_size)
        ]
        return [
            sorted(epoch_examples([next(stream) for stream in streams for _ in range(per_step)]))
            for _ in range(count)
        ]

    one, many = loader(split, batch_size=accumulated[0], batches_per_step=accumulated[2]), None
    per_epoch = one.batches_per_epoch // one.batches_per_step
    assert one.rows_per_epoch % one.rows_per_step  # the last step of an epoch is a partial one
    one, many = steps(*accumulated, 2 * per_epoch + 1), steps(*shared, 2 * per_epoch + 1)
    assert one == many
    assert sorted(t for step in one[:per_epoch] for t in step) == as_tuples(split)  # each once an epoch


def test_empty_split_and_bad_settings():
    empty = TokenizedSplit(ids=[], loss_mask=[])
    assert list(loader(empty).epoch_batches(0)) == []
    with pytest.raises(DataError, match="the split is empty"):
        next(iter(loader(empty)))
    with pytest.raises(DataError, match=r"examples must have 2..65 tokens to fit rows of 64, found 2..100"):
        too_long = [np.zeros(2, np.int32), np.zeros(100, np.int32)]
        loader(TokenizedSplit(ids=too_long, loss_mask=[np.ones(len(a), np.bool_) for a in too_long]))
    with pytest.raises(ConfigError, match=r"rank must lie in 0\.\.world_size-1"):
        loader(random_split(3), rank=2, world_size=2)


# --- best-fit packing ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=200),
    seed=st.integers(0, 2**16),
)
def test_best_fit_places_every_item_once_within_capacity(sizes, seed):
    rows = best_fit_pack(sizes, 64, seed)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in row) <= 64 for row in rows)
    # Best-fit decreasing never leaves two rows that could have been merged.
    loads = sorted(sum(sizes[i] for i in row) for row in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > 64
    assert best_fit_pack(sizes, 64, seed) == rows


def test_best_fit_packs_tightly():
    sizes = np.random.default_rng(0).integers(5, 120, size=2000)
    rows = best_fit_pack(sizes, 512, seed=0)
    assert len(rows) <= np.ceil(sizes.sum() / 512) * 1.01 + 1


# --- prefetching ---------------------------------------------------------------------------------


def test_prefetcher_yields_the_same_batches_and_saves_the_consumed_position():
    split = random_split(40, seed=2)
    expected = [b for b, _ in zip(loader(split, batch_size=2, seed=1), range(12), strict=False)]
    ahead = loader(split, batch_size=2, seed=1)
    with Prefetcher(ahead, depth=4) as batches:
        got = [next(batches) for _ in range(5)]
        time.sleep(0.1)  # the thread has read ahead by now
        state = ahead.state_dict()
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(got, expected, strict=False))
    resumed = loader(split, batch_size=2, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed)).inputs, expected[5].inputs)  # the 6th, not one prefetched


def test_prefetcher_hands_on_a_loader_error():
    with (
        Prefetcher(loader(TokenizedSplit(ids=[], loss_mask=[]))) as batches,
        pytest.raises(DataError, match="the split is empty"),
    ):
        next(batches)
