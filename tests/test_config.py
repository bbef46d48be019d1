"""Config plumbing: overrides the commands build from paths, and saved settings, read back as given."""

from __future__ import annotations

import dataclasses
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasoning_llama.config import RLConfig, config_yaml, load_config, load_run_config, setting
from reasoning_llama.errors import ConfigError

# What a file name may hold (no surrogates, no NUL), `${` and YAML's special characters included.
NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@settings(max_examples=200, deadline=None)
@given(name=st.one_of(NAMES, st.builds(lambda a, b: f"{a}${{{b}}}", NAMES, NAMES)))
def test_a_setting_keeps_any_path_as_the_string_it_is_and_so_do_saved_settings(name, tmp_path_factory):
    config = load_config(RLConfig, None, [setting("data", f"/data/{name}"), "init_from=x"])
    assert config.data == f"/data/{name}"
    saved = tmp_path_factory.mktemp("saved") / "run_config.yaml"
    saved.write_text(config_yaml(config), encoding="utf-8")
    assert load_config(RLConfig, saved).data == config.data


def test_saved_settings_read_back_as_they_were(tmp_path):
    """`${` in a saved path would be read as an interpolation by `--resume` if it were not escaped."""
    config = load_run_config("quickstart", [setting("data.path", "/data/a${b}.jsonl"), "data.source=local"])
    assert config.data.path == "/data/a${b}.jsonl"
    saved = tmp_path / "run_config.yaml"
    saved.write_text(config_yaml(config))
    assert dataclasses.asdict(load_run_config(saved)) == dataclasses.asdict(config)


def test_saved_settings_of_a_run_from_init_from_say_the_preset_does_not_apply(tmp_path):
    config = load_run_config(None, ["train.init_from=/runs/pre/best"])
    text = config_yaml(config)
    assert text.startswith("# the model is train.init_from's: train.preset does not apply")
    (tmp_path / "run_config.yaml").write_text(text)
    assert dataclasses.asdict(load_run_config(tmp_path / "run_config.yaml")) == dataclasses.asdict(config)
    assert not config_yaml(load_run_config(None, [])).startswith("#")


@pytest.mark.parametrize(
    ("override", "fix"),
    [
        ("data.path=${foo", "quote it, e.g. --set "),  # the literal `${` escaped: checked below
        ("data.path=*.jsonl", """quote it, e.g. --set 'data.path="*.jsonl"'"""),
        ("data.families=[chain_sum, max_digit", "close its brackets and name each key once"),
        ("train.model_overrides={dim: 32, dim: 30}", "close its brackets and name each key once"),
    ],
)
def test_a_set_value_yaml_cannot_read_says_what_to_do(override, fix):
    with pytest.raises(ConfigError, match=r"--set .*: YAML cannot read the value") as info:
        load_run_config(None, [override])
    assert fix in str(info.value)
    if "e.g. --set " in fix:  # the suggestion works, and keeps the value as it was typed
        suggested = shlex.split(str(info.value).split("e.g. --set ")[1])[0]
        assert load_run_config(None, [suggested]).data.path == override.split("=", 1)[1]


def test_an_interpolation_that_fails_says_how_to_write_a_literal():
    with pytest.raises(ConfigError, match=r"Interpolation key 'b' not found \(\$\{\.\.\.\} is OmegaConf"):
        load_run_config(None, ["data.path=/data/${b}"])
    assert load_run_config(None, ["data.path=/data/\\${b}"]).data.path == "/data/${b}"  # as it says


def test_recipe_names_directories_and_a_relative_cache(tmp_path, monkeypatch):
    from reasoning_llama.config import RECIPES, ModelConfig, pin_paths, recipe_path

    assert recipe_path("quickstart.yaml") == recipe_path("quickstart") == RECIPES / "quickstart.yaml"
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        recipe_path(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown model config keys: dimm \(did you mean dim\?\)"):
        ModelConfig.from_dict({"dimm": 32})
    monkeypatch.chdir(tmp_path)
    config = load_run_config(None, ["data.cache_dir=cache"])
    pin_paths(config)  # a resume from another directory finds the same tokenized cache
    assert config.data.cache_dir == str(tmp_path / "cache")
