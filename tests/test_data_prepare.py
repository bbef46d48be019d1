"""Preparation: one renderer, loss masks, fitting to the context, the seeded split, the on-disk cache, statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from reasoning_llama.config import DataConfig
from reasoning_llama.data.prepare import prepare_data, split_rows
from reasoning_llama.errors import ConfigError, DataError
from reasoning_llama.tokenizer import EOT, IM_START, REASONING, get_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def chat_rows(n: int, reasoning_words: int = 3) -> list[dict]:
    return [
        {
            "user": f"What is {i} plus {i}?",
            "reasoning": " ".join(["think"] * reasoning_words),
            "assistant": str(2 * i),
        }
        for i in range(n)
    ]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_cfg(tmp_path: Path, path: Path, **settings) -> DataConfig:
    return DataConfig(source="local", path=str(path), cache_dir=str(tmp_path / "cache"), **settings)


def test_examples_are_the_renderer_output_with_the_generated_part_in_the_loss(tmp_path, tokenizer):
    rows = chat_rows(10)
    cfg = local_cfg(tmp_path, write_rows(tmp_path / "rows.jsonl", rows), val_fraction=0.2)
    data = prepare_data(cfg, tokenizer, progress=False)
    assert len(data.train) == 8 and len(data.val) == 2
    for split in (data.train, data.val):
        for ids, mask, row in zip(split.ids, split.loss_mask, split.rows, strict=True):
            assert ids.dtype == np.int32 and mask.dtype == np.bool_
            expected = tokenizer.render_example(row["user"], row["reasoning"], row["assistant"])
            assert ids.tolist() == expected.ids and mask.tolist() == expected.loss_mask
            # The loss covers exactly the first reasoning token through the final <|endoftext|>.
            prompt = tokenizer.render_prompt([{"role": "user", "content": row["user"]}])
            assert ids[len(prompt) - 3 : len(prompt) - 1].tolist() == [IM_START, REASONING]
            assert not mask[: len(prompt)].any() and mask[len(prompt) :].all()
            assert ids[-1] == EOT
    assert sorted(r["user"] for r in data.train.rows + data.val.rows) == sorted(r["user"] for r in rows)
    assert data.train.families == [None] * 8


def test_train_on_prompt_and_system_prompt(tmp_path, tokenizer):
    rows = chat_rows(3)
    cfg = local_cfg(
        tmp_path,
        write_rows(tmp_path / "rows.jsonl", rows),
        val_fraction=0,
        train_on_prompt=True,
        system_prompt="Be brief.",
    )
    data = prepare_data(cfg, tokenizer, progress=False)
    for ids, mask, row in zip(data.train.ids, data.train.loss_mask, data.train.rows, strict=True):
        expected = tokenizer.render_example(
            row["user"], row["reasoning"], row["assistant"], system="Be brief.", train_on_prompt=True
        )
        assert ids.tolist() == expected.ids
        assert not mask[0] and mask[1:].all()
        assert tokenizer.decode(ids.tolist()).startswith("<|im_start|>user\nBe brief.\n\nWhat is")


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer, caplog, overlong):
    rows = chat_rows(6) + chat_rows(3, reasoning_words=200)  # 3 rows far beyond 64 tokens
    rows.append({"user": "word " * 300, "reasoning": "r", "assistant": "a"})  # the prompt alone is too long
    cfg = local_cfg(
        tmp_path, write_rows(tmp_path / "rows.jsonl", rows), seq_len=64, overlong=overlong, val_fraction=0
    )
    with caplog.at_level(logging.WARNING):
        data = prepare_data(cfg, tokenizer, progress=False)
    stats = data.stats["train"]
    assert stats["over_seq_len"] == 4
    if overlong == "truncate":
        assert (stats["truncated"], stats["dropped_overlong"], stats["dropped_no_target"]) == (3, 0, 1)
        assert len(data.train) == 9
        long_ones = [ids for ids in data.train.ids if len(ids) > 40]
        assert [len(ids) for ids in long_ones] == [65, 65, 65]  # seq_len + 1: n tokens fill n - 1 positions
    else:
        assert (stats["truncated"], stats["dropped_overlong"], stats["dropped_no_target"]) == (0, 3, 1)
        assert len(data.train) == 6
    assert max(len(ids) for ids in data.train.ids) <= 65
    assert "4 of 10 examples exceed 65 tokens" in caplog.text


def test_nothing_fitting_the_context_is_an_error_whose_hint_would_help(tmp_path, tokenizer):
    """data.overlong=truncate is suggested only where it keeps rows: not where the prompt alone is too long."""
    long_answers = chat_rows(3, reasoning_words=200)
    cfg = local_cfg(tmp_path, write_rows(tmp_path / "a.jsonl", long_answers), seq_len=32, overlong="drop")
    with pytest.raises(
        DataError,
        match=r"none of the 2 train rows fits seq_len 32 with a target left; raise data\.seq_len or set data\.overlong=truncate$",
    ):
        prepare_data(cfg, tokenizer, progress=False)
    cfg.overlong = "truncate"  # what the hint says: now it trains
    assert prepare_data(cfg, tokenizer, progress=False).stats["train"]["truncated"] == 2
    long_prompts = [{"user": "word " * 40, "reasoning": "r", "assistant": "a"}] * 3
    cfg = local_cfg(tmp_path, write_rows(tmp_path / "p.jsonl", long_prompts), seq_len=32, overlong="drop")
    with pytest.raises(DataError, match=r"with a target left; raise data\.seq_len$"):
        prepare_data(cfg, tokenizer, progress=False)


def test_huge_row_is_truncated_to_the_context(tmp_path, tokenizer):
    rows = [{"user": "Summarise.", "reasoning": "token " * 50_000, "assistant": "done"}, *chat_rows(2)]
    cfg = local_cfg(tmp_path, write_rows(tmp_path / "rows.jsonl", rows), seq_len=128, val_fraction=0)
    data = prepare_data(cfg, tokenizer, progress=False)
    assert data.stats["train"]["length"]["max"] > 50_000
    assert data.stats["train"]["truncated"] == 1
    assert len(data.train.ids[0]) == 129


def test_length_statistics(tmp_path, tokenizer):
    rows = [*chat_rows(20), *chat_rows(5, reasoning_words=40)]
    cfg = local_cfg(tmp_path, write_rows(tmp_path / "rows.jsonl", rows), seq_len=48, val_fraction=0)
    data = prepare_data(cfg, tokenizer, progress=False)
    lengths = np.array(
        [len(tokenizer.render_example(r["user"], r["reasoning"], r["assistant"]).ids) for r in rows]
    )
    assert data.stats["train"]["length"] == {
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }
    assert data.stats["train"]["over_seq_len"] == int((lengths > 49).sum()) == 5
    assert data.stats["validation"]["rows_kept"] == 25


def test_packing_statistics_count_the_loss_share_of_computed_tokens(tmp_path, tokenizer):
    cfg = local_cfg(tmp_path, write_rows(tmp_path / "rows.jsonl", chat_rows(40)), seq_len=128, val_fraction=0)
    data = prepare_data(cfg, tokenizer, progress=False)
    loss_tokens = sum(int(m[1:].sum()) for m in data.train.loss_mask)
    positions = sum(len(ids) - 1 for ids in data.train.ids)
    packed, unpacked = data.stats["packing"]["packed"], data.stats["packing"]["unpacked"]
    assert data.stats["train"]["loss_tokens"] == loss_tokens
    assert unpacked["rows"] == 40
    assert packed["rows"] == int(np.ceil(positions / 128))  # equal-ish sizes pack perfectly here
    for mode in (packed, unpacked):
        assert mode["loss_token_fraction"] == pytest.approx(loss_tokens / (mode["rows"] * 128))
        assert mode["padding_fraction"] == pytest.approx(1 - positions / (mode["rows"] * 128))
    assert packed["loss_token_fraction"] > 4 * unpacked["loss_token_fraction"]


def test_split_is_seeded_disjoint_and_complete():
    rows = [{"user": str(i)} for i in range(200)]
    train, val = split_rows(rows, 0.1, seed=3)
    assert len(val) == 20 and len(train) == 180
    assert sorted(r["user"] for r in train + val) == sorted(r["user"] for r in rows)
    assert split_rows(rows, 0.1, seed=3) == (train, val)
    assert split_rows(rows, 0.1, seed=4)[1] != val
    assert len(split_rows(rows[:3], 0.01, seed=0)[1]) == 1  # asked for validation: at least one row
    assert split_rows(rows, 0.0, seed=0) == (rows, [])


def test_synthetic_validation_is_the_test_split(tmp_path, tokenizer):
    from reasoning_llama.tasks import generate_examples

    cfg = DataConfig(synthetic_train_size=24, synthetic_val_size=6, seed=5, cache_dir=str(tmp_path))
    data = prepare_data(cfg, tokenizer, progress=False)
    assert data.val.rows == [e.as_row() for e in generate_examples(None, 6, split="test", seed=5)]
    assert data.train.families == [e.family for e in generate_examples(None, 24, split="train", seed=5)]


def test_text_source_loses_nothing_when_documents_are_split(tmp_path, tokenizer):
    long_doc = " ".join(f"w{i}" for i in range(300))
    (tmp_path / "corpus.txt").write_text(f"short one<|endoftext|>{long_doc}")
    cfg = DataConfig(
        source="text", path=str(tmp_path / "corpus.txt"), seq_len=32, val_fraction=0, cache_dir=str(tmp_path)
    )
    data = prepare_data(cfg, tokenizer, progress=False)
    assert data.stats["train"]["chunked_documents"] == 1
    assert data.train.ids[0].tolist() == [*tokenizer.encode("short one"), EOT]
    doc = [*tokenizer.encode(long_doc), EOT]
    pieces = data.train.ids[1:]
    assert all(len(p) <= 33 for p in pieces) and all(r == {"text": long_doc} for r in data.train.rows[1:])
    # Every token after the first is a target exactly once, in order.
    assert [t for p in pieces for t in p[1:].tolist()] == doc[1:]
    assert all(m[1:].all() for m in data.train.loss_mask)


# --- cache -------------------------------------------------------------------------------------


class CountingTokenizer(type(get_tokenizer())):
    """The real tokenizer, counting how many examples it renders."""

    renders = 0

    def render_example(self, *args, **kwargs):
        CountingTokenizer.renders += 1
        return super().render_example(*args, **kwargs)


def test_second_preparation_reads_the_cache_and_changes_miss_it(tmp_path):
    counting = CountingTokenizer()
    path = write_rows(tmp_path / "rows.jsonl", chat_rows(30))
    cfg = local_cfg(tmp_path, path, seq_len=64)

    def prepare(config: DataConfig):
        CountingTokenizer.renders = 0
        data = prepare_data(config, counting, progress=False)
        return data, CountingTokenizer.renders

    first, renders = prepare(cfg)
    assert not first.stats["cache"]["hit"] and renders > 30
    second, renders = prepare(cfg)
    assert second.stats["cache"]["hit"] and renders <= 1  # only the tokenizer's identity probe
    assert [a.tolist() for a in second.train.ids] == [a.tolist() for a in first.train.ids]
    assert [a.tolist() for a in second.val.loss_mask] == [a.tolist() for a in first.val.loss_mask]
    assert second.train.rows == first.train.rows and second.stats["train"] == first.stats["train"]
    assert Path(second.stats["cache"]["path"]).suffix == ".npz"

    for changed in (
        local_cfg(tmp_path, path, seq_len=32),
        local_cfg(tmp_path, path, seq_len=64, system_prompt="Be brief."),
        local_cfg(tmp_path, path, seq_len=64, train_on_prompt=True),
        local_cfg(tmp_path, path, seq_len=64, seed=99),  # another split
    ):
        assert not prepare(changed)[0].stats["cache"]["hit"]
    write_rows(path, [*chat_rows(29), {"user": "new", "reasoning": "r", "assistant": "a"}])
    assert not prepare(cfg)[0].stats["cache"]["hit"]


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, tokenizer, caplog):
    cfg = local_cfg(tmp_path, write_rows(tmp_path / "rows.jsonl", chat_rows(5)))
    first = prepare_data(cfg, tokenizer, progress=False)
    Path(first.stats["cache"]["path"]).write_bytes(b"not an npz file")
    with caplog.at_level(logging.WARNING):
        again = prepare_data(cfg, tokenizer, progress=False)
    assert not again.stats["cache"]["hit"] and "ignoring unreadable data cache" in caplog.text
    assert prepare_data(cfg, tokenizer, progress=False).stats["cache"]["hit"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"overlong": "wrap"}, "data.overlong must be one of truncate, drop"),
        ({"val_fraction": 1.0}, r"data.val_fraction must lie in \[0, 1\)"),
        ({"seq_len": 0}, "data.seq_len must be positive"),
        ({"path": "mine.jsonl"}, "data.path is mine.jsonl but data.source is synthetic, which reads no file"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, tokenizer, settings, message):
    with pytest.raises(ConfigError, match=message):
        prepare_data(DataConfig(cache_dir=str(tmp_path), **settings), tokenizer, progress=False)


def test_the_default_cache_is_the_user_cache(tmp_path, tokenizer, monkeypatch):
    """$REASONING_LLAMA_CACHE moves every rebuildable file, tokenized data included."""
    monkeypatch.setenv("REASONING_LLAMA_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(synthetic_train_size=12, synthetic_val_size=3)
    assert cfg.cache_dir is None
    prepare_data(cfg, tokenizer, progress=False)
    assert len(list((tmp_path / "cache" / "data").glob("*.npz"))) == 1


def test_a_cache_that_cannot_be_written_is_reported_as_none(tmp_path, tokenizer, caplog):
    (tmp_path / "a-file").write_text("not a directory")
    cfg = DataConfig(synthetic_train_size=12, synthetic_val_size=3, cache_dir=str(tmp_path / "a-file"))
    with caplog.at_level(logging.WARNING):
        stats = prepare_data(cfg, tokenizer, progress=False).stats
    assert stats["cache"] == {"hit": False, "path": None} and "could not write the data cache" in caplog.text
