"""The `reasoning-llama` command line: the only place that wires every part together.

Each command lives in the module of its name below (`export` and `import` in interop.py, `eval` in
evaluate.py, `tokenize` in info.py); `COMMANDS` lists them in the order `--help` shows.
A module adds its commands to `app` in its `register(app)`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import sys
import time

import typer

from reasoning_llama import atomic
from reasoning_llama.errors import ReasoningLlamaError

app = typer.Typer(
    name="reasoning-llama",
    help="Train, evaluate, chat with and serve a small LLaMA-architecture reasoning model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMANDS = (
    "quickstart",
    "train",
    "rl",
    "evaluate",  # eval
    "plot",
    "data",  # data stats
    "generate",
    "chat",
    "serve",
    "interop",  # export, import
    "info",  # info, tokenize
)

for _name in COMMANDS:
    importlib.import_module(f"{__name__}.{_name}").register(app)


class NotHandledElsewhere(logging.Filter):
    """Leaves a library's records to its own handler (huggingface_hub has one), so none shows twice;
    a NullHandler (a library's way of printing nothing by itself) is no handler here."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


# What a path the user gave meets when its place is not writable: a file in the way, a name too long,
# no permission, a read-only disk. Other OS errors keep their traceback (they are ours to fix).
_PATH_ERRORS = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EACCES, errno.EROFS)


def _tell_torchrun(message: str) -> None:
    """Under torchrun, the agent's failure summary shows `message` as the process's cause (instead of
    a link to its docs), read from the error file torchrun names for each process."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        extra = {"timestamp": str(int(time.time()))}
        with contextlib.suppress(OSError):
            atomic.write_text(path, json.dumps({"message": {"message": message, "extraInfo": extra}}))


def main(argv: list[str] | None = None) -> None:
    """Entry point: project errors become one line on stderr and exit code 2."""
    # Under torchrun every process of a machine meets the same warnings (data it reads alike): its first says them.
    quiet = os.environ.get("LOCAL_RANK", "0") != "0"
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.root.handlers:
        handler.addFilter(NotHandledElsewhere())
    try:
        app(args=argv, standalone_mode=True)
    except ReasoningLlamaError as e:
        if not getattr(e, "told_by_main", False):  # under torchrun, rank 0's error is printed by rank 0
            print(f"error: {e}", file=sys.stderr)
        _tell_torchrun(f"error: {e}")
        sys.exit(2)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):  # a full or failing disk or output
            message = f"error: cannot write {e.filename or 'the output'}: {e.strerror}"
        elif e.errno in _PATH_ERRORS and e.filename is not None:  # an output path that cannot be
            message = f"error: {e.filename}: {e.strerror}"
        else:
            raise
        print(message, file=sys.stderr)
        _tell_torchrun(message)
        sys.exit(2)
