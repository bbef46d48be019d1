"""The ahead-of-time CPU decode step (torch.export + AOTInductor) gives `decode`'s logits in both CPU
layouts, and a second step loads the compiled code from the cache instead of compiling it again."""

import importlib.util
import warnings

import pytest
import torch

from reasoning_llama import aot_step
from reasoning_llama.aot_step import AOTDecodeStep, package_key
from reasoning_llama.cpu_layout import prepare_for_cpu_decode
from reasoning_llama.decoding import decode, prefill
from reasoning_llama.model import KVCache, Transformer
from test_decoding import CONFIG, run_against_decode


def prepared_model(threads: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CONFIG).eval()
    assert prepare_for_cpu_decode(model) == ("onednn" if threads > 1 else "transposed")
    return model


@pytest.mark.slow
def test_the_compiled_step_gives_the_logits_of_decode(torch_threads, tmp_path, monkeypatch):
    """The oneDNN layout (two threads, the engine's usual one): one row and several."""
    torch_threads(2)
    model = prepared_model(2)
    steps = []

    def make(model, cache):
        steps.append(AOTDecodeStep(model, cache, cache_dir=tmp_path))
        return steps[-1]

    # Rows 0 and 2 decode, then row 0 alone: both programs run. Compiling them warns of nothing
    # (torch's deprecations from inside its compiler reached `serve --compile`'s users).
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        run_against_decode(model, make)
    assert set(steps[0].programs) == {False, True}
    packages = sorted(tmp_path.glob("*.pt2"))
    assert len(packages) == 2 and not list(tmp_path.glob(".*"))  # no temporary file left behind

    # A new step on the same cache directory loads both packages: nothing is compiled again. The
    # packages hold code only, so they serve a model of the same shape with other weights.
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled although the cache holds the package")

    monkeypatch.setattr(aot_step, "aoti_compile_and_package", no_compiling)
    run_against_decode(prepared_model(2, seed=1), make)
    assert sorted(tmp_path.glob("*.pt2")) == packages


@pytest.mark.slow
def test_the_compiled_step_runs_the_transposed_layout(torch_threads, tmp_path):
    """One thread: plain linear layers over transposed weights (MKL). One row, so one program."""
    torch_threads(1)
    model = prepared_model(1)
    reference, cache = KVCache(CONFIG, 1), KVCache(CONFIG, 1)
    prompt = [5, 17, 300, 2, 9]
    with torch.inference_mode():
        step = AOTDecodeStep(model, cache, cache_dir=tmp_path)
        assert set(step.programs) == {False}
        for c in (reference, cache):
            token = int(prefill(model, c, [prompt], [0]).argmax())
        for position in range(len(prompt), len(prompt) + 12):
            expected = decode(model, reference, torch.tensor([token]), torch.tensor([position]))
            torch.testing.assert_close(step([token], [position], [0]), expected, atol=1e-4, rtol=1e-4)
            token = int(expected.argmax())


def test_the_package_key_follows_the_graph_not_where_the_code_lives(tmp_path):
    source = "from torch import nn\n\n\nclass Scale(nn.Module):\n    def forward(self, x):\n        return x * 2 + 1\n"
    programs = []
    for checkout, size in (("one", 3), ("another", 3), ("one", 4)):  # the last: the same code, another shape
        path = tmp_path / checkout / "scale.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"scale_{checkout}_{size}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        programs.append(torch.export.export(module.Scale(), (torch.ones(size),)))
    assert str(programs[0]) != str(programs[1])  # the printed programs name their files...
    assert package_key(programs[0]) == package_key(programs[1])  # ...which the key leaves out
    assert package_key(programs[0]) != package_key(programs[2])  # shapes are part of the key


def test_the_compiled_step_runs_on_a_cpu_only():
    with pytest.raises(ValueError, match="CPU"):
        AOTDecodeStep(Transformer(CONFIG), KVCache(CONFIG, 1, device="meta"))
