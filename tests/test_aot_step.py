"""The ahead-of-time CPU decode step (torch.export + AOTInductor) gives `decode`'s logits in both CPU
layouts, and a second step loads the compiled code from the cache instead of compiling it again."""

import pytest
import torch

from reasoning_llama import aot_step
from reasoning_llama.aot_step import AOTDecodeStep
from reasoning_llama.cpu_layout import prepare_for_cpu_decode
from reasoning_llama.model import KVCache, Transformer
from test_decoding import CONFIG, run_against_decode


def prepared_model(threads: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CONFIG).eval()
    assert prepare_for_cpu_decode(model) == ("onednn" if threads > 1 else "transposed")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])  # the transposed and the oneDNN layout (cpu_layout.py)
def test_the_compiled_step_gives_the_logits_of_decode(torch_threads, tmp_path, monkeypatch, threads):
    torch_threads(threads)
    model = prepared_model(threads)
    steps = []

    def make(model, cache):
        steps.append(AOTDecodeStep(model, cache, cache_dir=tmp_path))
        return steps[-1]

    # One row and several: both programs run (rows 0 and 2 decode, then row 0 alone).
    run_against_decode(model, make)
    assert set(steps[0].programs) == {False, True}
    packages = sorted(tmp_path.glob("*.pt2"))
    assert len(packages) == 2 and not list(tmp_path.glob(".*"))  # no temporary file left behind

    # A new step on the same cache directory loads both packages: nothing is compiled again. The
    # packages hold code only, so they serve a model of the same shape with other weights.
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled although the cache holds the package")

    monkeypatch.setattr(aot_step, "aoti_compile_and_package", no_compiling)
    run_against_decode(prepared_model(threads, seed=1), make)
    assert sorted(tmp_path.glob("*.pt2")) == packages


def test_the_compiled_step_runs_on_a_cpu_only():
    with pytest.raises(ValueError, match="CPU"):
        AOTDecodeStep(Transformer(CONFIG), KVCache(CONFIG, 1, device="meta"))
