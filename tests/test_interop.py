"""Weights both ways between our Transformer and the real transformers LlamaForCausalLM."""

from __future__ import annotations

import json
import math
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may reach the hub

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from reasoning_llama import model_files
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError
from reasoning_llama.interop.hf import export_hf, import_hf
from reasoning_llama.interop.hf_tokenizer import HF_TOKEN_NAMES
from reasoning_llama.interop.names import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from reasoning_llama.model import Transformer
from reasoning_llama.sampling import NEVER_SAMPLED
from reasoning_llama.tokenizer import EOT, IM_END, IM_START, PAD, get_tokenizer

transformers = pytest.importorskip("transformers")

SMALL = ModelConfig(
    vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64, final_block=False
)
# The real vocabulary, where the tokenizer matters; one small layer keeps it cheap.
REAL_VOCAB = ModelConfig(
    dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128, final_block=False
)

CORPUS = [
    "Hello, world!",
    "The user asked the assistant for its reasoning.",
    "username=admin; user_id=42; assistant-manager; reasoning: none",
    "user\nassistant\nreasoning\n",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines\n\n",
    "It's, we'll, they've, I'd, you're, she's, I'm, DON'T",
    "def f(x):\n    return x ** 2  # square\n",
    "3.14159 + 2,718 = 5.85959; 1e-6, 0x1F, 1_000_000",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية, हिन्दी",
    "emoji 🤖🧠👍🏽 and ZWJ 👨‍👩‍👧 and flags 🇫🇷",
    "math: ∑ᵢ xᵢ² ≤ ∞, ∀ε>0 ∃δ; arrows → ⇒ ↔",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "{'json': [1, 2, {\"k\": null}]}",
    "",
    " ",
    "\n",
    "a" * 300,
]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere, norm weights included, so a swapped tensor cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def hf_llama(config: ModelConfig, **extra) -> torch.nn.Module:
    hf_config = transformers.LlamaConfig(**to_hf_config(config), **extra)
    return transformers.LlamaForCausalLM(hf_config).eval()


def padded_batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: full, left-padded, right-padded, both-padded; padding id 0 on purpose (a real token)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 12), generator=generator)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, 7:] = False
    mask[3, :2] = False
    mask[3, 9:] = False
    return ids.masked_fill(~mask, 0), mask


def our_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def max_logit_gap(ours: Transformer, hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(input_ids=ids, attention_mask=mask.long(), position_ids=our_positions(mask)).logits
    return (a[mask] - b[mask]).abs().max().item()


# -- name and config conversion -------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ours_to_hf_logits_match_on_padded_batch(attn: str) -> None:
    ours = randomized(Transformer(SMALL))
    hf = hf_llama(SMALL, attn_implementation=attn)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    ids, mask = padded_batch(SMALL.vocab_size)
    assert max_logit_gap(ours, hf, ids, mask) <= 1e-4


def test_hf_to_ours_logits_match_on_padded_batch() -> None:
    hf = randomized(hf_llama(SMALL), seed=3)
    ours = Transformer(SMALL).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    ids, mask = padded_batch(SMALL.vocab_size, seed=4)
    assert max_logit_gap(ours, hf, ids, mask) <= 1e-4


def test_name_round_trips_are_identity() -> None:
    ours = randomized(Transformer(SMALL)).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(ours))
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)

    hf = randomized(hf_llama(SMALL), seed=5).state_dict()
    again = to_hf_state_dict(from_hf_state_dict(hf))
    assert again.keys() == {k for k in hf if not k.endswith("inv_freq")}
    assert all(torch.equal(again[k], hf[k]) for k in again)


def test_tied_hf_model_is_untied_into_a_separate_head() -> None:
    hf = randomized(hf_llama(SMALL)).state_dict()
    del hf["lm_head.weight"]
    ours = from_hf_state_dict(hf)
    assert torch.equal(ours["head.weight"], ours["embed.weight"])
    assert ours["head.weight"].data_ptr() != ours["embed.weight"].data_ptr()


def test_final_block_has_no_hf_counterpart() -> None:
    with_block = ModelConfig(**{**SMALL.to_dict(), "final_block": True})
    with pytest.raises(CheckpointError, match="final_block=false"):
        to_hf_state_dict(Transformer(with_block).state_dict())
    with pytest.raises(CheckpointError, match="final SwiGLU block"):
        to_hf_config(with_block)


def test_config_round_trips_through_a_real_llama_config() -> None:
    serialized = transformers.LlamaConfig(**to_hf_config(SMALL)).to_dict()
    assert from_hf_config(serialized) == SMALL
    legacy = {k: v for k, v in to_hf_config(SMALL).items() if k != "rope_parameters"}
    assert from_hf_config({**legacy, "rope_scaling": None, "rope_theta": 500000.0}).rope_theta == 500000.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "biases"),
        ({"mlp_bias": True}, "biases"),
        ({"hidden_act": "gelu"}, "activation gelu"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            "RoPE scaling llama3",
        ),
        ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling linear"),
        ({"head_dim": 16}, "head_dim"),
        ({"model_type": "mistral"}, "expected a llama model"),
        ({"intermediate_size": None}, "lacks intermediate_size"),
    ],
)
def test_from_hf_config_refuses_what_we_cannot_express(change: dict, message: str) -> None:
    hf = {**to_hf_config(SMALL), **change}
    hf = {k: v for k, v in hf.items() if v is not None or k in ("rope_parameters", "rope_scaling")}
    with pytest.raises(CheckpointError, match=message):
        from_hf_config(hf)


# -- exported directories -------------------------------------------------------------


@pytest.fixture(scope="module")
def our_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, object]:
    directory = tmp_path_factory.mktemp("ours") / "ckpt"
    model = randomized(Transformer(REAL_VOCAB), seed=7)
    model_files.save_model(directory, model)
    return model, directory


@pytest.fixture(scope="module")
def exported(our_model, tmp_path_factory: pytest.TempPathFactory):
    return export_hf(our_model[1], tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)


def chat_ids(result) -> list[int]:
    """apply_chat_template returns a list (transformers 4) or a BatchEncoding (5)."""
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def test_exported_model_loads_and_matches_our_logits(our_model, exported) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokenizer = get_tokenizer()
    prompts = [
        tokenizer.render_prompt([{"role": "user", "content": "What is 2 + 2?"}]),
        tokenizer.render_prompt(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        ),
    ]
    length = max(map(len, prompts))
    ids = torch.full((2, length), PAD)
    mask = torch.zeros(2, length, dtype=torch.bool)
    ids[0, length - len(prompts[0]) :] = torch.tensor(prompts[0])  # left padding
    mask[0, length - len(prompts[0]) :] = True
    ids[1, : len(prompts[1])] = torch.tensor(prompts[1])  # right padding
    mask[1, : len(prompts[1])] = True
    assert max_logit_gap(our_model[0], hf, ids, mask) <= 1e-4


def test_hf_greedy_generation_matches_ours(our_model, tmp_path) -> None:
    """transformers' generate() with the exported generation config decodes as our engine does:
    greedy, never an id our engine never samples, even where one has the highest logit (here
    <|im_start|>, made to at the first step)."""
    model = randomized(Transformer(REAL_VOCAB), seed=7)
    prompt = torch.tensor([get_tokenizer().render_prompt([{"role": "user", "content": "Count to three."}])])
    with torch.no_grad():
        first = model(prompt)[0, -1]
        assert first.max() > 0
        model.head.weight[IM_START] = 5 * model.head.weight[first.argmax()]  # now the argmax
    model_files.save_model(tmp_path / "ckpt", model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(tmp_path / "ckpt", tmp_path / "hf"), local_files_only=True
    ).eval()
    ids = prompt
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=6)[0, prompt.shape[1] :].tolist()
        for _ in range(
            len(generated)
        ):  # greedy, no cache, the never-sampled ids masked: the plainest reference
            logits = model(ids)[:, -1:]
            logits[..., list(NEVER_SAMPLED)] = -math.inf
            ids = torch.cat([ids, logits.argmax(-1)], dim=1)
    assert generated == ids[0, prompt.shape[1] :].tolist()
    assert len(generated) == 6 or generated[-1] in (IM_END, EOT)


def test_exported_files_describe_a_llama_chat_model(exported) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["eos_token_id"] == [IM_END, EOT] and config["pad_token_id"] == PAD
    assert config["vocab_size"] == REAL_VOCAB.vocab_size
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [IM_END, EOT] and generation["do_sample"] is False
    assert generation["suppress_tokens"] == list(NEVER_SAMPLED)  # as our engine and the GGUF file
    assert "chat_template" in json.loads((exported / "tokenizer_config.json").read_text())
    assert not list(exported.parent.glob(".hf.tmp-*"))  # the atomic write left nothing behind


CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 * 3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [
        {"role": "system", "content": "Answer as the assistant, after reasoning."},
        {"role": "user", "content": "Hi, I'm a user."},
        {"role": "assistant", "content": "Hello! How can I help?", "reasoning": "greet back"},
        {"role": "user", "content": "What did the user say?\nTwo lines."},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "system", "content": "late system"},
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "another"},
        {"role": "user", "content": "  indented\n\tcode  "},
    ],
    [
        {"role": "user", "content": "\nstarts with a line break"},
        {"role": "assistant", "content": " spaced "},
        {"role": "user", "content": "\t"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "empty system messages add nothing"},
        {"role": "system", "content": "Be kind."},
    ],
]


@pytest.mark.parametrize(
    "messages",
    CONVERSATIONS,
    ids=["single", "system", "multi-turn", "scattered-system", "edge-whitespace", "empty-system"],
)
def test_chat_template_gives_our_prompt_ids(hf_tokenizer, messages) -> None:
    result = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat_ids(result) == get_tokenizer().render_prompt(messages)


def test_chat_template_without_generation_prompt_stops_after_the_last_turn(hf_tokenizer) -> None:
    messages = CONVERSATIONS[2]
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert text.endswith("Two lines.<|im_end|>\n")
    assert (
        chat_ids(hf_tokenizer(text, add_special_tokens=False)) == get_tokenizer().render_prompt(messages)[:-3]
    )


def test_hf_tokenizer_encodes_plain_text_like_ours(hf_tokenizer) -> None:
    ours = get_tokenizer()
    for text in CORPUS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ours.encode(text), text
        assert hf_tokenizer.decode(ours.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_hf_tokenizer_matches_ours_on_arbitrary_text(hf_tokenizer, text: str) -> None:
    assume(not any(name in text for name in HF_TOKEN_NAMES.values()))
    ids = get_tokenizer().encode(text)
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
    assert hf_tokenizer.decode(ids) == text


def test_hf_tokenizer_maps_special_ids_to_the_hf_names(hf_tokenizer) -> None:
    ours = get_tokenizer()
    prompt = ours.render_prompt([{"role": "user", "content": "hi"}])
    assert hf_tokenizer.decode(prompt) == "<|im_start|><|user|>\nhi<|im_end|>\n<|im_start|><|reasoning|>\n"
    assert hf_tokenizer.convert_ids_to_tokens([EOT, PAD]) == ["<|endoftext|>", "<|PAD|>"]
    assert hf_tokenizer.eos_token_id == IM_END and hf_tokenizer.pad_token_id == PAD
    # The documented difference: HF turns a typed special-token string into its id; ours never does.
    assert hf_tokenizer.encode("a<|im_end|>", add_special_tokens=False)[-1] == IM_END
    assert IM_END not in ours.encode("a<|im_end|>")


# -- import ---------------------------------------------------------------------------


def test_export_then_import_gives_identical_weights(our_model, exported, tmp_path) -> None:
    back = model_files.load_model(import_hf(exported, tmp_path / "back"))
    assert back.config == our_model[0].config
    original = our_model[0].state_dict()
    assert all(torch.equal(t, original[k]) for k, t in back.state_dict().items())


def test_a_half_precision_model_imports_as_float32_and_runs_int8(our_model, tmp_path) -> None:
    """Every checkpoint holds fp32 weights (training keeps fp32 masters; int8 kernels take fp32)."""
    from safetensors import safe_open

    from reasoning_llama.generation import Engine
    from reasoning_llama.sampling import SamplingParams

    bf16 = export_hf(our_model[1], tmp_path / "hf-bf16", dtype="bfloat16")
    imported = import_hf(bf16, tmp_path / "back")
    with safe_open(str(imported / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}  # noqa: SIM118
    # A checkpoint saved in bf16 some other way still decodes with int8 weights.
    model_files.save_model(tmp_path / "bf16-ckpt", model_files.load_model(our_model[1]).to(torch.bfloat16))
    engine = Engine.from_checkpoint(tmp_path / "bf16-ckpt", device="cpu", quantize="int8")
    result = engine.generate(
        get_tokenizer().render_prompt([{"role": "user", "content": "hi"}]), SamplingParams(max_new_tokens=3)
    )
    assert result.completion_tokens == 3


def test_outputs_may_be_the_working_directory_or_under_home(
    our_model, exported, tmp_path, monkeypatch
) -> None:
    """`.` is swapped by its absolute name (a rename of `.` fails); `~` is the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert export_hf(our_model[1], "~/hf") == tmp_path / "home" / "hf"
    monkeypatch.chdir(tmp_path / "home" / "hf")
    export_hf(our_model[1], ".", overwrite=True)
    assert json.loads((tmp_path / "home" / "hf" / "config.json").read_text())["model_type"] == "llama"
    monkeypatch.chdir(tmp_path)
    import_hf("~/hf", "~/back")
    assert (tmp_path / "home" / "back" / "model.safetensors").is_file()
    from pathlib import Path

    from reasoning_llama.cli.model_dir import resolve_model_dir

    assert resolve_model_dir(Path("~/back")) == tmp_path / "home" / "back"  # every --checkpoint


def test_import_reads_sharded_safetensors(tmp_path) -> None:
    hf = randomized(hf_llama(REAL_VOCAB), seed=11)
    hf.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    shards = list((tmp_path / "src").glob("model-*.safetensors"))
    assert len(shards) > 1
    ours = model_files.load_model(import_hf(tmp_path / "src", tmp_path / "out"))
    expected = from_hf_state_dict(hf.state_dict())
    assert all(torch.equal(t, expected[k]) for k, t in ours.state_dict().items())


def test_import_gpt2_vocabulary_adds_the_chat_rows(tmp_path) -> None:
    gpt2_vocab = ModelConfig(**{**REAL_VOCAB.to_dict(), "vocab_size": 50257})
    hf = randomized(hf_llama(gpt2_vocab), seed=13)
    hf.save_pretrained(tmp_path / "src")
    ours = model_files.load_model(import_hf(tmp_path / "src", tmp_path / "out"))
    assert ours.config.vocab_size == 50263
    head = ours.head.weight.detach()
    assert torch.allclose(head[50257:], hf.lm_head.weight.detach().mean(0).expand(6, -1))
    ids, mask = padded_batch(50257, seed=14)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)[..., :50257]
        b = hf(input_ids=ids, attention_mask=mask.long(), position_ids=our_positions(mask)).logits
    assert (a[mask] - b[mask]).abs().max().item() <= 1e-4


def test_import_refuses_pickles_and_foreign_vocabularies(tmp_path) -> None:
    hf = hf_llama(SMALL)
    hf.save_pretrained(tmp_path / "bin")
    weights = tmp_path / "bin" / "model.safetensors"
    weights.rename(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        import_hf(tmp_path / "bin", tmp_path / "out")
    hf.save_pretrained(tmp_path / "small")  # vocab 97
    with pytest.raises(CheckpointError, match="vocab_size 97"):
        import_hf(tmp_path / "small", tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a directory"):
        import_hf(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_different_tokenizer(exported, tmp_path) -> None:
    source = tmp_path / "src"
    shutil.copytree(exported, source)
    spec = json.loads((source / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] != 50259]
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": 50259, "content": "<|tool|>"})
    (source / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="other meanings"):
        import_hf(source, tmp_path / "out")
    vocab = spec["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (source / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="not GPT-2's BPE"):
        import_hf(source, tmp_path / "out")


def test_import_refuses_our_own_checkpoint_and_mismatched_weights(our_model, exported, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a transformers config"):
        import_hf(our_model[1], tmp_path / "out")
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text((exported / "config.json").read_text())
    save_file({"model.embed_tokens.weight": torch.zeros(50263, 32)}, str(source / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"do not match its config\.json: missing"):
        import_hf(source, tmp_path / "out")


def test_export_refuses_final_block_and_protects_existing_directories(our_model, tmp_path) -> None:
    with_block = ModelConfig(**{**SMALL.to_dict(), "final_block": True})
    model_files.save_model(tmp_path / "block", Transformer(with_block))
    with pytest.raises(CheckpointError, match="final_block: false"):
        export_hf(tmp_path / "block", tmp_path / "out")
    model_files.save_model(tmp_path / "small", Transformer(SMALL))
    with pytest.raises(CheckpointError, match="vocab_size 97"):
        export_hf(tmp_path / "small", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # --overwrite would not replace it, so it is not suggested
        with pytest.raises(CheckpointError, match=r"no config.json\); choose another output$"):
            export_hf(our_model[1], precious, overwrite=overwrite)
    assert (precious / "notes.txt").read_text() == "keep me"
    export_hf(our_model[1], tmp_path / "hf")
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite to replace it"):
        export_hf(our_model[1], tmp_path / "hf")
    export_hf(our_model[1], tmp_path / "hf", overwrite=True, dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
