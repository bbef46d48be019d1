"""The training loop on a tiny model: it learns, resumes exactly, stops early, refuses bad setups."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run_cli
from reasoning_llama.config import RunConfig, load_run_config
from reasoning_llama.errors import ConfigError
from reasoning_llama.training import TrainingDiverged, train
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training.metrics import read_metrics

TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_run(tmp_path, *overrides: str) -> RunConfig:
    """A 1-layer, 32-wide model on a few hundred synthetic problems: a step takes milliseconds."""
    return load_run_config(
        None,
        [
            "train.model_overrides={dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64, max_seq_len: 128}",
            "data.seq_len=128",
            "data.synthetic_train_size=120",
            "data.synthetic_val_size=12",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.micro_batch_size=4",
            "train.global_batch_tokens=1024",  # 2 micro-batches per step: accumulation is exercised
            "train.max_steps=6",
            "train.warmup_steps=2",
            "train.lr=3e-3",
            "train.eval_every=3",
            "train.eval_batches=2",
            "train.save_every=2",
            "train.log_every=1",
            "train.task_eval_size=0",
            *overrides,
        ],
    )


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
def test_short_run_lowers_validation_loss_and_writes_the_run_layout(tmp_path):
    run = tmp_path / "run"
    result = train(
        tiny_run(tmp_path, "train.max_steps=10", "train.eval_every=5", "train.lr=1e-2"), run, progress=False
    )
    assert result.stop_reason == "finished" and result.step == 10
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert len(val) == 2
    assert val[1] < val[0] < 10.83  # below ln(50263), the loss of a uniform guess, and still falling
    assert (run / "run_config.yaml").is_file()
    assert (run / "latest").read_text().strip() == "checkpoints/step-000010"
    # keep_last=2: steps 8 and 10 remain; the best model lives in RUN/best.
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000008", "step-000010"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        assert (run / "checkpoints/step-000010" / name).is_file()
    best = json.loads((run / "best/best.json").read_text())
    assert best == {"step": 10, "val_loss": pytest.approx(val[1])}
    train_records = [r for r in read_metrics(run) if "train_loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 11))
    assert {"lr", "grad_norm", "tokens_per_s", "tokens", "epoch"} <= set(train_records[0])


@pytest.mark.slow
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    extra = ("train.task_eval_every=3", "train.task_eval_size=3")  # engine runs inside the loop too
    one_go = train(tiny_run(tmp_path, *extra), tmp_path / "a", progress=False)
    first = train(tiny_run(tmp_path, *extra), tmp_path / "b", progress=False, stop_at_step=3)
    assert first.stop_reason == "stop_at_step" and first.step == 3
    assert (tmp_path / "b/latest").read_text().strip() == "checkpoints/step-000003"
    resumed = train(tiny_run(tmp_path, *extra), tmp_path / "b", progress=False, resume=True)
    assert one_go.step == resumed.step == 6

    a = load_file(tmp_path / "a/checkpoints/step-000006/model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/step-000006/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert deterministic(read_metrics(tmp_path / "a")) == deterministic(read_metrics(tmp_path / "b"))
    assert (tmp_path / "a/best/best.json").read_text() == (tmp_path / "b/best/best.json").read_text()
    state_a = ckpt.load_trainer_state(tmp_path / "a/checkpoints/step-000006")
    state_b = ckpt.load_trainer_state(tmp_path / "b/checkpoints/step-000006")
    assert state_a["loader"] == state_b["loader"] and state_a["progress"] == state_b["progress"]


def test_early_stopping_when_validation_stops_improving(tmp_path):
    # An lr far below float32 resolution leaves the weights unchanged, so the loss never improves again.
    config = tiny_run(
        tmp_path,
        "train.lr=1e-12",
        "train.eval_every=1",
        "train.early_stopping_patience=2",
        "train.max_steps=50",
    )
    result = train(config, tmp_path / "run", progress=False)
    assert result.stop_reason == "early_stopping"
    assert result.step == 3 and result.best_step == 1
    assert (tmp_path / "run/latest").read_text().strip() == "checkpoints/step-000003"
    # Without validations it could never stop a run: said, not silently ignored.
    said = []
    quiet = tiny_run(
        tmp_path,
        "train.eval_every=0",
        "train.task_eval_every=0",
        "train.early_stopping_patience=2",
        "train.max_steps=1",
    )
    train(quiet, tmp_path / "quiet", progress=False, echo=said.append)
    assert "never stops this run: train.eval_every and train.task_eval_every are 0" in " ".join(said)
    # Nor, without validation rows or task evaluations, does a run say or log empty evaluations.
    said.clear()
    bare = tiny_run(tmp_path, "data.synthetic_val_size=0", "train.task_eval_size=0", "train.max_steps=3")
    train(bare, tmp_path / "bare", progress=False, echo=said.append)
    assert not [line for line in said if line.startswith("step ")]
    assert all(len(r) > 1 for r in read_metrics(tmp_path / "bare"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(tiny_run(tmp_path, "train.max_steps=2"), run, progress=False)
    good = load_file(run / "checkpoints/step-000002/model.safetensors")
    with pytest.raises(TrainingDiverged) as failure:
        train(
            tiny_run(tmp_path, "train.lr=1e30", "train.max_steps=20", "train.save_every=2"),
            run,
            resume=True,
            progress=False,
        )
    message = str(failure.value)
    assert "diverged" in message and "step-000002" in message and "train.lr" in message
    assert (run / "latest").read_text().strip() == "checkpoints/step-000002"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000002"]
    after = load_file(run / "checkpoints/step-000002/model.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)
    # The command the message suggests works: it resumes from step 2 with the lower rate it names
    # (5e29 here, still far too high, so it diverges again and suggests half of that in turn).
    command = shlex.split(message.split("resume it with a lower learning rate: ")[1].split(". Lower")[0])
    assert command[:2] == ["reasoning-llama", "train"] and "train.lr=5e+29" in command
    resumed = run_cli(*command[1:], "--no-progress", one_thread=True)
    assert "step-000002 (step 2 of 20)" in resumed.stderr, resumed.stderr
    assert "training diverged" in resumed.stderr and "--set train.lr=2.5e+29" in resumed.stderr


def test_a_run_diverging_before_its_first_checkpoint_says_how_to_start_it_over(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as failure:
        train(tiny_run(tmp_path, "train.lr=1e30", "train.save_every=0"), run, progress=False)
    assert (
        "no checkpoint was written yet; start it over with a lower learning rate: "
        f"reasoning-llama train --out {run} --resume --set train.lr=5e+29."
    ) in str(failure.value)
    # --resume of a run without a checkpoint starts it over (a new start would find the run there).
    result = train(tiny_run(tmp_path, "train.lr=1e-3", "train.max_steps=2"), run, resume=True, progress=False)
    assert result.step == 2 and [r["step"] for r in read_metrics(run) if "train_loss" in r] == [1, 2]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.seq_len=256", "exceeds the model's context"),
        ("train.dtype=float8", "train.dtype must be one of"),
        ("train.micro_batch_size=0", "train.micro_batch_size must be positive"),
        ("train.model_overrides={depth: 3}", "train.model_overrides: unknown model config keys: depth"),
        (
            "train.model_overrides={dim: thirty}",
            "train.model_overrides: .*dim must be an integer, got 'thirty'",
        ),
        ("train.model_overrides={final_block: 'no'}", "final_block must be true or false, got 'no'"),
        ("train.model_overrides={dim: 32.0}", "dim must be an integer, got 32.0"),
        ("train.model_overrides={norm_eps: -1}", "norm_eps must be positive and finite, got -1"),
        (
            "train.model_overrides={vocab_size: 10}",
            r"vocab_size \(10\) is smaller than the tokenizer's 50263",
        ),
        ("train.beta2=-1", r"train.beta2 must be in \[0, 1\), got -1"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("train.lr=.inf", "train.lr must be > 0 and finite, got inf"),
        ("train.eval_batches=0", "train.eval_batches must be positive, got 0"),
        ("train.min_lr_ratio=2", r"train.min_lr_ratio must be in \[0, 1\], got 2"),
        ("train.attention=dense", "train.attention must be auto, flex, varlen or sdpa, got 'dense'"),
        ("train.attention=varlen", "train.attention=varlen needs a GPU .*; pass --set train.attention=sdpa$"),
        (
            "train.global_batch_tokens=100",
            r"micro-batch of 4 rows x 128 tokens \(512\); pass --set train.micro_batch_size=1 or",
        ),
        (
            "train.global_batch_tokens=50",
            r"\(512\); pass --set train.global_batch_tokens=512$",
        ),  # one row is too many
    ],
)
def test_bad_settings_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_run(tmp_path, override), tmp_path / "run", progress=False)


def test_a_resume_already_at_its_stop_or_past_its_plan(tmp_path):
    """--stop-at-step at the step a run already reached does no step; a plan shorter than the steps
    already taken is refused, and the saved settings stay as they were."""
    run = tmp_path / "run"
    train(tiny_run(tmp_path), run, stop_at_step=2, progress=False)
    result = train(tiny_run(tmp_path), run, resume=True, stop_at_step=2, progress=False)
    assert (result.step, result.stop_reason) == (2, "stop_at_step")
    saved = (run / "run_config.yaml").read_text()
    with pytest.raises(ConfigError, match="the run is at step 2, past the 1 steps these settings plan"):
        train(tiny_run(tmp_path, "train.max_steps=1"), run, resume=True, progress=False)
    assert (run / "run_config.yaml").read_text() == saved


def test_attention_settings_on_a_gpu():
    from reasoning_llama.training.loop import attention_kind

    gpu = torch.device("cuda")  # named only: nothing runs on it
    assert attention_kind("auto", gpu, torch.bfloat16) == "flex"
    assert attention_kind("auto", torch.device("cpu"), None) == "sdpa"
    assert attention_kind("varlen", gpu, torch.bfloat16) == "varlen"  # this torch has varlen_attn
    with pytest.raises(ConfigError, match=r"takes no float32\); pass --set train.dtype=bfloat16"):
        attention_kind("varlen", gpu, None)


def test_a_checkpoint_too_short_for_the_data_says_to_shorten_the_data(tmp_path):
    """The model of train.init_from cannot be overridden, so the hint names data.seq_len alone."""
    train(tiny_run(tmp_path, "train.max_steps=1"), tmp_path / "start", progress=False)  # context 128
    start = f"train.init_from={tmp_path / 'start/checkpoints/step-000001'}"
    with pytest.raises(
        ConfigError, match=r"exceeds the model's context \(128\); pass --set data.seq_len=128"
    ) as info:
        train(
            tiny_run(tmp_path, start, "data.seq_len=256", "train.model_overrides={}"),
            tmp_path / "run",
            progress=False,
        )
    assert "model_overrides" not in str(info.value)


def test_model_overrides_that_contradict_init_from_name_settings_that_agree(tmp_path):
    """A recipe's model_overrides cannot be dropped on the command line: the hint sets them to the
    checkpoint's values instead, which then runs."""
    train(tiny_run(tmp_path, "train.max_steps=1"), tmp_path / "start", progress=False)  # dim 32, 1 layer
    start = f"train.init_from={tmp_path / 'start/checkpoints/step-000001'}"
    wider = "train.model_overrides={dim: 48, n_layers: 2}"
    with pytest.raises(ConfigError, match=r"dim=48, n_layers=2 cannot apply") as info:
        train(tiny_run(tmp_path, start, wider), tmp_path / "run", progress=False)
    hint = re.search(r"pass the checkpoint's values: (.*)$", str(info.value)).group(1)
    assert hint == "--set train.model_overrides.dim=32 --set train.model_overrides.n_layers=1"
    suggested = [s.removeprefix("--set ") for s in hint.split(" --set ")]
    result = train(
        tiny_run(tmp_path, start, wider, "train.max_steps=1", *suggested), tmp_path / "run", progress=False
    )
    assert result.step == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_names_the_setting_that_picks_the_cpu(tmp_path):
    with pytest.raises(
        ConfigError, match=r"CUDA is not available on this machine; use --set train.device=cpu"
    ):
        train(tiny_run(tmp_path, "train.device=cuda"), tmp_path / "run", progress=False)


def test_local_paths_are_pinned_so_a_run_resumes_from_anywhere(tmp_path, monkeypatch):
    from reasoning_llama.config import RLConfig, load_config, pin_paths, setting

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text("")
    (tmp_path / "start").mkdir()
    config = load_run_config(None, ["data.source=local", "data.path=rows.jsonl", "train.init_from=start"])
    pin_paths(config)
    assert (config.data.path, config.train.init_from) == (
        str(tmp_path / "rows.jsonl"),
        str(tmp_path / "start"),
    )
    for source, name, pinned in (
        ("hub", "KingNish/reasoning-base-20k", "KingNish/reasoning-base-20k"),  # no local path
        ("local", "shards/*.jsonl", str(tmp_path / "shards/*.jsonl")),  # a glob, matching or not
    ):
        config = load_run_config(None, [f"data.source={source}", f'data.path="{name}"'])
        pin_paths(config)
        assert config.data.path == pinned
    # A directory named like the default hub dataset is no path of a synthetic run's.
    (tmp_path / "KingNish/reasoning-base-20k").mkdir(parents=True)
    config = load_run_config(None, [])
    pin_paths(config)
    assert config.data.path == "KingNish/reasoning-base-20k"
    with pytest.raises(ConfigError, match=r"--set data.path=\*.jsonl: YAML cannot read the value .*quote it"):
        load_run_config(None, ["data.path=*.jsonl"])  # unquoted, YAML reads an alias
    # What the commands build from their path options stays the path, whatever it holds.
    for path in ("*.jsonl", "runs/a: b", "qa[1].jsonl", "runs/😀 é"):
        assert load_config(RLConfig, None, [setting("data", path)]).data == path
    assert load_run_config(None, ["data.system_prompt=a\tb"]).data.system_prompt == "a\tb"  # as before
    rl = load_config(RLConfig, None, ["data=rows.jsonl", "init_from=start"])
    pin_paths(rl)
    assert (rl.data, rl.init_from) == (str(tmp_path / "rows.jsonl"), str(tmp_path / "start"))


def test_an_override_without_a_value_says_so():
    with pytest.raises(ConfigError, match=r"--set train.lr: give key=value, e.g. --set train.lr=3e-4"):
        load_run_config(None, ["train.lr"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lr=1e-3"], r"Key 'lr' not in 'RunConfig' \(did you mean train.lr\?\)"),
        (["seq_len=64"], r"did you mean data.seq_len\?"),
        (["data.families=chain_sum"], r"a list is written \[a, b\]"),
        (["train.lr=abc"], r"^bad config: train.lr: Value 'abc' of type 'str' could not be converted"),
    ],
)
def test_common_override_mistakes_get_a_hint(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


@pytest.mark.parametrize(
    "text, message",
    [
        (b"train:\n  lr: [1\n", "is not a readable YAML file: while parsing"),
        (b"train:\n\tlr: 1\n", "is not a readable YAML file"),  # a tab in the indentation
        (b"\xff\xfe", "is not a readable YAML file: 'utf-8' codec"),
        (b"- train\n- data\n", "must hold settings as a mapping"),
    ],
)
def test_a_broken_recipe_file_is_one_line(tmp_path, text, message):
    (tmp_path / "recipe.yaml").write_bytes(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config(tmp_path / "recipe.yaml")
    assert "\n" not in str(info.value)


def test_epochs_set_the_number_of_steps(tmp_path):
    result = train(
        tiny_run(tmp_path, "train.epochs=1", "train.eval_every=0"), tmp_path / "run", progress=False
    )
    # 120 examples of ~45 tokens packed into rows of 128, 4 rows a micro-batch, 2 micro-batches a step.
    assert 3 <= result.total_steps <= 8 and result.step == result.total_steps


def test_init_from_starts_from_the_checkpoint_weights(tmp_path):
    train(tiny_run(tmp_path, "train.max_steps=2", "train.lr=1e-2"), tmp_path / "first", progress=False)
    start = load_file(tmp_path / "first/checkpoints/step-000002/model.safetensors")
    # A negligible lr keeps the weights: the new run's step 1 is its starting point (a fresh init
    # would differ by ~0.02 everywhere).
    config = tiny_run(
        tmp_path,
        "train.max_steps=1",
        "train.lr=1e-12",
        f"train.init_from={tmp_path / 'first/checkpoints/step-000002'}",
    )
    train(config, tmp_path / "second", progress=False)
    after = load_file(tmp_path / "second/checkpoints/step-000001/model.safetensors")
    for name in start:
        torch.testing.assert_close(after[name], start[name], rtol=0, atol=1e-9)
    # The model is the checkpoint's: an override that would change it is an error, not ignored
    # (tiny_run's own overrides are the checkpoint's values, so they pass).
    wider = tiny_run(
        tmp_path,
        f"train.init_from={tmp_path / 'first/checkpoints/step-000002'}",
        "train.model_overrides.dim=64",
    )
    with pytest.raises(
        ConfigError, match=r"train.model_overrides dim=64 cannot apply.*model_overrides.dim=32$"
    ):
        train(wider, tmp_path / "third", progress=False)


def test_a_resumed_run_is_its_own_model_even_without_init_from(tmp_path):
    """init_from is only where a run starts: once it has a checkpoint it resumes without it, to the
    weights of an uninterrupted run; and settings cannot change a resumed run's model."""
    train(tiny_run(tmp_path, "train.max_steps=2"), tmp_path / "source", progress=False)
    shutil.copytree(tmp_path / "source/checkpoints/step-000002", tmp_path / "start")
    settings = ("train.max_steps=4", f"train.init_from={tmp_path / 'start'}")
    train(tiny_run(tmp_path, *settings), tmp_path / "whole", progress=False)
    train(tiny_run(tmp_path, *settings), tmp_path / "cut", progress=False, stop_at_step=2)
    shutil.rmtree(tmp_path / "start")
    assert train(tiny_run(tmp_path, *settings), tmp_path / "cut", progress=False, resume=True).step == 4
    a = load_file(tmp_path / "whole/checkpoints/step-000004/model.safetensors")
    b = load_file(tmp_path / "cut/checkpoints/step-000004/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for run, start in (("source", ()), ("cut", settings)):  # from a preset, and from init_from
        wider = tiny_run(tmp_path, *start, "train.max_steps=5", "train.model_overrides.dim=64")
        with pytest.raises(
            ConfigError,
            match=r"^--resume: the run's model has dim=32, which .* \(or pass --set train.model_overrides.dim=32\)",
        ):
            train(wider, tmp_path / run, progress=False, resume=True)


def test_time_budget_refits_the_planned_steps(tmp_path, monkeypatch):
    from reasoning_llama.training import loop

    monkeypatch.setattr(loop, "REPLAN_EVERY", 10)
    config = tiny_run(tmp_path, "train.max_steps=100000", "train.eval_every=0", "train.save_every=0")
    result = train(config, tmp_path / "run", progress=False, time_budget=2.0)
    # The plan shrank from 100000 to what fits in about 2 s, and the run finished it (cosine included).
    assert result.stop_reason == "finished"
    assert 10 < result.step == result.total_steps < 1000
    last_lr = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r][-1]
    assert last_lr < 0.2 * config.train.lr  # annealed, not cut off at the peak


@pytest.mark.parametrize("micro_batch_size, world_size", [(16, 2), (5, 3), (16, 8)])
def test_several_processes_need_an_exact_global_batch_and_are_told_one_that_fits(
    micro_batch_size, world_size
):
    from reasoning_llama.training.loop import accumulation_steps

    recipe = "reasoning-base-20k"  # 48 rows of 1280 tokens a step
    config = load_run_config(recipe, [f"train.micro_batch_size={micro_batch_size}"])
    with pytest.raises(ConfigError, match="no whole number of micro-batches") as failure:
        accumulation_steps(config, world_size)
    suggested = str(failure.value).split("pass --set ")[1]
    fixed = load_run_config(recipe, [f"train.micro_batch_size={micro_batch_size}", suggested])
    steps = accumulation_steps(fixed, world_size)
    t = fixed.train
    assert steps * t.micro_batch_size * fixed.data.seq_len * world_size == t.global_batch_tokens


def test_one_process_rounds_the_global_batch_to_whole_micro_batches_and_says_so(tmp_path):
    from reasoning_llama.training.loop import Trainer

    said: list[str] = []
    for tokens in ("1024", "1300"):  # 2 micro-batches of 4 x 128 exactly, then 2.54 of them
        trainer = Trainer(
            tiny_run(tmp_path, f"train.global_batch_tokens={tokens}"), tmp_path / tokens, echo=said.append
        )
        trainer.close()
        assert trainer.accum == 2 + (tokens == "1300")
    notes = [line for line in said if line.startswith("note: a step takes")]
    assert notes == [
        "note: a step takes 3 micro-batch(es) of 4 rows x 128 tokens, 1536 positions: the nearest to "
        "train.global_batch_tokens (1300)"
    ]


def test_timing_steps_leaves_weights_optimizer_and_data_position_as_they_were(tmp_path):
    from reasoning_llama.training.loop import Trainer

    trainer = Trainer(tiny_run(tmp_path), tmp_path / "run", progress=False)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.seconds_per_step(steps=2) > 0
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert not trainer.optimizer.state and (trainer.train_loader.epoch, trainer.train_loader.batch_index) == (
        0,
        0,
    )
    result = trainer.run()
    trainer.close()
    reference = train(tiny_run(tmp_path), tmp_path / "reference", progress=False)
    a = load_file(tmp_path / "run/checkpoints/step-000006/model.safetensors")
    b = load_file(tmp_path / "reference/checkpoints/step-000006/model.safetensors")
    assert result.step == reference.step == 6 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_time_budgeted_run_resumes_with_the_plan_it_had_fitted(tmp_path):
    """A budget refits the planned steps (and the cosine) below max_steps; the saved config still
    holds max_steps, so the resume command pins the fitted plan."""
    run = tmp_path / "run"
    config = tiny_run(tmp_path, "train.max_steps=5000", "train.eval_every=0", "train.save_every=0")
    stopped = train(config, run, time_budget=20.0, stop_at_step=21, progress=False)  # refits at step 20
    assert stopped.stop_reason == "stop_at_step" and 21 < stopped.total_steps < 5000
    planned = f"--set train.max_steps={stopped.total_steps}"
    assert stopped.resume_with == f"reasoning-llama train --out {run} --resume {planned}"
    assert f"stopped at step 21 of {stopped.total_steps}" in stopped.stopped_note()
    config = tiny_run(tmp_path, planned.removeprefix("--set "))
    resumed = train(config, run, resume=True, stop_at_step=22, progress=False)
    assert resumed.step == 22 and resumed.total_steps == stopped.total_steps
    # With a first estimate of a step's time (the quickstart's speed probe) the plan holds from step 1.
    config = tiny_run(tmp_path, "train.max_steps=5000", "train.eval_every=0", "train.save_every=0")
    early = train(
        config, tmp_path / "early", time_budget=40.0, seconds_per_step=0.5, stop_at_step=2, progress=False
    )
    assert early.total_steps == 80 and early.resume_with.endswith("--resume --set train.max_steps=80")


def test_tokens_per_s_counts_training_time_only(tmp_path, monkeypatch):
    """On a clock where every reading takes a millisecond and every checkpoint save 100 s, the
    windows after a save read as fast as the others: saving (like evaluating) is left out."""
    import time

    clock = [0.0]

    def perf_counter() -> float:
        clock[0] += 1e-3
        return clock[0]

    save = ckpt.save_checkpoint

    def slow_save(*args, **kwargs):
        clock[0] += 100.0
        return save(*args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    train(tiny_run(tmp_path, "train.save_every=1"), tmp_path / "run", progress=False)
    rates = [r["tokens_per_s"] for r in read_metrics(tmp_path / "run") if "tokens_per_s" in r]
    assert len(rates) == 6 and max(rates) < 10 * min(rates), rates
