"""Data sources and row validation against crafted files, a local copy of the hub dataset, and the synthetic tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasoning_llama.config import DataConfig
from reasoning_llama.data.sources import load_rows
from reasoning_llama.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
CHAT_ROW = {"user": "q", "reasoning": "r", "assistant": "a"}


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    """`datasets` with HF_HUB_OFFLINE=1 and its cache in a temporary directory: no network, no shared state."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def local(path: Path | str, **settings) -> DataConfig:
    return DataConfig(source="local", path=str(path), **settings)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- validation of local JSON files ------------------------------------------------------


def test_bad_rows_are_skipped_counted_and_located():
    path = FIXTURES / "bad_rows.jsonl"
    loaded = load_rows(local(path))
    report = loaded.report
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (12, 3, 9)
    assert report.skipped == {
        "missing field 'user'": 1,
        "non-string field 'user'": 2,
        "empty field 'reasoning'": 2,
        "missing field 'assistant'": 2,
        "not an object": 1,
        "invalid unicode in field 'user'": 1,
    }
    assert report.first_offending == [
        f"{path}:2: missing field 'user'",
        f"{path}:3: non-string field 'user' (int)",
        f"{path}:4: empty field 'reasoning'",
        f"{path}:7: missing field 'assistant'",
        f"{path}:8: empty field 'reasoning'",
        f"{path}:9: non-string field 'user' (list)",
        f"{path}:10: not an object (list)",
        f"{path}:11: invalid unicode in field 'user'",
        f"{path}:13: missing field 'assistant'",
    ]
    summary = report.summary()
    assert summary.startswith("read 12 rows, kept 3, skipped 9 (missing field 'user': 1, ")
    assert f"first offending rows: {path}:2: missing field 'user'; {path}:3:" in summary
    assert loaded.val is None


def test_kept_rows_keep_their_text_exactly_and_drop_other_columns():
    rows = load_rows(local(FIXTURES / "bad_rows.jsonl")).train
    assert rows == [
        {"user": "What is 2+2?", "reasoning": "2+2=4", "assistant": "4"},
        {"user": "Combien font 2 × 3 ? 日本語 🙂", "reasoning": "2 × 3 = 6 — ✓", "assistant": "6"},
        {"user": "the user typed <|im_end|>", "reasoning": "plain text", "assistant": "ok"},
    ]


def test_only_the_first_ten_offending_rows_are_named(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [CHAT_ROW] + [{"user": ""}] * 25)
    report = load_rows(local(path)).report
    assert report.skipped == {"empty field 'user'": 25}
    assert len(report.first_offending) == 10
    assert report.first_offending[-1] == f"{path}:11: empty field 'user'"


def test_malformed_json_line_stops_with_file_and_line():
    path = FIXTURES / "broken.jsonl"
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON \(Expecting ',' delimiter, column 52\)"):
        load_rows(local(path))


@pytest.mark.parametrize(
    ("extra", "problem"),
    [("7" * 5000, "Exceeds the limit"), ("[" * 5000 + "]" * 5000, "recursion")],
    ids=["a 5,000-digit number", "arrays nested 5,000 deep"],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_python_cannot_read_stops_with_file_and_line(tmp_path, extra, problem, suffix):
    """Valid JSON beyond Python's limits, even in a field the rows do not use, is an error naming the
    line, not a traceback."""
    path = tmp_path / f"rows{suffix}"
    path.write_text(json.dumps(CHAT_ROW) + "\n" + json.dumps(CHAT_ROW)[:-1] + f', "id": {extra}}}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: unreadable JSON \(.*{problem}"):
        load_rows(local(path))


def test_a_json_file_holding_one_object_says_what_a_data_file_holds(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [CHAT_ROW]}, indent=2))
    with pytest.raises(DataError, match=r"rows.json is one JSON document, not rows: .* an array of rows"):
        load_rows(local(path))


def test_invalid_utf8_stops_with_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(CHAT_ROW).encode() + b"\n" + '{"user": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        load_rows(local(path))


def test_huge_row_is_read_whole(tmp_path):
    reasoning = "step " * 300_000  # 1.5 MB on one line
    path = write_jsonl(tmp_path / "huge.jsonl", [CHAT_ROW, {**CHAT_ROW, "reasoning": reasoning}])
    loaded = load_rows(local(path))
    assert loaded.report.rows_kept == 2
    assert loaded.train[1]["reasoning"] == reasoning


def test_byte_order_mark_and_windows_line_endings(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(CHAT_ROW).encode() + b"\r\n" + json.dumps(CHAT_ROW).encode()
    )
    assert load_rows(local(path)).train == [CHAT_ROW, CHAT_ROW]


def test_json_array_rows_are_located_by_index():
    path = FIXTURES / "rows.json"
    loaded = load_rows(local(path))
    assert [r["user"] for r in loaded.train] == ["q1", "q3"]
    assert loaded.report.first_offending == [f"{path}[1]: non-string field 'user' (int)"]


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"user": "q", "reasoning": "r", "assistant": "a"},\n  {"user": }\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        load_rows(local(path))


def test_no_usable_rows_is_an_error_with_the_summary(tmp_path):
    path = write_jsonl(tmp_path / "empty_fields.jsonl", [{"user": "", "reasoning": "r", "assistant": "a"}])
    with pytest.raises(DataError, match=r"no usable rows .* read 1 rows, kept 0, skipped 1 \(empty field"):
        load_rows(local(path))


# --- file discovery -------------------------------------------------------------------------


def test_directories_and_globs_read_every_data_file_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{**CHAT_ROW, "user": "b"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{**CHAT_ROW, "user": "c"}])
    write_jsonl(tmp_path / "a.jsonl", [{**CHAT_ROW, "user": "a"}])
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "x.jsonl", [{**CHAT_ROW, "user": "hidden"}])
    assert [r["user"] for r in load_rows(local(tmp_path)).train] == ["a", "b", "c"]
    assert [r["user"] for r in load_rows(local(tmp_path / "*.jsonl")).train] == ["a", "b"]
    assert [r["user"] for r in load_rows(local(f"{tmp_path}/**/*.jsonl")).train] == ["a", "b", "c"]
    # A file whose name holds glob characters is that file.
    write_jsonl(tmp_path / "qa[1].jsonl", [{**CHAT_ROW, "user": "bracketed"}])
    assert [r["user"] for r in load_rows(local(tmp_path / "qa[1].jsonl")).train] == ["bracketed"]


def test_a_directory_follows_its_links_once_and_names_the_files_it_leaves_out(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    write_jsonl(shared / "s.jsonl", [{**CHAT_ROW, "user": "linked"}])
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "own.jsonl", [{**CHAT_ROW, "user": "own"}])
    (data / "linked").symlink_to(shared)
    (data / "again").symlink_to(shared)  # the same directory twice: read once
    (shared / "loop").symlink_to(data)  # a cycle: not followed around
    (data / "own-again.jsonl").symlink_to(data / "own.jsonl")  # one file by two names: read once
    (data / "more.jsonl.gz").write_bytes(b"")
    (data / "table.csv").write_text("user,reasoning,assistant\n")
    assert sorted(r["user"] for r in load_rows(local(data)).train) == ["linked", "own"]
    assert "left out 2 others: more.jsonl.gz, table.csv" in caplog.text


@pytest.mark.parametrize(
    ("names", "splits"),
    [
        (("train.jsonl", "val.jsonl"), 2),
        (("qa_train.jsonl", "qa_test.jsonl"), 2),
        (("training/a.jsonl", "eval/b.jsonl"), 2),
        (("data/part-train-0.jsonl", "data/part-dev-0.jsonl"), 2),
        (("data/math-00000-of-00001.jsonl", "data/code-00000-of-00001.jsonl"), 2),  # any split's name
        (("TRAIN.jsonl", "Evaluation.jsonl"), 1),  # datasets' names are lower case
        (("interval.jsonl", "retrain.jsonl", "contest.jsonl", "devices.jsonl", "train.jsonl"), 1),
    ],
)
def test_a_directory_is_one_split_or_several_as_datasets_reads_it(tmp_path, names, splits):
    """Where `datasets` itself sees several splits, reading the directory whole would train on the
    held-out rows: refused. Where it sees one, every file is read."""
    from datasets.data_files import get_data_patterns

    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / name, [CHAT_ROW])
    assert len(get_data_patterns(str(tmp_path))) == splits
    if splits > 1:
        with pytest.raises(DataError, match="holds several splits"):
            load_rows(local(tmp_path))
    else:
        assert len(load_rows(local(tmp_path)).train) == len(names)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.jsonl", "data path .*missing.jsonl does not exist"),
        ("data.csv", r"unsupported file type '.csv'; expected .json, .jsonl, .parquet"),
        ("*.nothing", "no .json, .jsonl, .parquet files match"),
    ],
)
def test_unusable_paths_are_clear_errors(tmp_path, name, message):
    (tmp_path / "data.csv").write_text("user,reasoning,assistant\n")
    with pytest.raises(DataError, match=message):
        load_rows(local(tmp_path / name))


def test_unknown_source_is_a_config_error():
    with pytest.raises(
        ConfigError, match="unknown data source 'ftp'; choose one of: synthetic, hub, local, text"
    ):
        load_rows(DataConfig(source="ftp"))


# --- datasets: parquet, the hub layout, save_to_disk -------------------------------------------


def hub_like_rows(n: int) -> list[dict]:
    """Rows with the real dataset's columns: user, reasoning, assistant, template, conversations."""
    return [
        {
            "user": f"question {i}",
            "reasoning": f"thinking about {i}",
            "assistant": f"answer {i}",
            "template": f"<|im_start|>user\nquestion {i}...",
            "conversations": [
                {"from": "human", "value": f"question {i}"},
                {"from": "gpt", "value": f"answer {i}"},
            ],
        }
        for i in range(n)
    ]


def test_parquet_file(tmp_path, offline_hf):
    import datasets

    rows = hub_like_rows(4)
    rows[2]["assistant"] = None
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    loaded = load_rows(local(path))
    assert [r["user"] for r in loaded.train] == ["question 0", "question 1", "question 3"]
    assert set(loaded.train[0]) == {"user", "reasoning", "assistant"}
    assert loaded.report.first_offending == [f"{path}[2]: missing field 'assistant'"]


def test_parquet_without_a_needed_column_names_it(tmp_path, offline_hf):
    import datasets

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"user": "q", "answer": "a"}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"has no column 'reasoning', 'assistant' \(it has: user, answer\)"):
        load_rows(local(path))


def test_parquet_is_read_as_it_is_now_and_may_be_empty(tmp_path):
    """No cache keyed by path and modification time: a file rewritten in place with its old time
    kept (`cp -p`, rsync, tar) reads anew; an empty shard beside a full one is no error."""
    import os

    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "part-0.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([CHAT_ROW] * 14), path)
    assert len(load_rows(local(path)).train) == 14
    stat = path.stat()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([CHAT_ROW] * 3), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(load_rows(local(path)).train) == 3
    empty = pyarrow.Table.from_pylist([], schema=pyarrow.Table.from_pylist([CHAT_ROW]).schema)
    pyarrow.parquet.write_table(empty, tmp_path / "part-1.parquet")
    assert len(load_rows(local(tmp_path)).train) == 3


def test_corrupt_parquet_is_a_clear_error(tmp_path, offline_hf):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"rows.parquet: cannot read it as parquet"):
        load_rows(local(path))


def test_hub_path_on_a_local_copy_in_the_hub_layout(tmp_path, offline_hf):
    import datasets

    rows = hub_like_rows(6)
    rows[4]["reasoning"] = ""
    copy = tmp_path / "reasoning-base-20k"
    (copy / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(copy / "data" / "train-00000-of-00001.parquet"))
    loaded = load_rows(DataConfig(source="hub", path=str(copy), split="train"))
    assert loaded.train == [
        {k: r[k] for k in ("user", "reasoning", "assistant")} for i, r in enumerate(rows) if i != 4
    ]
    assert loaded.report.first_offending == ["train[4]: empty field 'reasoning'"]
    assert loaded.val is None
    # The same directory works as a local source too.
    assert load_rows(local(copy)).train == loaded.train
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_rows(DataConfig(source="hub", path=str(copy), split="validation"))
    # With a test split beside it, reading the whole directory would train on the test rows: the local
    # source refuses and names the hub source, which reads one split.
    datasets.Dataset.from_list(hub_like_rows(2)).to_parquet(
        str(copy / "data" / "test-00000-of-00001.parquet")
    )
    with pytest.raises(
        DataError, match=f"several splits \\(test, train\\).*data.source=hub data.path={copy}"
    ):
        load_rows(local(copy))
    assert load_rows(DataConfig(source="hub", path=str(copy), split="train")).train == loaded.train
    with pytest.raises(DataError, match="or the split's files: ") as info:  # what eval --data can use
        load_rows(local(copy))
    assert load_rows(local(str(info.value).split("or the split's files: ")[1])).train == loaded.train
    # A text corpus in that layout is told to name its split's files, and that path reads them alone.
    corpus = tmp_path / "corpus" / "data"
    corpus.mkdir(parents=True)
    for split in ("train", "test"):
        rows = [{"text": f"{split} document {i}"} for i in range(3)]
        datasets.Dataset.from_list(rows).to_parquet(str(corpus / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(DataError, match="several splits") as info:
        load_rows(DataConfig(source="text", path=str(corpus.parent)))
    fix = str(info.value).split("read one with ")[1]
    assert fix == f'data.path="{corpus}/train*"'
    read = load_rows(DataConfig(source="text", path=fix.split("=", 1)[1].strip('"'))).train
    assert sorted(r["text"] for r in read) == [f"train document {i}" for i in range(3)]


def test_hub_path_on_a_save_to_disk_directory(tmp_path, offline_hf):
    import datasets

    rows = hub_like_rows(3)
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(rows[:1])
    ).save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows(DataConfig(source="hub", path=str(tmp_path / "saved"))).train) == 3
    assert len(load_rows(DataConfig(source="local", path=str(tmp_path / "saved"), split="test")).train) == 1
    with pytest.raises(DataError, match="has no split 'dev'; it has: train, test"):
        load_rows(DataConfig(source="hub", path=str(tmp_path / "saved"), split="dev"))


def test_unreachable_hub_says_how_to_use_a_local_copy(offline_hf):
    with pytest.raises(DataError) as info:
        load_rows(DataConfig(source="hub", path="KingNish/reasoning-base-20k"))
    message = str(info.value)
    assert message.startswith("cannot reach the Hugging Face hub for KingNish/reasoning-base-20k")
    assert "data.source=hub data.path=DIR" in message


def test_hub_source_on_a_file_or_a_directory_with_a_bad_line_says_which(tmp_path, offline_hf):
    path = write_jsonl(tmp_path / "rows.jsonl", [CHAT_ROW])
    with pytest.raises(DataError, match=f"rows.jsonl is a file; .* data.source=local data.path={path}$"):
        load_rows(DataConfig(source="hub", path=str(path)))
    (tmp_path / "copy" / "data").mkdir(parents=True)
    for bad, problem in (("{broken", "2: malformed JSON"), ("[1, 2]", "2: not an object")):
        (tmp_path / "copy/data/train.jsonl").write_text(json.dumps(CHAT_ROW) + "\n" + bad + "\n")
        with pytest.raises(DataError, match=f"cannot load dataset .*copy/data/train.jsonl:{problem}"):
            load_rows(DataConfig(source="hub", path=str(tmp_path / "copy")))


def test_missing_local_hub_directory(tmp_path, offline_hf):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(DataConfig(source="hub", path=str(tmp_path / "nowhere")))


# --- plain text ---------------------------------------------------------------------------------


def test_text_files_split_on_endoftext_and_count_empty_documents():
    path = FIXTURES / "corpus.txt"
    loaded = load_rows(DataConfig(source="text", path=str(path)))
    assert loaded.train == [{"text": "Once upon a time."}, {"text": "Second story."}, {"text": "Third."}]
    assert loaded.report.skipped == {"empty field 'text'": 1}
    assert loaded.report.first_offending == [f"{path}[2]: empty field 'text'"]


def test_text_jsonl_needs_a_text_field(tmp_path):
    path = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": "a document"}, {"content": "wrong key"}, {"text": 3}]
    )
    loaded = load_rows(DataConfig(source="text", path=str(path)))
    assert loaded.train == [{"text": "a document"}]
    assert loaded.report.skipped == {"missing field 'text'": 1, "non-string field 'text'": 1}


def test_a_txt_file_without_separators_is_one_document(tmp_path):
    (tmp_path / "book.txt").write_text("Chapter one.\n\nIt was a dark night.\n")
    assert load_rows(DataConfig(source="text", path=str(tmp_path))).train == [
        {"text": "Chapter one.\n\nIt was a dark night."}
    ]


# --- synthetic --------------------------------------------------------------------------------------


def test_synthetic_rows_come_with_a_held_out_test_split():
    from reasoning_llama.tasks import generate_examples

    cfg = DataConfig(synthetic_train_size=30, synthetic_val_size=9, seed=7)
    loaded = load_rows(cfg)
    expected_train = [e.as_row() for e in generate_examples(None, 30, split="train", seed=7)]
    expected_val = [e.as_row() for e in generate_examples(None, 9, split="test", seed=7)]
    assert loaded.train == expected_train
    assert loaded.val == expected_val
    assert not {r["user"] for r in loaded.train} & {r["user"] for r in loaded.val}
    assert all(r["family"] for r in loaded.train)
    assert (loaded.report.rows_read, loaded.report.rows_kept) == (39, 39)


def test_synthetic_families_and_errors():
    loaded = load_rows(DataConfig(families=["sort_digits"], synthetic_train_size=4, synthetic_val_size=2))
    assert {r["family"] for r in loaded.train + loaded.val} == {"sort_digits"}
    with pytest.raises(ConfigError, match="synthetic data: unknown synthetic task family 'nope'"):
        load_rows(DataConfig(families=["nope"], synthetic_train_size=4))
