"""Where training rows come from, selected by `DataConfig.source`.

- synthetic: the built-in verifiable tasks (`reasoning_llama.tasks`), with their own test split;
- hub: `datasets.load_dataset(path, split=split)`, a hub name or a local directory in the hub's
  file layout or saved with `save_to_disk`;
- local: .json, .jsonl or .parquet files (a file, a directory or a glob) with user/reasoning/assistant;
- text: plain-text corpora for pretraining, .txt files (documents separated by a literal
  `<|endoftext|>`) or .json/.jsonl/.parquet rows with a `text` field.

Every row passes through `ValidationReport.check`: unusable rows are skipped and counted, a
malformed JSON line stops with its file and line number.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasoning_llama.config import DataConfig
from reasoning_llama.data.validation import CHAT_FIELDS, TEXT_FIELDS, ValidationReport
from reasoning_llama.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "hub", "local", "text")
CHAT_SUFFIXES = (".json", ".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
DOCUMENT_SEPARATOR = "<|endoftext|>"


@dataclass
class LoadedRows:
    """Validated rows of a source; `val` is None when the source has no held-out split."""

    train: list[dict[str, str]]
    val: list[dict[str, str]] | None
    report: ValidationReport
    description: str  # what was read, for reports


def load_rows(cfg: DataConfig) -> LoadedRows:
    """Read and validate the rows `cfg` selects; a DataError when nothing usable is left."""
    if cfg.source == "synthetic":
        loaded = _load_synthetic(cfg)
    elif cfg.source == "hub":
        report = ValidationReport()
        train = _dataset_rows(_load_hub_split(cfg.path, cfg.split), CHAT_FIELDS, report, cfg.split)
        loaded = LoadedRows(train, None, report, f"hub {cfg.path} (split {cfg.split})")
    elif cfg.source in ("local", "text"):
        loaded = _load_files(cfg)
    else:
        raise ConfigError(f"unknown data source {cfg.source!r}; choose one of: {', '.join(SOURCES)}")
    if not loaded.train:
        raise DataError(f"no usable rows in {loaded.description}: {loaded.report.summary()}")
    return loaded


# --- synthetic -----------------------------------------------------------------------


def _load_synthetic(cfg: DataConfig) -> LoadedRows:
    from reasoning_llama.tasks import families_or_default, generate_examples

    families = families_or_default(cfg.families)
    splits = {}
    try:
        for split, size in (("train", cfg.synthetic_train_size), ("test", cfg.synthetic_val_size)):
            examples = generate_examples(
                families, size, split=split, seed=cfg.seed, difficulty=cfg.difficulty
            )
            splits[split] = [example.as_row() for example in examples]
    except ValueError as e:
        raise ConfigError(f"synthetic data: {e}") from None
    report = ValidationReport()
    train = _checked(splits["train"], CHAT_FIELDS, report, "synthetic-train")
    val = _checked(splits["test"], CHAT_FIELDS, report, "synthetic-test")
    description = (
        f"synthetic {','.join(families)} ({len(train)} train + {len(val)} test problems, "
        f"difficulty {cfg.difficulty if cfg.difficulty is not None else 'default'}, seed {cfg.seed})"
    )
    return LoadedRows(train, val, report, description)


def _checked(rows: Iterable[Any], fields: tuple[str, ...], report: ValidationReport, name: str) -> list:
    kept = (report.check(row, fields, f"{name}[{i}]") for i, row in enumerate(rows))
    return [row for row in kept if row is not None]


# --- Hugging Face datasets -------------------------------------------------------------


def _hub_unreachable(name: str, cause: BaseException) -> DataError:
    return DataError(
        f"cannot reach the Hugging Face hub for {name} ({type(cause).__name__}); download it elsewhere "
        f"(e.g. `hf download --repo-type dataset {name} --local-dir DIR`, or "
        f"`datasets.load_dataset('{name}').save_to_disk(DIR)`), copy DIR here and pass "
        "data.source=hub data.path=DIR (it reads data.split of it)"
    )


def _load_hub_split(path: str, split: str) -> Any:
    """One split of a hub dataset, a local directory in the hub's layout, or a `save_to_disk` directory."""
    import datasets

    local = Path(path).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        return _load_saved_split(local, split)
    if not local.exists() and path.startswith(("/", ".", "~")):
        raise DataError(f"data path {path} does not exist")
    if local.is_file():
        raise DataError(
            f"{path} is a file; data.source=hub reads a hub dataset or a directory of one. Read a file "
            f"with data.source=local data.path={path}"
        )
    name = str(local) if local.exists() else path
    try:
        # Offline when the hub does not answer: a copy in the local cache still loads; else one quick
        # ConnectionError.
        with nullcontext() if local.exists() or _hub_answers(path) else _hub_offline():
            return datasets.load_dataset(name, split=split)
    except (ConnectionError, TimeoutError) as e:
        raise _hub_unreachable(path, e) from None
    except FileNotFoundError as e:  # includes datasets' DatasetNotFoundError
        raise DataError(f"dataset {path} not found ({e}); check data.path") from None
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{path} has no split {split!r} ({e}); set data.split") from None
        raise DataError(f"cannot load dataset {path}: {e}") from None
    except datasets.exceptions.DatasetsError as e:
        where = _first_unreadable_row(local) if local.is_dir() else None
        raise DataError(f"cannot load dataset {path}: {where or e}") from None


def _first_unreadable_row(directory: Path) -> str | None:
    """Where a directory's JSON data files hold a line `datasets` cannot read (it says only that one
    failed): a malformed line, or a row that is no object."""
    from datasets.data_files import FILES_TO_IGNORE

    files = [
        f
        for f in _files_under(directory)
        if f.suffix.lower() in (".json", ".jsonl") and f.name not in FILES_TO_IGNORE
    ]
    for file in files:
        report = ValidationReport()
        try:
            read_file(file, (), report)
        except DataError as e:
            if str(e).startswith(f"{file}:"):  # a line of it, not the file as a whole
                return str(e)
            continue
        if report.skipped:
            return f"{report.first_offending[0]}; fix it, or read the files with data.source=local"
    return None


def _hub_answers(name: str) -> bool:
    """Whether the hub answers a question about `name`, asked once, without retries.

    `datasets` retries an unreachable hub for about 25 s before it gives up; one request first
    tells the unreachable case apart in well under a second.
    """
    import datasets
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=10)
    except (HfHubHTTPError, HFValidationError):  # an answer (not found, gated) or a name it would
        return True  # refuse: load_dataset says which
    except Exception:  # no answer at all: DNS, refused, timed out, a proxy's failure (whatever HTTP
        return False  # library huggingface_hub uses: httpx, its fork httpx2, or requests)
    return True


@contextmanager
def _hub_offline() -> Iterator[None]:
    """`datasets` and `huggingface_hub` in offline mode for the duration, as HF_HUB_OFFLINE=1 sets."""
    import datasets
    import huggingface_hub

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _load_saved(directory: Path) -> Any:
    """A `save_to_disk` directory: a Dataset or a DatasetDict."""
    import datasets

    try:
        return datasets.load_from_disk(str(directory))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise DataError(f"cannot load the saved dataset in {directory}: {e}") from None


def _load_saved_split(directory: Path, split: str) -> Any:
    import datasets

    saved = _load_saved(directory)
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(
                f"{directory} has no split {split!r}; it has: {', '.join(saved)} (set data.split)"
            )
        return saved[split]
    return saved


def _dataset_rows(dataset: Any, fields: tuple[str, ...], report: ValidationReport, name: str) -> list:
    """Validated rows of a `datasets.Dataset` or a `pyarrow.Table`; other columns (e.g. `template`,
    `conversations`) are ignored."""
    columns = dataset.column_names
    missing = [f for f in fields if f not in columns]
    if missing:
        raise DataError(
            f"{name} has no column {', '.join(map(repr, missing))} (it has: {', '.join(columns)}); "
            f"expected {', '.join(fields)}"
        )
    wanted = [*fields, *(["family"] if "family" in columns else [])]
    if hasattr(dataset, "to_pylist"):  # a pyarrow.Table
        return _checked(dataset.select(wanted).to_pylist(), fields, report, name)
    return _checked(dataset.select_columns(wanted).to_list(), fields, report, name)


# --- local files -------------------------------------------------------------------------


def _load_files(cfg: DataConfig) -> LoadedRows:
    fields, suffixes = (TEXT_FIELDS, TEXT_SUFFIXES) if cfg.source == "text" else (CHAT_FIELDS, CHAT_SUFFIXES)
    report = ValidationReport()
    directory = Path(cfg.path).expanduser()
    if directory.is_dir() and _is_saved_dataset(directory):
        rows = _dataset_rows(_load_saved_split(directory, cfg.split), fields, report, cfg.split)
        return LoadedRows(rows, None, report, f"{cfg.source} {cfg.path} (saved dataset, split {cfg.split})")
    files = resolve_files(cfg.path, suffixes)
    if directory.is_dir():
        if cfg.source == "local":  # the hub source reads one split of a chat dataset by its name
            refuse_several_splits(
                directory,
                files,
                lambda name, spec: (
                    f"data.source=hub data.path={directory} data.split={name}, or the split's files: {spec}"
                ),
            )
        else:
            refuse_several_splits(directory, files, lambda _, spec: f'data.path="{spec}"')
    rows: list[dict[str, str]] = []
    for file in files:
        rows += read_file(file, fields, report)
    what = files[0] if len(files) == 1 else f"{cfg.path} ({len(files)} files)"
    return LoadedRows(rows, None, report, f"{cfg.source} {what}")


# A file of one split in the hub's layout, by the split names `datasets` itself recognises (its
# `data_files.SPLIT_KEYWORDS` between separators, case as written, and `data/NAME-00000-of-00001.*`
# shards of any split's name): `data/train-00000-of-00001.parquet`, `test/part.jsonl`, `qa_val.jsonl`,
# `eval.json`, `data/math-00000-of-00002.parquet`, ...
_SPLIT_OF_KEYWORD = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("validation", "valid", "dev", "val"), "validation"),
    **dict.fromkeys(("test", "testing", "eval", "evaluation"), "test"),
}
_SPLIT_FILE = re.compile(
    rf"(?:^|(?<=[-._ 0-9/]))({'|'.join(sorted(_SPLIT_OF_KEYWORD, key=len, reverse=True))})(?=[-._ 0-9/])"
)
_SHARD_OF_SPLIT = re.compile(r"(?:^|/)data/([^/]+?)(?=-\d{5}-of-\d{5}[^/]*\.[^/]+$)")


def _split_of(relative: str) -> tuple[str, str] | None:
    """(split, the path up to its name) of a file's path inside a dataset directory, if it names one."""
    shard = _SHARD_OF_SPLIT.search(relative)
    if shard:
        return _SPLIT_OF_KEYWORD.get(shard.group(1), shard.group(1)), relative[: shard.end()]
    found = _SPLIT_FILE.search(relative)
    return (_SPLIT_OF_KEYWORD[found.group(1)], relative[: found.end()]) if found else None


def refuse_several_splits(
    directory: Path, files: list[Path], read_one_with: Callable[[str, str], str]
) -> None:
    """A directory in the hub's layout holds its splits side by side: reading all of it would train on
    the test split. `read_one_with(split, files)` says how the command reads one split instead."""
    first_of: dict[str, str] = {}  # split -> the path of its first file, up to the split's name
    for file in files:
        found = _split_of(file.relative_to(directory).as_posix())
        if found:
            first_of.setdefault(*found)
    if len(first_of) > 1:
        # `train/…` is a directory of the split, `train-0000.parquet` a prefix of its files.
        name = "train" if "train" in first_of else next(iter(first_of))
        split = directory / first_of[name]
        raise DataError(
            f"{directory} holds several splits ({', '.join(sorted(first_of))}) in the hub's layout; read one "
            f"with {read_one_with(name, str(split) if split.is_dir() else f'{split}*')}"
        )


def resolve_files(spec: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The data files named by a file, a directory (searched recursively) or a glob, in sorted order."""
    kinds = ", ".join(suffixes)
    expanded = str(Path(spec).expanduser())
    # A path that exists is itself, even with glob characters in its name (`qa[1].jsonl`).
    if any(c in expanded for c in "*?[") and not Path(expanded).exists():
        files = sorted(
            Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).suffix.lower() in suffixes
        )
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"no {kinds} files match {spec}")
        return files
    path = Path(expanded)
    if path.is_dir():
        found = _files_under(path)
        files = [p for p in found if p.suffix.lower() in suffixes]
        others = [p.relative_to(path).as_posix() for p in found if p.suffix.lower() not in suffixes]
        if not files:
            raise DataError(f"no {kinds} files in directory {spec}")
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            _warn_once(f"{spec}: reading its {kinds} files; left out {len(others)} others: {shown}")
        return files
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise DataError(f"{spec}: unsupported file type {path.suffix or '(none)'!r}; expected {kinds}")
        return [path]
    raise DataError(f"data path {spec} does not exist; give an existing file, directory or glob")


@functools.cache
def _warn_once(message: str) -> None:
    """A warning said once a process (a command may read the same directory twice)."""
    log.warning("%s", message)


def _files_under(directory: Path) -> list[Path]:
    """Every file under `directory`, through linked directories too (each real one once), in sorted
    order; hidden files and directories (`.git`, `.DS_Store`, ...) are not data."""
    seen, files = set(), {}  # real paths of the directories walked; a file's real path -> its path here
    for root, subdirectories, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to the same directory
            subdirectories.clear()
            continue
        seen.add(real)
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))  # walked in order
        for name in sorted(names):
            path = Path(root, name)
            if not name.startswith(".") and path.is_file():
                files.setdefault(os.path.realpath(path), path)
    return sorted(files.values())


ANSWER_FIELDS = ("user", "assistant")


def read_rows(data: str, fields: tuple[str, ...], report: ValidationReport) -> list[dict[str, str]]:
    """Rows with `fields` of a file, a directory of one split (files, or a `save_to_disk` dataset), or a
    glob, as a command's `--data` names them: what `rl --data` practises (ANSWER_FIELDS) and
    `eval --data` scores; skipped rows are counted in `report`."""
    directory = Path(data).expanduser()
    if directory.is_dir() and _is_saved_dataset(directory):
        return _dataset_rows(_saved_split_named_by_path(directory), fields, report, str(directory))
    files = resolve_files(data, CHAT_SUFFIXES)
    if directory.is_dir():
        refuse_several_splits(directory, files, lambda _, spec: f'--data "{spec}"')
    return [row for path in files for row in read_file(path, fields, report)]


def _saved_split_named_by_path(directory: Path) -> Any:
    """A `save_to_disk` dataset, or the one split of a saved DatasetDict (several: name one by its path)."""
    import datasets

    saved = _load_saved(directory)
    if not isinstance(saved, datasets.DatasetDict):
        return saved
    if len(saved) > 1:
        first = "train" if "train" in saved else next(iter(saved))
        raise DataError(
            f"{directory} holds several splits ({', '.join(saved)}); read one with --data "
            f'"{directory / first}"'
        )
    return next(iter(saved.values()))


def read_file(path: Path, fields: tuple[str, ...], report: ValidationReport) -> list[dict[str, str]]:
    """Validated rows of one file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _dataset_rows(_load_parquet(path), fields, report, str(path))
    if suffix == ".txt":
        return _read_text_documents(path, report)
    if suffix == ".json" and _first_character(path) == "[":
        return _read_json_array(path, fields, report)
    return _read_json_lines(path, fields, report)


def _load_parquet(path: Path) -> Any:
    """The file's table, read as it is now: no cache keyed by path and modification time to go stale."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read it as parquet ({e})") from None


def _first_character(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="ignore").lstrip()
    return head[:1]


def _read_json_lines(path: Path, fields: tuple[str, ...], report: ValidationReport) -> list:
    """One JSON object per line; blank lines are not rows. A broken line stops with its number."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not valid UTF-8 (byte {e.start} of the line); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                if number == 1 and _is_one_json_document(path):
                    rows_are = (
                        'an array of rows ([{"user": ...}, ...]) or JSON Lines (one row per line)'
                        if path.suffix.lower() == ".json"
                        else "JSON Lines, one row per line (an array of rows belongs in a .json file)"
                    )
                    raise DataError(
                        f"{path} is one JSON document, not rows: a {path.suffix} data file is {rows_are}"
                    ) from None
                raise DataError(
                    f"{path}:{number}: malformed JSON ({e.msg}, column {e.pos + 1}); fix or remove that line"
                ) from None
            except (ValueError, RecursionError) as e:  # a 5,000-digit number, objects nested 1,000 deep
                raise DataError(f"{path}:{number}: unreadable JSON ({e}); fix or remove that line") from None
            row = report.check(value, fields, f"{path}:{number}")
            if row is not None:
                rows.append(row)
    return rows


def _is_one_json_document(path: Path) -> bool:
    """Whether the whole file parses as JSON (a pretty-printed object, say), though its lines do not."""
    try:
        json.loads(_read_utf8(path))
    except (ValueError, RecursionError, DataError):
        return False
    return True


def _read_json_array(path: Path, fields: tuple[str, ...], report: ValidationReport) -> list:
    """A JSON array of objects; rows are located as file[index]."""
    text = _read_utf8(path)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from None
    return _checked(values, fields, report, str(path))


def _read_text_documents(path: Path, report: ValidationReport) -> list:
    """Documents of a .txt file, separated by a literal <|endoftext|> (one document when there is none)."""
    documents = _read_utf8(path).split(DOCUMENT_SEPARATOR)
    if len(documents) > 1 and not documents[-1].strip():
        documents.pop()  # text after the last separator is not a document
    return _checked(({"text": d.strip()} for d in documents), TEXT_FIELDS, report, str(path))


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; save the file as UTF-8") from None
