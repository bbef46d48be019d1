"""`reasoning-llama export` and `import` as real subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli, run_clis
from reasoning_llama import model_files
from reasoning_llama.config import ModelConfig
from reasoning_llama.interop.names import to_hf_config
from reasoning_llama.model import Transformer

TINY = ModelConfig(
    dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128, final_block=False
)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, Path]:
    torch.manual_seed(0)
    model = Transformer(TINY)
    return model, model_files.save_model(tmp_path_factory.mktemp("cli") / "ckpt", model)


@pytest.mark.slow
def test_export_then_import_round_trip(saved, tmp_path: Path) -> None:
    model, ckpt = saved
    exported = run_cli("export", "--checkpoint", ckpt, "--to", "hf", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= names
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    # Used as a checkpoint, the HF directory is an error that gives the import command run next.
    used = run_cli("generate", "--checkpoint", tmp_path / "hf", "--prompt", "hi")
    assert_one_line_error(used, f"reasoning-llama import --from hf {tmp_path / 'hf'} --out DIR")
    imported = run_cli("import", "--from", "hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert imported.returncode == 0, imported.stderr
    back = model_files.load_model(tmp_path / "back")
    original = model.state_dict()
    assert back.config == TINY
    assert all(torch.equal(t, original[k]) for k, t in back.state_dict().items())


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(saved, tmp_path: Path) -> None:
    _, ckpt = saved
    with_block = ModelConfig(**{**TINY.to_dict(), "final_block": True})
    model_files.save_model(tmp_path / "block", Transformer(with_block))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(to_hf_config(TINY)))
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    out = tmp_path / "out"
    trained = tmp_path / "run/checkpoints/step-000002"  # what resumes a run sits beside the model files
    shutil.copytree(ckpt, trained)
    (trained / "trainer_state.pt").write_bytes(b"the schedule, RNG states and data position")
    shutil.copytree(ckpt, tmp_path / "run/best")
    (tmp_path / "run/best/best.json").write_text('{"step": 2}')
    (tmp_path / "a-file").write_text("")
    cases = [
        (("export", "--checkpoint", ckpt, "--to", "hf", trained, "--overwrite"), "training run's checkpoint"),
        (("export", "--checkpoint", ckpt, tmp_path / "run/best", "--overwrite"), "holds best.json"),
        (("export", "--checkpoint", ckpt, tmp_path / "a-file/m.gguf"), "a-file: a file, not a directory"),
        (("export", "--checkpoint", ckpt, tmp_path / f"{'x' * 300}.gguf"), "File name too long"),
        (("export", "--checkpoint", tmp_path / "nope", out), "does not exist"),
        (("export", "--checkpoint", ckpt, "--to", "onnx", out), "onnx"),
        (("export", "--checkpoint", tmp_path / "block", "--to", "hf", out), "final_block: false"),
        (("export", "--checkpoint", tmp_path / "block", "--to", "gguf", out), "final_block: false"),
        (("import", "--from", "hf", pickled, "--out", out), "never unpickles"),
        (("import", "--from", "hf", tmp_path / "nope", "--out", out), "nope"),
        (("export", "--checkpoint", ckpt, "--to", "gguf", f"{out}/"), f"e.g. {out / 'model.gguf'}"),
        # an output --overwrite would not replace is named as such, not "pass --overwrite"
        (("export", "--checkpoint", ckpt, "--to", "hf", tmp_path), "does not look like a model directory"),
        (
            ("export", "--checkpoint", ckpt, "--to", "gguf", pickled / "pytorch_model.bin"),
            "is not a GGUF file; choose",
        ),
    ]
    for (_, message), result in zip(cases, run_clis([args for args, _ in cases]), strict=True):
        assert_one_line_error(result, message)
    assert not out.exists() and (trained / "trainer_state.pt").is_file()
    assert (tmp_path / "run/best/best.json").is_file()
