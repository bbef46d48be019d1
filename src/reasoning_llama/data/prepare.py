"""Rows -> token ids and loss masks, once: render, tokenize, fit to the context, cache on disk.

The cache file is an uncompressed .npz (no pickle) named by a hash of the rows' content,
the tokenizer and the settings that change the ids, so any change in data or settings
misses it and an unchanged rerun skips tokenization.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from reasoning_llama import atomic
from reasoning_llama.config import DataConfig
from reasoning_llama.data.packing import best_fit_pack
from reasoning_llama.data.sources import load_rows
from reasoning_llama.errors import ConfigError, DataError
from reasoning_llama.tokenizer import EOT, ChatTokenizer
from reasoning_llama.user_cache import user_cache_dir

log = logging.getLogger(__name__)

PREPARATION_VERSION = 1  # bump when the stored arrays change meaning
OVERLONG_POLICIES = ("truncate", "drop")
COUNTERS = ("truncated", "dropped_overlong", "dropped_no_target", "chunked_documents")


@dataclass
class TokenizedSplit:
    """Tokenized examples with their loss masks and the raw row each came from."""

    ids: list[np.ndarray]  # int32, one array per example
    loss_mask: list[np.ndarray]  # bool, loss_mask[i] = token i is a training target
    rows: list[dict[str, str]] = field(default_factory=list)  # rows[i]: the source row of example i
    families: list[str | None] | None = None  # synthetic task family of each example

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.ids], dtype=np.int64)


@dataclass
class PreparedData:
    train: TokenizedSplit
    val: TokenizedSplit
    stats: dict[str, Any]


def prepare_data(
    cfg: DataConfig, tokenizer: ChatTokenizer, *, progress: bool = True, use_cache: bool = True
) -> PreparedData:
    """Load, validate, split, tokenize (or read the cache) and describe the data `cfg` selects."""
    check_settings(cfg)
    loaded = load_rows(cfg)
    if loaded.report.rows_skipped:
        log.warning("data: %s", loaded.report.summary())
    train_rows, val_rows = loaded.train, loaded.val
    if val_rows is None:
        train_rows, val_rows = split_rows(train_rows, cfg.val_fraction, cfg.seed)
    splits = {"train": train_rows, "val": val_rows}

    key = cache_key(cfg, tokenizer, splits)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else user_cache_dir("data")
    path = cache / f"{key}.npz"
    arrays = _read_cache(path) if use_cache else None
    hit, written = arrays is not None, False
    if arrays is None:
        arrays = {}
        for name, rows in splits.items():
            arrays |= {
                f"{name}/{k}": v for k, v in tokenize_rows(rows, tokenizer, cfg, name, progress).items()
            }
        written = use_cache and _write_cache(path, arrays)

    prepared = {name: _split_from_arrays(arrays, name, rows) for name, rows in splits.items()}
    stats: dict[str, Any] = {
        "source": loaded.description,
        "seq_len": cfg.seq_len,
        "max_example_tokens": cfg.seq_len + 1,
        "overlong": cfg.overlong,
        "validation": loaded.report.to_dict(),
        # path: where the data is cached (None: not cached, switched off or not writable)
        "cache": {"hit": hit, "path": str(path) if hit or written else None},
    }
    for name in splits:
        stats[name] = _split_stats(arrays, name, len(splits[name]), cfg.seq_len)
        _warn_about_fitting(name, stats[name], cfg)
    stats["packing"] = packing_stats(prepared["train"], cfg.seq_len, cfg.seed)
    return PreparedData(prepared["train"], prepared["val"], stats)


def check_settings(cfg: DataConfig) -> None:
    if cfg.seq_len < 1:
        raise ConfigError(f"data.seq_len must be positive, got {cfg.seq_len}")
    if cfg.overlong not in OVERLONG_POLICIES:
        raise ConfigError(
            f"data.overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {cfg.overlong!r}"
        )
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {cfg.val_fraction}")
    if cfg.source == "synthetic" and (cfg.synthetic_train_size < 1 or cfg.synthetic_val_size < 0):
        raise ConfigError(
            "data.synthetic_train_size must be >= 1 and data.synthetic_val_size >= 0, got "
            f"{cfg.synthetic_train_size} and {cfg.synthetic_val_size}"
        )
    if cfg.source == "synthetic" and cfg.path != DataConfig.path:
        # The synthetic tasks read no file: training on them instead of the user's would pass unseen.
        raise ConfigError(
            f"data.path is {cfg.path} but data.source is synthetic, which reads no file; set "
            "data.source=local for your own rows (text: a plain-text corpus, hub: a dataset name)"
        )


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded train/validation split (order within each part kept); at least one row each when asked."""
    n_val = round(len(rows) * val_fraction)
    if val_fraction > 0 and len(rows) > 1:
        n_val = min(max(1, n_val), len(rows) - 1)
    chosen = np.zeros(len(rows), dtype=np.bool_)
    chosen[np.random.default_rng(seed).permutation(len(rows))[:n_val]] = True
    return [r for r, c in zip(rows, chosen, strict=True) if not c], [
        r for r, c in zip(rows, chosen, strict=True) if c
    ]


# --- tokenization --------------------------------------------------------------------------


def tokenize_rows(
    rows: list[dict[str, str]], tokenizer: ChatTokenizer, cfg: DataConfig, name: str, progress: bool
) -> dict[str, np.ndarray]:
    """Flat arrays of one split: tokens, mask, example offsets and source rows, full lengths, counters."""
    limit = cfg.seq_len + 1  # an example of n tokens fills n - 1 positions of a row
    render = _text_renderer(tokenizer) if cfg.source == "text" else _chat_renderer(tokenizer, cfg)
    pieces_ids, pieces_mask, sources, full_lengths = [], [], [], []
    counts = dict.fromkeys(COUNTERS, 0)
    for index, row in enumerate(tqdm(rows, desc=f"tokenizing {name}", unit=" rows", disable=not progress)):
        ids, mask = render(row)
        full_lengths.append(len(ids))
        if cfg.source == "text":
            pieces = _chunks(ids, mask, limit)
            counts["chunked_documents"] += len(pieces) > 1
        elif len(ids) <= limit:
            pieces = [(ids, mask)]
        elif not any(mask[1:limit]):
            counts["dropped_no_target"] += 1  # the prompt alone fills the context, whatever the policy
            continue
        elif cfg.overlong == "drop":
            counts["dropped_overlong"] += 1
            continue
        else:
            counts["truncated"] += 1
            pieces = [(ids[:limit], mask[:limit])]
        for piece_ids, piece_mask in pieces:
            pieces_ids.append(np.asarray(piece_ids, dtype=np.int32))
            pieces_mask.append(np.asarray(piece_mask, dtype=np.bool_))
            sources.append(index)
    lengths = np.array([len(p) for p in pieces_ids], dtype=np.int64)
    return {
        "tokens": np.concatenate(pieces_ids) if pieces_ids else np.zeros(0, np.int32),
        "mask": np.concatenate(pieces_mask) if pieces_mask else np.zeros(0, np.bool_),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "sources": np.array(sources, dtype=np.int64),
        "full_lengths": np.array(full_lengths, dtype=np.int64),
        "counters": np.array([counts[c] for c in COUNTERS], dtype=np.int64),
    }


Rendered = tuple[list[int], list[bool]]


def _chat_renderer(tokenizer: ChatTokenizer, cfg: DataConfig) -> Callable[[dict], Rendered]:
    def render(row: dict) -> Rendered:
        example = tokenizer.render_example(
            row["user"],
            row["reasoning"],
            row["assistant"],
            system=cfg.system_prompt,
            train_on_prompt=cfg.train_on_prompt,
        )
        return example.ids, example.loss_mask

    return render


def _text_renderer(tokenizer: ChatTokenizer) -> Callable[[dict], Rendered]:
    """A document ends with <|endoftext|>; every token after the first is a target."""

    def render(row: dict) -> Rendered:
        ids = [*tokenizer.encode(row["text"]), EOT]
        return ids, [False] + [True] * (len(ids) - 1)

    return render


def _chunks(ids: list[int], mask: list[bool], limit: int) -> list[Rendered]:
    """Consecutive pieces of at most `limit` tokens overlapping by one, so every target appears once."""
    if len(ids) <= limit:
        return [(ids, mask)]
    return [(ids[s : s + limit], mask[s : s + limit]) for s in range(0, len(ids) - 1, limit - 1)]


def _split_from_arrays(arrays: dict[str, np.ndarray], name: str, rows: list[dict]) -> TokenizedSplit:
    tokens, mask, offsets = arrays[f"{name}/tokens"], arrays[f"{name}/mask"], arrays[f"{name}/offsets"]
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    example_rows = [rows[i] for i in arrays[f"{name}/sources"].tolist()]
    return TokenizedSplit(
        ids=[tokens[a:b] for a, b in bounds],
        loss_mask=[mask[a:b] for a, b in bounds],
        rows=example_rows,
        families=[row.get("family") for row in example_rows],
    )


# --- cache ----------------------------------------------------------------------------------


def tokenizer_description(tokenizer: ChatTokenizer) -> dict[str, Any]:
    """What identifies the ids a tokenizer produces, including a probe of the chat template."""
    probe = tokenizer.render_example("Hi user", "Think <|im_end|>", "Done", system="Be brief")
    return {
        "class": type(tokenizer).__name__,
        "base_encoding": getattr(tokenizer, "base_encoding", None),
        "n_vocab": getattr(tokenizer, "n_vocab", None),
        "probe_ids": probe.ids,
        "probe_mask": probe.loss_mask,
        "probe_text": tokenizer.encode("naïve 1234 ünïcode\n\t"),
    }


def cache_key(cfg: DataConfig, tokenizer: ChatTokenizer, splits: dict[str, list[dict]]) -> str:
    """sha256 of the settings that change the ids, the tokenizer and the rows' content."""
    settings = {
        "version": PREPARATION_VERSION,
        "text": cfg.source == "text",
        "seq_len": cfg.seq_len,
        "overlong": cfg.overlong,
        "train_on_prompt": cfg.train_on_prompt,
        "system_prompt": cfg.system_prompt,
        "tokenizer": tokenizer_description(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, rows in splits.items():
        digest.update(f"\n{name}:{len(rows)}\n".encode())
        for row in rows:
            for column in sorted(row):
                for part in (column, row[column]):
                    data = part.encode("utf-8")
                    digest.update(len(data).to_bytes(8, "little"))
                    digest.update(data)
    return digest.hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable data cache %s (%s); tokenizing again", path, e)
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write atomically (temporary sibling, then rename); a cache that cannot be written is only a
    warning. Whether it was written."""
    try:
        atomic.write_with(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        log.warning("could not write the data cache %s (%s); continuing without it", path, e)
        return False
    return True


# --- statistics -------------------------------------------------------------------------------


def describe_lengths(lengths: np.ndarray) -> dict[str, float | int | None]:
    if len(lengths) == 0:
        return {"min": None, "median": None, "p95": None, "max": None, "mean": None}
    return {
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }


def _split_stats(arrays: dict[str, np.ndarray], name: str, n_rows: int, seq_len: int) -> dict[str, Any]:
    mask, offsets = arrays[f"{name}/mask"], arrays[f"{name}/offsets"]
    full_lengths = arrays[f"{name}/full_lengths"]
    starts = offsets[:-1]
    loss_tokens = int(mask.sum()) - int(mask[starts].sum()) if len(starts) else 0
    stats: dict[str, Any] = {
        "rows": n_rows,
        "examples": len(starts),
        "tokens": int(offsets[-1]),
        "loss_tokens": loss_tokens,
        "length": describe_lengths(full_lengths),  # rendered length, before truncation or chunking
        "over_seq_len": int((full_lengths > seq_len + 1).sum()),
    }
    stats |= {c: int(v) for c, v in zip(COUNTERS, arrays[f"{name}/counters"].tolist(), strict=True)}
    return stats


def packing_stats(split: TokenizedSplit, seq_len: int, seed: int) -> dict[str, dict[str, float | int]]:
    """Rows and the share of computed positions carrying loss, packed and one example per row."""
    positions = split.lengths - 1
    loss_tokens = sum(int(mask[1:].sum()) for mask in split.loss_mask)
    out = {}
    for mode, n_rows in (
        ("packed", len(best_fit_pack(positions, seq_len, seed))),
        ("unpacked", len(split)),
    ):
        computed = max(1, n_rows * seq_len)
        out[mode] = {
            "rows": n_rows,
            "loss_token_fraction": loss_tokens / computed if n_rows else 0.0,
            "padding_fraction": 1 - int(positions.sum()) / computed if n_rows else 0.0,
        }
    return out


def _warn_about_fitting(name: str, stats: dict[str, Any], cfg: DataConfig) -> None:
    limit = cfg.seq_len + 1
    if stats["truncated"] or stats["dropped_overlong"] or stats["dropped_no_target"]:
        log.warning(
            "%s: %d of %d examples exceed %d tokens (seq_len %d + 1): %d truncated, %d dropped, "
            "%d dropped because the prompt alone fills the context",
            name,
            stats["over_seq_len"],
            stats["rows"],
            limit,
            cfg.seq_len,
            stats["truncated"],
            stats["dropped_overlong"],
            stats["dropped_no_target"],
        )
    if stats["rows"] and not stats["examples"]:
        hint = " or set data.overlong=truncate" if stats["dropped_overlong"] else ""  # keeps those
        raise DataError(
            f"none of the {stats['rows']} {name} rows fits seq_len {cfg.seq_len} with a target left; "
            f"raise data.seq_len{hint}"
        )
