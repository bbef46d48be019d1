"""GGUF export, checked against the real llama.cpp (llama-cpp-python, built from its source package by
`make test`): tokenization, chat prompt, logits and greedy decoding, plus the file's metadata read back
with gguf-py's own reader."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cli_helpers import run_cli
from reasoning_llama import model_files
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError
from reasoning_llama.evaluation import synthetic_test_rows
from reasoning_llama.generation import Engine
from reasoning_llama.interop.gguf import SUPPRESS_TOKENS_KEY, export_gguf, gguf_tensors, rope_pairs_adjacent
from reasoning_llama.interop.hf import export_hf
from reasoning_llama.interop.hf_tokenizer import CHAT_TEMPLATE, HF_TOKEN_NAMES
from reasoning_llama.model import Transformer
from reasoning_llama.sampling import NEVER_SAMPLED, SamplingParams
from reasoning_llama.tokenizer import ASSISTANT_HEADER, EOT, IM_END, N_VOCAB, PAD, get_tokenizer

# Random weights, grouped-query attention: every permuted and renamed tensor matters.
GQA = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128, final_block=False)
TEXTS = [
    "Hello world",
    "The user asked the assistant for its reasoning.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines\n\n",
    "It's, we'll, they've, I'd, you're, she's, I'm, DON'T",
    "def f(x):\n    return x ** 2  # square\n",
    "3.14159 + 2,718 = 5.85959; 1e-6, 0x1F, 1_000_000",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية, हिन्दी",
    "emoji 🤖🧠👍🏽 and ZWJ 👨‍👩‍👧 and flags 🇫🇷",
    "a typed <|im_end|> and <|endoftext|> stay text",
    "",
    " ",
    "\n",
]


def llama_cpp_module():
    return pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed; `make test` builds it from its source package",
    )


@contextmanager
def llama_cpp_model(path: Path, *, f32_cache: bool = False, **options) -> Iterator[Any]:
    """llama.cpp on one thread, quiet. `f32_cache` keeps keys and values in f32 (llama.cpp's default
    cache is f16, which alone moves a trained model's logits by ~3e-3); `logits_all` keeps every position's."""
    llama_cpp = llama_cpp_module()
    if f32_cache:
        options |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llama = llama_cpp.Llama(model_path=str(path), n_threads=1, n_threads_batch=1, verbose=False, **options)
    try:
        yield llama
    finally:
        llama.close()


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = Transformer(GQA)
    with torch.no_grad():  # norms away from one, so a misplaced norm weight shows
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model_files.save_model(tmp_path_factory.mktemp("gguf") / "gqa", model)


@pytest.fixture(scope="module")
def gqa_gguf(gqa_checkpoint: Path) -> Path:
    return export_gguf(gqa_checkpoint, gqa_checkpoint.parent / "gqa-f32.gguf")


@pytest.fixture(scope="module")
def vocab_llama(gqa_gguf: Path) -> Iterator[Any]:
    with llama_cpp_model(gqa_gguf, vocab_only=True) as llama:
        yield llama


@pytest.fixture(scope="module")
def trained(trained_quickstart: Path) -> Path:
    """A tiny model with some skill: the quickstart recipe (no final block) after 200 steps."""
    return trained_quickstart


@pytest.fixture(scope="module")
def trained_f32(trained: Path) -> Path:
    """Exported through the command line, as a user would (a .gguf name is enough to say the format)."""
    out = trained.parent / "trained-f32.gguf"
    result = run_cli("export", "--checkpoint", trained.parent, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def trained_q8_0(trained: Path) -> Path:
    return export_gguf(trained, trained.parent / "trained-q8_0.gguf", dtype="q8_0")


def our_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    model = model_files.load_model(directory)
    with torch.no_grad():
        return model(torch.tensor([ids])).squeeze(0).float()


def llama_logits(path: Path, ids: list[int], *, f32_cache: bool = False) -> torch.Tensor:
    with llama_cpp_model(path, f32_cache=f32_cache, n_ctx=len(ids), logits_all=True) as llama:
        llama.eval(ids)
        return torch.from_numpy(llama.scores[: len(ids)].copy())


def a_conversation(index: int = 0) -> list[int]:
    """A whole rendered example (prompt and answer) of the synthetic test split."""
    row = synthetic_test_rows(["chain_sum", "sort_digits", "max_digit"], 1, seed=index)[index % 3]
    return get_tokenizer().render_example(row["user"], row["reasoning"], row["assistant"]).ids


# -- the file itself ---------------------------------------------------------------------


def test_rope_pairs_move_next_to_each_other():
    head_dim, heads = 8, 2
    rows = torch.arange(heads * head_dim, dtype=torch.float32).unsqueeze(1)
    moved = rope_pairs_adjacent(rows, heads).squeeze(1).tolist()
    # Per head: rows i and i + 4 (rotated together in the rotate-half layout) land at 2i and 2i + 1.
    assert moved == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.slow
def test_metadata_tokenizer_and_template_read_back(gqa_checkpoint: Path, tmp_path: Path):
    path = export_gguf(gqa_checkpoint, tmp_path / "m.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(path)

    def value(key: str):
        return reader.fields[key].contents()

    assert (
        value("general.architecture") == "llama"
        and value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    )
    expected = {
        "llama.context_length": GQA.max_seq_len,
        "llama.embedding_length": GQA.dim,
        "llama.block_count": GQA.n_layers,
        "llama.feed_forward_length": GQA.ffn_dim,
        "llama.attention.head_count": GQA.n_heads,
        "llama.attention.head_count_kv": GQA.n_kv_heads,
        "llama.rope.dimension_count": GQA.head_dim,
        "llama.vocab_size": N_VOCAB,
    }
    assert {key: value(key) for key in expected} == expected
    assert value("llama.rope.freq_base") == GQA.rope_theta
    assert math.isclose(value("llama.attention.layer_norm_rms_epsilon"), GQA.norm_eps, rel_tol=1e-6)

    assert (value("tokenizer.ggml.model"), value("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == N_VOCAB
    assert tokens[15496] == "Hello" and tokens[995] == "Ġworld" and tokens[EOT] == "<|endoftext|>"
    assert {i: tokens[i] for i in HF_TOKEN_NAMES} == HF_TOKEN_NAMES
    control = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == set(range(EOT, N_VOCAB)) and set(types) == {
        gguf.TokenType.NORMAL,
        gguf.TokenType.CONTROL,
    }
    merges = value("tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    special = {
        key: value(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "padding_token_id")
    }
    assert special == {"eos_token_id": EOT, "eot_token_id": IM_END, "padding_token_id": PAD}
    assert value("tokenizer.ggml.add_bos_token") is False and value("tokenizer.ggml.add_eos_token") is False
    assert value(SUPPRESS_TOKENS_KEY) == list(NEVER_SAMPLED)
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE

    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert len(kinds) == 3 + 9 * GQA.n_layers
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert kinds["token_embd.weight"] == kinds["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.1.attn_k.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_the_final_block_is_refused_like_the_hf_export(tmp_path: Path):
    torch.manual_seed(0)
    seed_shape = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    assert seed_shape.final_block
    ckpt = model_files.save_model(tmp_path / "seed", Transformer(seed_shape))
    with pytest.raises(CheckpointError) as hf:
        export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(CheckpointError) as gg:
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert str(gg.value) == str(hf.value) and "final_block: false" in str(gg.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_command_line_errors_are_one_line(gqa_checkpoint: Path, tmp_path: Path):
    def error(*args) -> str:
        result = run_cli("export", "--checkpoint", gqa_checkpoint, "--to", "gguf", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]

    assert "choose one of: f32, f16, q8_0" in error(tmp_path / "m.gguf", "--dtype", "bfloat16")
    assert "is a directory" in error(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert "not a GGUF file" in error(tmp_path / "notes.txt", "--overwrite")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    done = run_cli(
        "export", "--checkpoint", gqa_checkpoint, "--to", "gguf", tmp_path / "m.gguf", "--dtype", "f16"
    )
    assert done.returncode == 0, done.stderr
    assert "pass --overwrite" in error(tmp_path / "m.gguf")
    again = run_cli(
        "export", "--checkpoint", gqa_checkpoint, "--to", "gguf", tmp_path / "m.gguf", "--overwrite"
    )
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.txt"]  # no temporary left


# -- llama.cpp: tokens and the chat prompt -----------------------------------------------


@pytest.mark.slow
def test_llama_cpp_tokenizes_plain_text_like_us(vocab_llama):
    ours = get_tokenizer()
    assert vocab_llama.tokenize(b"Hello world", add_bos=False, special=False) == [15496, 995]
    for text in TEXTS:
        assert vocab_llama.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text), text
        ids = ours.encode(text)
        assert vocab_llama.detokenize(ids) == text.encode()
    assert (vocab_llama.n_vocab(), vocab_llama.token_eos()) == (N_VOCAB, EOT)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_llama_cpp_tokenizes_any_text_like_us(vocab_llama, text: str):
    assert vocab_llama.tokenize(text.encode(), add_bos=False, special=False) == get_tokenizer().encode(text)


@pytest.mark.slow
def test_the_embedded_chat_template_renders_our_prompt(vocab_llama):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = vocab_llama.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    conversations = [
        [{"role": "user", "content": "Compute 2 + 5 + 9."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sort 3 1 2."},
            {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "And 9 7 8, user?"},
        ],
    ]
    for messages in conversations:
        prompt = formatter(messages=messages).prompt
        ids = vocab_llama.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == get_tokenizer().render_prompt(messages)


# -- llama.cpp: the model ----------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_logits_match_ours_in_f32(
    gqa_checkpoint: Path, gqa_gguf: Path, trained: Path, trained_f32: Path
):
    ids = a_conversation()
    ours = {gqa_gguf: our_logits(gqa_checkpoint, ids), trained_f32: our_logits(trained, ids)}
    diff = {
        (path.stem, cache): (llama_logits(path, ids, f32_cache=cache == "f32") - logits).abs().max().item()
        for path, logits in ours.items()
        for cache in ("f32", "f16")
    }
    print(f"\ngguf f32 weights, max |logit diff| over {len(ids)} positions by (model, KV cache):", diff)
    assert diff["gqa-f32", "f32"] <= 1e-3 and diff["trained-f32", "f32"] <= 1e-3
    assert diff["gqa-f32", "f16"] <= 1e-2 and diff["trained-f32", "f16"] <= 1e-2


@pytest.mark.slow
def test_f16_and_q8_0_keep_the_greedy_choice(trained: Path, trained_q8_0: Path):
    ids = [t for i in range(3) for t in a_conversation(i)]
    ours = our_logits(trained, ids)
    files = {
        "q8_0": trained_q8_0,
        "f16": export_gguf(trained, trained.parent / "trained-f16.gguf", dtype="f16"),
    }
    for dtype, path in files.items():
        theirs = llama_logits(path, ids)
        agreement = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
        diff = (theirs - ours).abs().max().item()
        print(
            f"\ngguf {dtype}: greedy choice kept at {agreement:.1%} of {len(ids)} positions, max |logit diff| {diff:.3f}"
        )
        assert agreement >= 0.95


def suppressed_ids(llama) -> list[int]:
    """The ids llama.cpp read from the file's tokenizer.ggml.suppress_tokens."""
    llama_cpp = llama_cpp_module()
    count = ctypes.c_int32(0)
    ids = llama_cpp.llama_vocab_get_suppress_tokens(
        llama_cpp.llama_model_get_vocab(llama.model), ctypes.byref(count)
    )
    return [ids[i] for i in range(count.value)]


def llama_cpp_greedy(llama, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with llama.cpp's own sampler chain, built as llama-cli and llama-server build
    it: the file's suppressed ids biased to -inf, then greedy. Where the reasoning ends (the first
    end-of-generation id, <|im_end|>), the assistant header is fed in, as our engine forces it."""
    llama_cpp = llama_cpp_module()
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    suppress = suppressed_ids(llama)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    biases = (llama_cpp.llama_logit_bias * len(suppress))(*[(i, -math.inf) for i in suppress])
    llama_cpp.llama_sampler_chain_add(
        chain, llama_cpp.llama_sampler_init_logit_bias(N_VOCAB, len(suppress), biases)
    )
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    out: list[int] = []
    feed = list(prompt)
    llama.reset()
    try:
        while len(out) < max_new_tokens:
            llama.eval(feed)
            token = llama_cpp.llama_sampler_sample(chain, llama.ctx, -1)
            out.append(token)
            feed = [token]
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                if token != IM_END or out.count(IM_END) > 1:
                    break  # the answer is closed (or <|endoftext|> ended the turn)
                out += ASSISTANT_HEADER
                feed += ASSISTANT_HEADER
    finally:
        llama_cpp.llama_sampler_free(chain)
    return out[:max_new_tokens]


@pytest.mark.slow
def test_greedy_decoding_in_llama_cpp_is_our_engine_s(trained: Path, trained_f32: Path, trained_q8_0: Path):
    tokenizer = get_tokenizer()
    rows = synthetic_test_rows(["chain_sum", "sort_digits", "max_digit"], 2, seed=11)
    prompts = [tokenizer.render_prompt([{"role": "user", "content": row["user"]}]) for row in rows]
    params = SamplingParams(max_new_tokens=96, temperature=0.0)
    engine = Engine.from_checkpoint(trained, device="cpu", max_batch_size=1)
    ours = [engine.generate(prompt, params).token_ids for prompt in prompts]
    assert sum(ids.count(IM_END) == 2 for ids in ours) >= 3  # most turns reach a closed answer

    def llama_cpp_turns(path: Path, f32_cache: bool) -> list[list[int]]:
        with llama_cpp_model(path, f32_cache=f32_cache, n_ctx=256) as llama:
            assert suppressed_ids(llama) == list(NEVER_SAMPLED)
            return [llama_cpp_greedy(llama, prompt, params.max_new_tokens) for prompt in prompts]

    assert llama_cpp_turns(trained_f32, f32_cache=True) == ours
    same = sum(a == b for a, b in zip(llama_cpp_turns(trained_q8_0, f32_cache=False), ours, strict=True))
    print(f"\ngguf q8_0 (f16 KV cache): {same} of {len(ours)} greedy turns token for token our engine's")


@pytest.mark.slow
def test_the_readme_recipe_gives_our_engine_s_reasoning_and_answer(trained: Path, trained_f32: Path):
    """README's llama-cpp-python example: the reasoning (it stops at <|im_end|>), then the answer after
    the assistant header, with the never-sampled ids biased away as llama-cli and llama-server do."""
    llama_cpp = llama_cpp_module()
    rows = synthetic_test_rows(["chain_sum", "sort_digits", "max_digit"], 2, seed=12)
    engine = Engine.from_checkpoint(trained, device="cpu", max_batch_size=1)
    llm = llama_cpp.Llama(str(trained_f32), n_threads=1, verbose=False)
    try:
        never = {i: float("-inf") for i in (50257, 50259, 50260, 50261, 50262)}

        def complete(prompt: str, max_tokens: int) -> str:
            out = llm(prompt, max_tokens=max_tokens, temperature=0, repeat_penalty=1.0, logit_bias=never)
            return out["choices"][0]["text"]

        assert sorted(never) == sorted(NEVER_SAMPLED)
        for row in rows:
            prompt = f"<|im_start|><|user|>\n{row['user']}<|im_end|>\n<|im_start|><|reasoning|>\n"
            reasoning = complete(prompt, 128)
            answer = complete(prompt + reasoning + "<|im_end|>\n<|im_start|><|assistant|>\n", 32)
            messages = [{"role": "user", "content": row["user"]}]
            ours = engine.generate(
                get_tokenizer().render_prompt(messages), SamplingParams(max_new_tokens=160)
            )
            assert (reasoning, answer) == (ours.reasoning, ours.answer)
    finally:
        llm.close()


def test_a_matrix_with_partial_q8_0_blocks_falls_back_to_f16():
    odd = ModelConfig(
        dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32, final_block=False
    )
    kinds = {name: kind for name, _, kind in gguf_tensors(Transformer(odd).state_dict(), odd, "q8_0")}
    q8, f16, f32 = (gguf.GGMLQuantizationType[k] for k in ("Q8_0", "F16", "F32"))
    assert kinds["blk.0.ffn_down.weight"] == q8  # rows of 64: two blocks of 32
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == f16  # rows of 48
    assert kinds["blk.0.ffn_norm.weight"] == f32
