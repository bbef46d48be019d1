"""RL with verifiable rewards: the objective by hand, the sampled-token mask, learning by reward alone,
exact resume, and the `rl` command."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cli_helpers import run_cli, run_clis
from reasoning_llama.config import RLConfig, load_config, load_run_config, pin_paths, recipe_names
from reasoning_llama.errors import ConfigError, DataError
from reasoning_llama.generation import Engine
from reasoning_llama.model import Transformer
from reasoning_llama.rl.loop import (
    PromptStream,
    RLTrainer,
    check_rl_config,
    held_out_report,
    load_task_rows,
    run_rl,
)
from reasoning_llama.rl.objective import (
    clipped_policy_loss,
    group_advantages,
    kl_estimate,
    zero_signal_groups,
)
from reasoning_llama.rl.rewards import make_checker, numbers_match
from reasoning_llama.rl.rollout import Sample, sampled_log_probs, sampled_positions
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import ASSISTANT, IM_END, IM_START, NEWLINE, get_tokenizer
from reasoning_llama.training import train
from reasoning_llama.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADER = [NEWLINE, IM_START, ASSISTANT, NEWLINE]


# --- the objective, by hand ------------------------------------------------------------------


def test_advantages_are_reward_minus_group_mean_optionally_over_the_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(
        group_advantages(rewards),
        torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, -0.75]]),
    )
    scaled = group_advantages(rewards, normalize_std=True)
    assert torch.allclose(scaled[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.allclose(scaled[2], torch.tensor([1, 1, 1, -3]) / math.sqrt(3), atol=1e-5)
    assert torch.equal(scaled[1], torch.zeros(4))  # no signal stays no signal, never 0/0
    assert zero_signal_groups(rewards).tolist() == [False, True, False]


def test_the_clipped_objective_and_its_gradient_match_hand_computed_values():
    ratios = [1.5, 0.5, 1.1, 1.5]
    log_probs = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, -1.0, -2.0, -1.0])
    loss, clipped = clipped_policy_loss(log_probs, old, advantages, n_tokens=4, clip_low=0.2, clip_high=0.2)
    # clip(r) = 1.2, 0.8, 1.1, 1.2; min(r A, clip(r) A) = 1.2, -0.8, -2.2, -1.5; -sum / 4.
    assert loss.item() == pytest.approx(0.825)
    # The clip cut the first two; the last one's ratio is outside the range, but its unclipped term is
    # the smaller (a bad token made likelier): it still learns, and is not counted.
    assert clipped.item() == pytest.approx(0.5)
    loss.backward()
    # Cut terms are constant in the ratio; the others' gradients are -r A / n: 1.1 * 2 / 4, 1.5 / 4.
    assert log_probs.grad.tolist() == pytest.approx([0.0, 0.0, 0.55, 0.375])


def test_on_the_first_update_the_objective_is_the_plain_token_level_policy_gradient():
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    advantages = torch.tensor([0.5, 0.5, -1.0, 2.0])
    loss, clipped = clipped_policy_loss(log_probs, log_probs.detach(), advantages, n_tokens=8)
    assert loss.item() == pytest.approx(-advantages.sum().item() / 8) and clipped.item() == 0.0
    loss.backward()
    assert torch.allclose(log_probs.grad, -advantages / 8)  # better than the group: its tokens go up


def test_kl_estimate_is_schulmans_k3():
    value = kl_estimate(torch.tensor([0.0, -1.0]), torch.tensor([math.log(0.5), -1.0]))
    assert value.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])


# --- rewards ---------------------------------------------------------------------------------


def test_checkers():
    exact, numeric = make_checker("exact"), make_checker("numeric")
    assert exact({"user": "q", "assistant": "Paris."}, " paris ") == 1.0
    assert exact({"user": "q", "assistant": "Paris"}, "Lyon") == 0.0
    assert numeric({"user": "q", "assistant": "x = 7"}, "the answer is 7.0") == 1.0
    assert numbers_match("1,250", "1250") and not numbers_match("12", "no number")
    # Synthetic rows use their family's checker whatever the named one: `07` is `7` for chain_sum.
    assert exact({"user": "q", "assistant": "7", "family": "chain_sum"}, "07") == 1.0
    custom = make_checker("reasoning_llama.rl.rewards:numbers_match")
    assert custom({"user": "q", "assistant": "3"}, "3.0") == 1.0
    with pytest.raises(ConfigError, match="unknown checker"):
        make_checker("fuzzy")
    with pytest.raises(ConfigError, match="cannot import"):
        make_checker("no.such.module:f")
    # A user's checker that fails or returns no number: one line naming it, never a traceback.
    row = {"user": "q", "assistant": "3"}
    with pytest.raises(ConfigError, match=r"checker 'math:hypot' raised TypeError"):
        make_checker("math:hypot")(row, "3")
    with pytest.raises(ConfigError, match=r"checker 'logging:debug' returned None; a reward is a number"):
        make_checker("logging:debug")(row, "3")


def test_a_users_checker_loads_from_the_working_directory_or_from_its_file(tmp_path, monkeypatch):
    """The installed `reasoning-llama` script has no working directory on sys.path, unlike `python -m`."""
    (tmp_path / "my_checker_module.py").write_text("def half(expected, predicted):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    row = {"user": "q", "assistant": "3"}
    assert make_checker("my_checker_module:half")(row, "3") == 0.5
    assert make_checker(f"{tmp_path}/my_checker_module.py:half")(row, "3") == 0.5
    with pytest.raises(ConfigError, match=r"the file nope.py does not exist"):
        make_checker("nope.py:half")
    with pytest.raises(ConfigError, match=r"cannot import 'whole' from .*or path/to/file.py:function$"):
        make_checker("my_checker_module.py:whole")
    # A file loads as an import would: a dataclass in it finds its module; a failure is one line.
    (tmp_path / "typed.py").write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n"
        "@dataclass\nclass Verdict:\n    score: float\n\n"
        "def judge(expected, predicted):\n    return Verdict(1.0).score\n"
    )
    assert make_checker(f"{tmp_path}/typed.py:judge")(row, "3") == 1.0
    (tmp_path / "broken.py").write_text("undefined_name\n")
    with pytest.raises(ConfigError, match=r"cannot import 'f' from .*broken.py' \(NameError"):
        make_checker(f"{tmp_path}/broken.py:f")
    # A run saves its checker file's absolute path, so --resume finds it from any directory.
    config = load_config(
        RLConfig, None, ["init_from=x", "data=qa.jsonl", "checker=my_checker_module.py:half"]
    )
    pin_paths(config)
    assert config.checker == f"{tmp_path}/my_checker_module.py:half"


# --- which tokens carry gradient -------------------------------------------------------------


def test_forced_header_and_budget_tokens_are_not_sampled_tokens():
    tokenizer = get_tokenizer()
    reasoning, answer = tokenizer.encode("one two"), tokenizer.encode("7")
    ids = [*reasoning, IM_END, *HEADER, *answer, IM_END]
    expected = [True] * (len(reasoning) + 1) + [False] * 4 + [True] * (len(answer) + 1)
    assert sampled_positions(ids, None) == expected
    # With a budget of 1 the engine itself closes the reasoning: that <|im_end|> was forced too.
    budgeted = [reasoning[0], IM_END, *HEADER, *answer, IM_END]
    assert sampled_positions(budgeted, 1) == [True, False] + [False] * 4 + [True] * (len(answer) + 1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_log_probs_are_the_models_own_at_the_sampled_tokens_only(tiny_config, temperature):
    model = Transformer(tiny_config)
    tokenizer = get_tokenizer()
    samples = []
    for user, completion in (("Hi", "a b"), ("A longer question here", "c")):
        prompt = tokenizer.render_prompt([{"role": "user", "content": user}])
        ids = [*tokenizer.encode(completion), IM_END, *HEADER, *tokenizer.encode("9"), IM_END]
        samples.append(Sample(prompt, ids, sampled_positions(ids, None), "9", 1.0, True, True))
    got = sampled_log_probs(model, samples, temperature=temperature)
    expected = []
    for s in samples:  # each sequence alone, the plain way: full logits, log-softmax, pick
        sequence = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = model(sequence[:, :-1])[0] / temperature
        picked = F.log_softmax(logits, -1).gather(1, sequence[0, 1:, None])[:, 0]
        start = len(s.prompt_ids) - 1
        expected += [picked[start + j] for j, chosen in enumerate(s.sampled) if chosen]
    assert len(got) == sum(s.n_sampled for s in samples)  # no prompt or header position
    assert torch.allclose(got, torch.stack(expected), atol=1e-4)
    got.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_packaged_rl_recipes_are_valid_and_set_every_familys_difficulty():
    assert recipe_names(rl=True) == ["rl-chain-sum", "rl-max-digit"]
    for recipe in recipe_names(rl=True):
        config = load_config(RLConfig, recipe, ["init_from=runs/quickstart"])
        check_rl_config(config)
        assert set(config.difficulty) == {*config.families, *config.eval_families}, recipe


def test_a_recipes_families_with_a_file_name_the_setting_that_keeps_the_file(tmp_path):
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"user": f"{i}?", "assistant": str(i)}) + "\n" for i in range(10)))
    both = ["init_from=runs/quickstart", f"data={rows}"]
    with pytest.raises(
        ConfigError, match=r"not both; keep the file with --set 'families=\[\]', or the"
    ) as info:
        check_rl_config(load_config(RLConfig, "rl-chain-sum", both))
    keep_file = str(info.value).split("keep the file with --set ")[1].split(",")[0].strip("'")
    config = load_config(RLConfig, "rl-chain-sum", [*both, keep_file])
    check_rl_config(config)
    train_rows, held_out = load_task_rows(config)
    assert len(train_rows) + len(held_out) == 10


def test_a_directory_holding_several_splits_is_refused_with_the_data_flag_that_reads_one(tmp_path):
    """Reading every file of a hub-layout directory would practise on the test split."""
    for split in ("train", "test"):
        rows = [{"user": f"{split} {i}?", "assistant": str(i)} for i in range(5)]
        (tmp_path / f"{split}-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(RLConfig, None, ["init_from=x", f"data={tmp_path}"])
    with pytest.raises(DataError, match="holds several splits") as info:
        load_task_rows(config)
    flag = str(info.value).split("read one with ")[1]
    assert flag == f'--data "{tmp_path}/train*"'
    config.data = flag.removeprefix("--data ").strip('"')
    train_rows, held_out = load_task_rows(config)
    assert all(r["user"].startswith("train") for r in [*train_rows, *held_out])
    assert len(train_rows) + len(held_out) == 5


def test_prompts_follow_a_seeded_order_that_depends_on_the_step_alone():
    rows = [{"user": str(i), "assistant": str(i)} for i in range(10)]
    stream = PromptStream(rows, per_step=4, seed=3)
    epoch = [r["user"] for step in range(5) for r in stream.rows_for(step)][:10]
    assert sorted(epoch) == sorted(r["user"] for r in rows)  # every row once per epoch
    assert PromptStream(rows, 4, seed=3).rows_for(4) == stream.rows_for(4)
    assert PromptStream(rows, 4, seed=4).rows_for(0) != stream.rows_for(0)


# --- learning by reward alone ----------------------------------------------------------------


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def digit_model(tmp_path_factory):
    """A tiny model taught to answer "Say a digit." with any digit at random (so ~1 in 10 is a 7)."""
    root = tmp_path_factory.mktemp("digits")
    rows = [{"user": "Say a digit.", "reasoning": "ok", "assistant": str(i % 10)} for i in range(400)]
    config = load_run_config(
        None,
        [
            "train.model_overrides={dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64, max_seq_len: 64}",
            "data.source=local",
            f"data.path={write_rows(root / 'sft.jsonl', rows)}",
            "data.seq_len=64",
            f"data.cache_dir={root / 'cache'}",
            "train.micro_batch_size=8",
            "train.global_batch_tokens=512",
            "train.max_steps=150",
            "train.warmup_steps=5",
            "train.lr=1e-2",
            "train.weight_decay=0",
            "train.eval_every=1000",
            "train.save_every=1000",
            "train.task_eval_size=0",
            "train.log_every=1000",
            "train.device=cpu",
        ],
    )
    threads = torch.get_num_threads()  # module fixtures run before the per-test thread setting
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            train(config, root / "sft", progress=False)
    finally:
        torch.set_num_threads(threads)
    prompts = write_rows(root / "sevens.jsonl", [{"user": "Say a digit.", "assistant": "7"}] * 50)
    return root / "sft/checkpoints/step-000150", prompts


def digit_rl(checkpoint, prompts, *overrides: str) -> RLConfig:
    return load_config(
        RLConfig,
        None,
        [
            f"init_from={checkpoint}",
            f"data={prompts}",
            "checker=exact",
            "prompts_per_step=8",
            "samples_per_prompt=8",
            "max_new_tokens=8",
            "lr=1e-3",
            "warmup_steps=1",
            "eval_size=4",
            "save_every=2",
            "device=cpu",
            *overrides,
        ],
    )


@pytest.mark.slow
# SGD at 0.1: larger steps overshoot on some CPUs' rounding (at 0.5 the reward went 0.75, then 0 and
# stayed there on an AVX-512 CPU; at 0.15-0.2 it dipped to ~0.05 for a step); 0.1 rose smoothly on both.
# AdamW at 1e-3 rises more slowly on some CPUs (0.87 over steps 13-15 on a Xeon, 1.0 from step 19).
@pytest.mark.parametrize(
    "optimizer", [["optimizer=adamw", "max_steps=20"], ["optimizer=sgd", "lr=0.1", "beta1=0", "max_steps=15"]]
)
def test_reward_alone_teaches_the_answer_it_rewards(digit_model, tmp_path, optimizer):
    checkpoint, prompts = digit_model
    run = tmp_path / "rl"
    config = digit_rl(checkpoint, prompts, *optimizer)
    result = run_rl(config, run, progress=False, echo=lambda _: None)
    steps = [r for r in read_metrics(run) if "reward_mean" in r]
    first, last = steps[0]["reward_mean"], sum(r["reward_mean"] for r in steps[-3:]) / 3
    assert first < 0.3, first  # before any update: about one sample in ten says 7
    assert last > 0.9, (first, last)  # a flipped sign would drive it to 0; gradient on the prompt, nowhere
    assert result.evaluations[config.max_steps]["acc/data"] == 1.0  # greedy answers on held-out rows: 7
    # Every sample is right at the end, so no group carries signal any more.
    assert steps[-1]["kl"] > 0 and steps[-1]["zero_signal_groups"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [["optimizer=adamw"], ["optimizer=sgd", "lr=0.05", "beta1=0.9"]])
def test_resume_gives_the_weights_of_an_uninterrupted_run(digit_model, tmp_path, optimizer):
    checkpoint, prompts = digit_model
    quiet = {"progress": False, "echo": lambda _: None}
    setting = ["updates_per_batch=2", *optimizer]  # SGD's momentum is state a resume must restore
    run_rl(digit_rl(checkpoint, prompts, "max_steps=4", *setting), tmp_path / "a", **quiet)
    run_rl(digit_rl(checkpoint, prompts, "max_steps=2", *setting), tmp_path / "b", **quiet)
    trainer = RLTrainer(
        digit_rl(checkpoint, prompts, "max_steps=4", *setting),
        tmp_path / "b",
        resume=True,
        **quiet,
    )
    assert trainer.step == 2
    result = trainer.run()
    a = load_file(tmp_path / "a/checkpoints/step-000004/model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/step-000004/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [r for r in read_metrics(tmp_path / "b") if "reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # The resumed run knows the evaluation before its resume (the summary's "before"), and a
    # finished run resumed evaluates nothing again: one record per evaluated step.
    assert min(result.evaluations) == 0 and max(result.evaluations) == 4
    again = RLTrainer(
        digit_rl(checkpoint, prompts, "max_steps=4", *setting), tmp_path / "b", resume=True, **quiet
    )
    assert again.run().evaluations == result.evaluations
    evaluated = [r["step"] for r in read_metrics(tmp_path / "b") if any(k.startswith("acc/") for k in r)]
    assert evaluated == sorted(set(evaluated)) and evaluated[0] == 0 and evaluated[-1] == 4


def test_a_resume_without_the_starting_model_says_why_it_needs_it(digit_model, tmp_path):
    checkpoint, prompts = digit_model
    shutil.copytree(checkpoint, tmp_path / "start")
    config = digit_rl(tmp_path / "start", prompts, "max_steps=2", "save_every=1", "eval_size=1")
    quiet = {"progress": False, "echo": lambda _: None}
    RLTrainer(dataclasses.replace(config, max_steps=1), tmp_path / "run", **quiet).run()
    shutil.rmtree(tmp_path / "start")
    with pytest.raises(ConfigError, match=r"start, the model this RL run started from, is gone; .* KL"):
        RLTrainer(config, tmp_path / "run", resume=True, **quiet)
    # Put back elsewhere, it is named again as any init_from: a run directory names its checkpoint.
    from reasoning_llama.cli.run_settings import run_settings

    shutil.copytree(checkpoint.parent.parent, tmp_path / "moved")
    settings = run_settings(
        RLConfig, tmp_path / "run", None, [f"init_from={tmp_path / 'moved'}"],
        resume=True, overwrite=False, command="rl", how_to_start="--init-from",
    )  # fmt: skip
    named = Path(settings.init_from)
    assert tmp_path / "moved" in named.parents and (named / "config.json").is_file()
    RLTrainer(settings, tmp_path / "run", resume=True, **quiet)
    # Another model there (another shape) is named as such, not a tensor size mismatch.
    from reasoning_llama.config import ModelConfig
    from reasoning_llama.model import Transformer
    from reasoning_llama.model_files import load_config, save_model

    other = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64)
    save_model(tmp_path / "other", Transformer(other))
    with pytest.raises(ConfigError, match="holds another model than the one this RL run started from"):
        RLTrainer(
            dataclasses.replace(settings, init_from=str(tmp_path / "other")),
            tmp_path / "run",
            resume=True,
            **quiet,
        )
    # So is another model of the same shape: a KL against it would measure something else.
    save_model(tmp_path / "same_shape", Transformer(load_config(checkpoint)))
    with pytest.raises(ConfigError, match="holds other weights than the model this RL run started from"):
        RLTrainer(
            dataclasses.replace(settings, init_from=str(tmp_path / "same_shape")),
            tmp_path / "run",
            resume=True,
            **quiet,
        )


def test_what_would_fail_in_the_run_fails_before_it_begins(digit_model, tmp_path):
    """A checker that raises, or prompts beyond the context, are found before the run directory holds
    a run (so the same command works once fixed); prompts that do not fit are left out, said once."""
    checkpoint, prompts = digit_model
    (tmp_path / "checks.py").write_text("def broken(expected, given):\n    raise ValueError('boom')\n")
    quiet = {"progress": False, "echo": lambda _: None}
    with pytest.raises(ConfigError, match="raised ValueError: boom"):
        RLTrainer(
            digit_rl(checkpoint, prompts, f"checker={tmp_path / 'checks.py'}:broken"),
            tmp_path / "run",
            **quiet,
        )
    assert not (tmp_path / "run").exists()
    rows = [{"user": "Say a digit.", "assistant": "7"}] * 10 + [{"user": "word " * 80, "assistant": "7"}]
    said = []
    trainer = RLTrainer(
        digit_rl(checkpoint, write_rows(tmp_path / "long.jsonl", rows), "prompts_per_step=2", "eval_size=1"),
        tmp_path / "run",
        progress=False,
        echo=said.append,
    )  # the 64-token context holds 56 prompt tokens beside max_new_tokens 8
    held_out = 1  # eval_size: one of the 11 rows is held out (here a short one), the long one trained
    assert [m for m in said if "left out" in m] == [
        f"warning: 1 of {11 - held_out} train prompts of --data {tmp_path / 'long.jsonl'} are left out: with "
        "max_new_tokens 8 they do not fit the model's context of 64 (the longest is 89 tokens)"
    ]
    assert all(len(r["user"]) < 50 for r in trainer.prompts.rows)


def test_a_file_too_small_to_hold_prompts_out_says_so(digit_model, tmp_path):
    checkpoint, _ = digit_model
    few = write_rows(tmp_path / "few.jsonl", [{"user": "Say a digit.", "assistant": "7"}] * 4)
    said = []
    RLTrainer(
        digit_rl(checkpoint, few, "prompts_per_step=2"), tmp_path / "run", progress=False, echo=said.append
    )
    assert any(m.startswith("warning: no prompts held out") for m in said)


def test_a_recipe_of_the_other_command_is_named_so():
    with pytest.raises(
        ConfigError, match="quickstart is a recipe of `reasoning-llama train`; this command's are: rl-"
    ):
        load_config(RLConfig, "quickstart")
    with pytest.raises(ConfigError, match="rl-max-digit is a recipe of `reasoning-llama rl`"):
        load_run_config("rl-max-digit")


def test_clipping_counts_every_update_and_no_clip_is_grad_clip_zero(digit_model, tmp_path):
    checkpoint, prompts = digit_model
    quiet = {"progress": False, "echo": lambda _: None}
    config = digit_rl(
        checkpoint, prompts, "max_steps=2", "updates_per_batch=4", "lr=3e-3", "eval_size=1", "grad_clip=0"
    )
    run_rl(config, tmp_path / "run", **quiet)
    steps = [r for r in read_metrics(tmp_path / "run") if "clipped" in r]
    assert any(r["clipped"] > 0 for r in steps)  # later updates move the ratios off 1 (the first never)
    assert steps[-1]["kl"] > 0  # grad_clip 0: unclipped gradients, which moved the policy
    with pytest.raises(ConfigError, match="eval_every must be >= 0, got -1"):
        check_rl_config(digit_rl(checkpoint, prompts, "eval_every=-1"))
    with pytest.raises(ConfigError, match=r"clip_low must be in \[0, 1\), got 1.5"):
        check_rl_config(digit_rl(checkpoint, prompts, "clip_low=1.5"))


def test_a_run_started_over_logs_its_first_evaluation_once(digit_model, tmp_path):
    checkpoint, prompts = digit_model
    quiet = {"progress": False, "echo": lambda _: None}
    config = digit_rl(checkpoint, prompts, "max_steps=1", "eval_size=1")
    run_rl(config, tmp_path / "run", **quiet)
    shutil.rmtree(tmp_path / "run/checkpoints")  # as if killed before its first checkpoint
    (tmp_path / "run/latest").unlink()
    run_rl(config, tmp_path / "run", resume=True, **quiet)
    evaluated = [r["step"] for r in read_metrics(tmp_path / "run") if "acc/data" in r]
    assert evaluated == [0, 1]


@pytest.mark.slow
def test_the_kl_is_penalised_over_every_sample_and_reported_from_a_few(digit_model, tmp_path):
    checkpoint, prompts = digit_model

    def two_steps(name: str, *overrides: str) -> tuple[dict[str, torch.Tensor], float]:
        config = digit_rl(checkpoint, prompts, "max_steps=2", "eval_size=1", *overrides)
        run_rl(config, tmp_path / name, progress=False, echo=lambda _: None)
        weights = load_file(tmp_path / name / "checkpoints/step-000002/model.safetensors")
        return weights, [r for r in read_metrics(tmp_path / name) if "kl" in r][-1]["kl"]

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    free_all, kl_free_all = two_steps("free_all", "kl_samples=0")
    free_few, kl_free_few = two_steps("free_few", "kl_samples=4")
    assert same(free_all, free_few)  # reported only: how much of it is measured changes nothing
    assert kl_free_all > 0 and kl_free_few > 0
    held_all, kl_held_all = two_steps("held_all", "kl_coef=1.0", "kl_samples=0")
    held_few, kl_held_few = two_steps("held_few", "kl_coef=1.0", "kl_samples=4")
    assert same(held_all, held_few) and kl_held_all == kl_held_few  # penalised: over every sample
    assert not same(held_all, free_all)


@pytest.mark.slow
def test_the_rl_command_runs_plots_and_refuses_bad_setups(digit_model, tmp_path):
    checkpoint, prompts = digit_model
    run = tmp_path / "run"
    done = run_cli(
        "rl", "--init-from", checkpoint.parent.parent, "--data", prompts, "--checker", "exact", "--out", run,
        "--set", "max_steps=2", "--set", "prompts_per_step=2", "--set", "samples_per_prompt=2",
        "--set", "max_new_tokens=8", "--set", "eval_size=2", "--set", "device=cpu", "--no-progress",
        one_thread=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "max_steps at step 2" in done.stderr and "acc/data" in done.stderr
    assert (run / "checkpoints/step-000002/model.safetensors").is_file()
    assert run_cli("plot", run).returncode == 0 and (run / "plot.png").is_file()
    again = run_cli("rl", "--init-from", checkpoint, "--data", prompts, "--out", run)
    assert (
        again.returncode == 2 and f"continue it with: reasoning-llama rl --out {run} --resume" in again.stderr
    )
    # Each command resumes its own runs, and names the other's command for the other's.
    as_training, as_rl, new_training = run_clis(
        [
            ("train", "--out", run, "--resume"),
            ("rl", "--out", checkpoint.parent.parent, "--resume"),
            ("train", "--out", run, "--preset", "tiny"),
        ]
    )
    assert f"already holds a run; continue it with: reasoning-llama rl --out {run} --resume" in (
        new_training.stderr
    )
    assert (
        f"holds a run of `rl`, not `train`; resume it with: reasoning-llama rl --out {run} --resume"
        in as_training.stderr
    )
    assert "holds a run of `train`, not `rl`; resume it with: reasoning-llama train --out" in as_rl.stderr
    neither, both = run_clis(
        [
            ("rl", "--init-from", checkpoint, "--out", tmp_path / "x"),
            (
                "rl",
                "--init-from",
                checkpoint,
                "--task",
                "synthetic:add",
                "--data",
                prompts,
                "--out",
                tmp_path / "x",
            ),
        ]
    )
    assert neither.returncode == 2 and "--task synthetic:FAMILY" in neither.stderr
    assert both.returncode == 2 and "give --task or --data, not both" in both.stderr
    unknown = run_cli("rl", "--init-from", checkpoint, "--task", "synthetic:nope", "--out", tmp_path / "y")
    assert unknown.returncode == 2 and "unknown synthetic family nope" in unknown.stderr
    optimizer = run_cli(
        "rl", "--init-from", checkpoint, "--task", "synthetic:add", "--out", tmp_path / "z", "--set", "optimizer=lion"
    )  # fmt: skip
    assert optimizer.returncode == 2 and "unknown optimizer 'lion'; use adamw or sgd" in optimizer.stderr
    if not torch.cuda.is_available():
        gpu = run_cli(
            "rl",
            "--init-from",
            checkpoint,
            "--task",
            "synthetic:add",
            "--out",
            tmp_path / "g",
            "--set",
            "device=cuda",
        )
        assert gpu.returncode == 2 and "use --set device=cpu" in gpu.stderr


def test_held_out_exact_match_counts_full_credit_only(digit_model):
    """A checker's partial credit is reward, not a right answer: acc and pass@G both count full credit."""
    checkpoint, _ = digit_model
    engine = Engine.from_checkpoint(checkpoint, device="cpu")
    rows = [{"user": "Say a digit.", "assistant": "7"}] * 3
    params = SamplingParams(max_new_tokens=8)
    for credit, expected in ((1.0, 1.0), (0.5, 0.0)):
        report = held_out_report(engine, rows, lambda row, answer, c=credit: c, params, 2, seed=0)
        assert report == {"acc/data": expected, "pass@2/data": expected}, credit


def test_the_default_task_rows_come_even_from_a_family_smaller_than_train_size():
    """`rl --task synthetic` (chain_sum, sort_digits, count_letter at their defaults): count_letter holds
    fewer distinct train problems than the default train_size, and gives all it has."""
    from reasoning_llama.rl.loop import load_task_rows
    from reasoning_llama.tasks import DEFAULT_FAMILIES

    config = load_config(RLConfig, None, [f"families=[{','.join(DEFAULT_FAMILIES)}]"])
    train_rows, held_out = load_task_rows(config)
    assert config.train_size * len(DEFAULT_FAMILIES) > len(train_rows) > (config.train_size - 1000) * 3
    assert len({row["user"] for row in train_rows}) == len(train_rows) and held_out


def test_init_from_as_a_setting_takes_a_run_directory_too(digit_model, tmp_path):
    from reasoning_llama.cli.run_settings import run_settings

    checkpoint, prompts = digit_model
    run = checkpoint.parent.parent  # its latest checkpoint is `checkpoint` (no best: no validation)
    settings = run_settings(
        RLConfig, tmp_path / "rl", None, [f"init_from={run}", f"data={prompts}"],
        resume=False, overwrite=False, command="rl", how_to_start="--init-from",
    )  # fmt: skip
    assert settings.init_from in (str(checkpoint), str(run / "best"))
