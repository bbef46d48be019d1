from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from reasoning_llama.atomic import write_dir
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import load_model, save_model


def test_save_and_load_round_trip(tmp_path, tiny_config):
    model = Transformer(tiny_config)
    save_model(tmp_path / "ckpt", model)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == tiny_config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for name, buffer in model.named_buffers():  # the RoPE tables, which the file does not hold
        assert torch.equal(buffer, loaded.get_buffer(name)), name
    assert (
        json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text())["special_tokens"]["<|im_end|>"]
        == 50258
    )


def test_a_command_loading_a_model_does_not_load_torchs_compiler(tmp_path, tiny_config):
    """The compiler costs every command a second at start; it is imported only by what compiles
    (building on the meta device, or importing varlen attention, would load it)."""
    save_model(tmp_path / "ckpt", Transformer(tiny_config))
    script = (
        "import sys; import reasoning_llama.cli, reasoning_llama.server, reasoning_llama.training.loop; "
        "from reasoning_llama.model_files import load_model; "
        f"load_model({str(tmp_path / 'ckpt')!r}); "
        "assert 'torch._dynamo' not in sys.modules, 'the compiler was imported'"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path, tiny_config):
    save_model(tmp_path / "ckpt", Transformer(tiny_config))
    second = Transformer(tiny_config)
    save_model(tmp_path / "ckpt", second)
    assert torch.equal(load_model(tmp_path / "ckpt").head.weight, second.head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, tiny_config):
    first = Transformer(tiny_config)
    save_model(tmp_path / "ckpt", first)

    def crash(directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir(tmp_path / "ckpt", crash)
    assert torch.equal(load_model(tmp_path / "ckpt").head.weight, first.head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_weights(tmp_path, tiny_config):
    tiny_config.save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_model(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_config):
    save_model(tmp_path / "ckpt", Transformer(tiny_config))
    bigger = ModelConfig(**{**tiny_config.to_dict(), "dim": 64})
    bigger.save(tmp_path / "ckpt" / "config.json")
    with pytest.raises(CheckpointError, match=r"shape mismatch: embed\.weight"):
        load_model(tmp_path / "ckpt")


def test_corrupt_weights_file(tmp_path, tiny_config):
    save_model(tmp_path / "ckpt", Transformer(tiny_config))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "ckpt")


def test_missing_tensor(tmp_path, tiny_config):
    model = Transformer(tiny_config)
    save_model(tmp_path / "ckpt", model)
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing head\.weight"):
        load_model(tmp_path / "ckpt")
