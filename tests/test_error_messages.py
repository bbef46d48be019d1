"""Every message that names a command, a flag or a config key names one that exists.

The text of every string in the package (f-strings with their values left out) is scanned for
`reasoning-llama COMMAND`, `--flag` and `train.x` / `data.x` keys, which are then looked up in the
real command line (click's tree behind typer), in torchrun's own parser, and in the config
dataclasses. A message that suggests a command is a promise that it works.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import typer.main

from reasoning_llama.cli import app
from reasoning_llama.config import ModelConfig, RunConfig

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "reasoning_llama"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")
COMMAND = re.compile(r"reasoning-llama ([a-z]+)(?: ([a-z]+))?")
CONFIG_KEY = re.compile(r"(?<![\w.-])((?:train|data)\.[a-z_]+(?:\.[a-z_]+)?)")
EXTERNAL = ("hf download", "pip ")  # other programs' commands quoted in messages; not ours to check


def package_strings() -> list[tuple[str, str]]:
    """(file:line, text) of every string literal and f-string in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        pieces = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if id(node) in pieces:  # read as part of its f-string
                continue
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            found.append((f"{path.relative_to(PACKAGE)}:{node.lineno}", text))
    return found


def command_flags() -> dict[str, set[str]]:
    """'train' -> its flags, 'data stats' -> its flags, for every command of the real CLI."""
    flags: dict[str, set[str]] = {}

    def walk(command, name: str) -> None:  # click's Group and Command, as typer builds them
        if hasattr(command, "commands"):
            for sub_name, sub in command.commands.items():
                walk(sub, f"{name} {sub_name}".strip())
        else:
            flags[name] = {o for p in command.params for o in p.opts + p.secondary_opts if o.startswith("--")}

    walk(typer.main.get_command(app), "")
    return flags


def torchrun_flags() -> set[str]:
    from torch.distributed.run import get_args_parser

    return {o for action in get_args_parser()._actions for o in action.option_strings}  # noqa: SLF001


def config_key_exists(key: str) -> bool:
    section, name, *rest = key.split(".")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    if section not in fields:
        return False
    inner = {f.name for f in dataclasses.fields(fields[section].default_factory())}
    if name not in inner:
        return False
    if rest:  # only the model's overrides go one level deeper
        return name == "model_overrides" and rest[0] in {f.name for f in dataclasses.fields(ModelConfig)}
    return True


STRINGS = package_strings()
COMMANDS = command_flags()
ALL_FLAGS = set().union(*COMMANDS.values()) | {"--help"}


def test_the_scan_sees_the_cli_and_the_messages():
    assert {"train", "eval", "data stats", "serve", "export"} <= set(COMMANDS)
    assert "--resume" in COMMANDS["train"]
    assert sum("reasoning-llama train" in text for _, text in STRINGS) >= 2


def command_problems(strings: list[tuple[str, str]]) -> list[str]:
    wrong = []
    for where, text in strings:
        for match in COMMAND.finditer(text):
            segment = text[match.end() :].split("\n")[0].split("reasoning-llama ")[0]
            name = match.group(1)
            if name not in COMMANDS:
                name = f"{match.group(1)} {match.group(2)}"
            if name not in COMMANDS:
                if FLAG.search(segment):  # prose ("reasoning-llama needs ...") names no flag
                    wrong.append(f"{where}: no command `{match.group(0)}`")
                continue
            for flag in FLAG.findall(segment):
                if flag not in COMMANDS[name]:
                    wrong.append(f"{where}: `reasoning-llama {name}` has no {flag}")
    return wrong


def flag_problems(strings: list[tuple[str, str]]) -> list[str]:
    torchrun = torchrun_flags()
    wrong = []
    for where, text in strings:
        if FLAG.fullmatch(text):  # an option's own declaration or an argv element
            continue
        for line in text.split("\n"):
            if any(program in line for program in EXTERNAL):
                continue
            known = torchrun | ALL_FLAGS if "torchrun" in line else ALL_FLAGS
            wrong += [
                f"{where}: {flag} ({line.strip()[:80]})" for flag in FLAG.findall(line) if flag not in known
            ]
    return wrong


def key_problems(strings: list[tuple[str, str]]) -> list[str]:
    return [
        f"{where}: {key}"
        for where, text in strings
        for key in CONFIG_KEY.findall(text)
        if not config_key_exists(key)
    ]


def test_the_checks_catch_what_they_are_for():
    assert command_problems([("x", "run reasoning-llama trian --out R")])
    assert command_problems([("x", "resume with: reasoning-llama eval --resume")])
    assert command_problems([("x", "try reasoning-llama data stat --json")])
    assert not command_problems([("x", "reasoning-llama data stats --json; a reasoning-llama checkpoint")])
    assert flag_problems([("x", "pass --overwrit to replace it")])
    assert flag_problems([("x", "torchrun --nproc-per-gpu 2 -m reasoning_llama")])
    assert not flag_problems([("x", "torchrun --nproc_per_node 2; pass --overwrite")])
    assert key_problems([("x", "lower train.learning_rate")])
    assert key_problems([("x", "--set train.model_overrides.width=8")])
    assert not key_problems([("x", "--set train.model_overrides.final_block=false or data.path")])


def test_every_named_command_exists_and_takes_the_flags_given_with_it():
    wrong = command_problems(STRINGS)
    assert not wrong, "\n".join(wrong)


def test_every_flag_a_message_names_exists():
    wrong = flag_problems(STRINGS)
    assert not wrong, "\n".join(wrong)


def test_every_config_key_a_message_names_exists():
    wrong = key_problems(STRINGS)
    assert not wrong, "\n".join(wrong)
