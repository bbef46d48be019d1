"""The `reasoning-llama` command line: the only place that wires every part together.

Every module of this package with a `register(app)` function adds its subcommands to `app`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import typer

from reasoning_llama.errors import ReasoningLlamaError

app = typer.Typer(
    name="reasoning-llama",
    help="Train, evaluate, chat with and serve a small LLaMA-architecture reasoning model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "register"):
        _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: project errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, standalone_mode=True)
    except ReasoningLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
