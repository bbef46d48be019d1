"""The training loop: masked next-token loss on packed rows, AdamW, warmup + cosine, exact resume.

One optimizer step = `accum` micro-batches whose summed loss is divided by the step's total loss
tokens, so the gradient is the token-level mean however the tokens fall into micro-batches. The
head and the loss run only at loss positions on a CPU (`select=loss_mask`): in a small model most of
the compute is the 50,263-way head, and prompt tokens never need it. On a GPU every position goes
through the head (static shapes, no host syncs), attention runs through FlexAttention, the decoder
layers are compiled, and the loss is read back only at log steps.

Under `torchrun` the same loop runs on every rank (see distributed.py): each rank trains on its share
of every global batch, rank 0 alone logs, and checkpoints are written by all ranks together.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from reasoning_llama.config import ModelConfig, RunConfig, get_preset
from reasoning_llama.data.batching import Batch, BatchLoader
from reasoning_llama.data.prefetch import Prefetcher
from reasoning_llama.data.prepare import PreparedData, prepare_data
from reasoning_llama.errors import ConfigError, ReasoningLlamaError
from reasoning_llama.evaluation import evaluate_generations, synthetic_test_rows
from reasoning_llama.generation import Engine
from reasoning_llama.loss import ModelWithLoss, batch_loss, loss_report, summed_loss
from reasoning_llama.model import Transformer, varlen_attention_available
from reasoning_llama.tokenizer import N_VOCAB, ChatTokenizer, get_tokenizer
from reasoning_llama.training import distributed as dist
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training.distributed import World
from reasoning_llama.training.interrupts import sigint_flag
from reasoning_llama.training.metrics import MetricsWriter, truncate_after
from reasoning_llama.training.optim import build_optimizer, clip_gradients, lr_at, set_lr
from reasoning_llama.training.run_dir import begin_run, has_begun, prepare_run_dir

REPLAN_EVERY = 100  # steps between refits of the plan to a time budget
FIRST_REPLAN = 20  # the first refit, still inside a typical warmup, so the cosine starts from a fitted plan
StopReason = Literal["finished", "early_stopping", "interrupted", "deadline", "stop_at_step"]


class TrainingDiverged(ReasoningLlamaError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    stop_reason: StopReason
    checkpoint: Path | None  # the last resumable checkpoint written
    best_val_loss: float | None
    best_step: int | None
    final: dict[str, Any]  # the last validation / task metrics logged
    rank: int = 0  # of the process that returned it (rank 0 reports to the user)
    resume_with: str = ""  # the command that resumes the run as it was launched

    def stopped_note(self) -> str:
        """Where a run stopped before its end was saved, and the command that continues it."""
        what = "interrupted" if self.stop_reason == "interrupted" else "stopped"
        return (
            f"{what} at step {self.step} of {self.total_steps}; saved {self.checkpoint}\n"
            f"resume with: {self.resume_with}"
        )


@dataclass
class Progress:
    """Everything about the run's position besides weights, optimizer and data order."""

    step: int = 0
    tokens: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    loss_sum: float = 0.0  # train loss since the last log line, as saved (the run keeps it on the device)
    loss_steps: int = 0


# --- setup ------------------------------------------------------------------------------------


def amp_dtype_for(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype: "auto" = bf16 on CUDA, none (fp32) elsewhere."""
    names = {"auto": None, "float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ConfigError(f"train.dtype must be one of {', '.join(names)}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return names[dtype]


def model_config_for(config: RunConfig, resumed: Path | None = None) -> ModelConfig:
    """The preset with `model_overrides` applied, or the config of the `init_from` checkpoint; for a
    run that resumes, its own checkpoint's (`resumed`), which the settings must not contradict."""
    train = config.train
    if resumed is not None:
        from reasoning_llama.model_files import load_config

        own = load_config(resumed)
        start = own if train.init_from else model_config_for(config)
        asked = {**start.to_dict(), **dict(train.model_overrides)}
        changed = {key: value for key, value in own.to_dict().items() if asked.get(key) != value}
        if changed:
            values = ", ".join(f"{key}={json.dumps(value)}" for key, value in changed.items())
            keep = " ".join(f"--set train.model_overrides.{k}={json.dumps(v)}" for k, v in changed.items())
            raise ConfigError(
                f"--resume: the run's model has {values}, which a resumed run keeps; drop the settings "
                f"that change it (or pass {keep}), or start a new run (another --out)"
            )
        return own
    if train.init_from:
        from reasoning_llama.model_files import load_config

        loaded = load_config(train.init_from)
        conflicts = {
            key: getattr(loaded, key)
            for key, value in dict(train.model_overrides).items()
            if hasattr(loaded, key) and getattr(loaded, key) != value
        }
        if conflicts:
            # (a recipe's overrides cannot be dropped from the command line, but set to the checkpoint's)
            asked = ", ".join(f"{key}={train.model_overrides[key]}" for key in conflicts)
            keep = " ".join(
                f"--set train.model_overrides.{key}={json.dumps(value)}" for key, value in conflicts.items()
            )
            raise ConfigError(
                f"train.model_overrides {asked} cannot apply to train.init_from {train.init_from}: the model "
                f"is the checkpoint's; drop them, or pass the checkpoint's values: {keep}"
            )
        return loaded
    try:
        return ModelConfig.from_dict({**get_preset(train.preset).to_dict(), **dict(train.model_overrides)})
    except ConfigError as e:  # the settings' name for what is wrong
        raise ConfigError(f"train.model_overrides: {e}") from None


def build_model(
    config: RunConfig, model_config: ModelConfig, device: torch.device, *, resuming: bool = False
) -> Transformer:
    """A freshly initialised model (seeded), or the weights of `train.init_from`; not when resuming,
    where the checkpoint's weights replace them (and init_from may be gone)."""
    if config.train.init_from and not resuming:
        from reasoning_llama.model_files import load_model

        # fp32 master weights whatever the file holds (autocast makes the bf16 copies)
        return load_model(config.train.init_from, device=device, dtype=torch.float32).train()
    torch.manual_seed(config.train.seed)
    return Transformer(model_config).to(device).train()


def accumulation_steps(config: RunConfig, world_size: int = 1) -> int:
    """Micro-batches per optimizer step and rank so a step sees `global_batch_tokens` positions.

    One process rounds to the nearest whole number; several must hit it exactly, so that the
    global batch (and a resume at another world size) does not depend on how many there are.
    """
    t = config.train
    per_micro = t.micro_batch_size * config.data.seq_len * world_size
    if world_size > 1 and t.global_batch_tokens % per_micro:
        rows = t.global_batch_tokens / (config.data.seq_len * world_size)  # rows per process and step
        fitting = [m for m in range(t.micro_batch_size, 0, -1) if rows == int(rows) and int(rows) % m == 0]
        hint = (
            f"pass --set train.micro_batch_size={fitting[0]}"
            if fitting
            else f"pass --set train.global_batch_tokens={max(1, round(t.global_batch_tokens / per_micro)) * per_micro}"
        )
        raise ConfigError(
            f"train.global_batch_tokens ({t.global_batch_tokens}) is no whole number of micro-batches of "
            f"{t.micro_batch_size} rows x {config.data.seq_len} tokens x {world_size} processes ({per_micro}); {hint}"
        )
    if 2 * t.global_batch_tokens < per_micro:  # rounding up would multiply the batch asked for
        rows = round(t.global_batch_tokens / (config.data.seq_len * world_size))
        fewer_rows = f"--set train.micro_batch_size={rows} or " if rows >= 1 else ""
        raise ConfigError(
            f"train.global_batch_tokens ({t.global_batch_tokens}) is less than half a micro-batch of "
            f"{t.micro_batch_size} rows x {config.data.seq_len} tokens ({per_micro}); pass "
            f"{fewer_rows}--set train.global_batch_tokens={per_micro}"
        )
    return max(1, round(t.global_batch_tokens / per_micro))


def attention_kind(setting: str, device: torch.device, amp: torch.dtype | None) -> str:
    """`train.attention`: auto = FlexAttention on CUDA and sdpa (the dense mask) elsewhere; flex and
    varlen (flash attention over each example) need a GPU, as neither has a CPU backward pass, and
    varlen bf16 (`amp`, the autocast dtype)."""
    if setting not in ("auto", "flex", "varlen", "sdpa"):
        raise ConfigError(f"train.attention must be auto, flex, varlen or sdpa, got {setting!r}")
    if setting in ("flex", "varlen") and device.type == "cpu":
        raise ConfigError(
            f"train.attention={setting} needs a GPU (it has no CPU backward pass); pass --set train.attention=sdpa"
        )
    if setting == "varlen" and amp is None:
        raise ConfigError(
            "train.attention=varlen needs bf16 (flash attention takes no float32); pass "
            "--set train.dtype=bfloat16, or --set train.attention=flex"
        )
    if setting == "varlen" and not varlen_attention_available():
        raise ConfigError(
            f"train.attention=varlen needs torch.nn.attention.varlen, which torch {torch.__version__} "
            "lacks; pass --set train.attention=flex"
        )
    if setting == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return setting


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """`train.compile`: unset = compile on CUDA only."""
    return device.type == "cuda" if setting is None else bool(setting)


def planned_steps(config: RunConfig, batches_per_epoch: int, accum: int) -> int:
    if config.train.epochs is not None:
        if config.train.epochs <= 0:
            raise ConfigError(f"train.epochs must be positive, got {config.train.epochs}")
        return max(1, math.ceil(config.train.epochs * batches_per_epoch / accum))
    if config.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive, got {config.train.max_steps}")
    return config.train.max_steps


def check_config(config: RunConfig, model_config: ModelConfig) -> None:
    t = config.train
    if config.data.seq_len > model_config.max_seq_len:
        # A checkpoint's context is its own (its model cannot be overridden): only the data can give way.
        fix = (
            f"pass --set data.seq_len={model_config.max_seq_len} (train.init_from's model keeps its context)"
            if t.init_from
            else "lower data.seq_len or raise train.model_overrides.max_seq_len"
        )
        raise ConfigError(
            f"data.seq_len ({config.data.seq_len}) exceeds the model's context ({model_config.max_seq_len}); {fix}"
        )
    if model_config.vocab_size < N_VOCAB:
        raise ConfigError(
            f"the model's vocab_size ({model_config.vocab_size}) is smaller than the tokenizer's {N_VOCAB} ids"
        )
    for name in ("micro_batch_size", "global_batch_tokens", "log_every", "keep_last", "eval_batches"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("eval_every", "save_every", "task_eval_every", "warmup_steps", "early_stopping_patience"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    for name, fine, rule in (
        ("lr", 0 < t.lr < math.inf, "> 0 and finite"),
        ("min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("grad_clip", t.grad_clip >= 0, ">= 0"),
        ("weight_decay", t.weight_decay >= 0, ">= 0"),
        ("beta1", 0 <= t.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= t.beta2 < 1, "in [0, 1)"),
        ("seed", t.seed >= 0, ">= 0"),
    ):
        if not fine:
            raise ConfigError(f"train.{name} must be {rule}, got {getattr(t, name)}")


# --- the loop ---------------------------------------------------------------------------------


class Trainer:
    """One run: everything is built in __init__ (or restored, with --resume); `run()` trains.

    Under torchrun each process builds its own Trainer; `close()` leaves the process group.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        tokenizer: ChatTokenizer | None = None,
        data: PreparedData | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.run_dir = config, Path(run_dir)
        t = self.t = config.train
        self.world, self.device = dist.setup(t.distributed, t.device)
        world = self.world
        self.progress = progress and world.is_main
        say = echo or (lambda msg: tqdm.write(msg, file=sys.stderr))
        self.say = say if world.is_main else (lambda msg: None)
        self.amp = amp_dtype_for(self.device, t.dtype)
        attention = attention_kind(t.attention, self.device, self.amp)
        restarted = dist.elastic_restart_count() > 0
        if restarted and overwrite:  # replace the old run unless this one had begun before the restart
            overwrite = not dist.on_main(world, lambda: has_begun(self.run_dir, config))
            restarted = not overwrite
        # A run that resumes is its own model, whatever train.init_from holds now (or if it is gone).
        own = (
            dist.on_main(world, lambda: ckpt.latest_checkpoint(self.run_dir)) if resume or restarted else None
        )
        model_config = dist.on_every(world, lambda: model_config_for(config, own))  # a file
        check_config(config, model_config)
        reads = (t.init_from, config.data.path if config.data.source != "synthetic" else None)
        resume_from = dist.on_main(
            world, lambda: prepare_run_dir(self.run_dir, resume, restarted, overwrite, reads)
        )
        if restarted:
            self.say(f"restart {dist.elastic_restart_count()} of the process group")
        elif resume and resume_from is None:
            self.say(f"{self.run_dir} stopped before its first checkpoint; starting it over from step 0")

        ckpt.seed_everything(t.seed)
        self.tokenizer = tokenizer or get_tokenizer()
        if data is None:  # rank 0 fills the cache (its errors reach every rank), the others then read it
            prepared: list[PreparedData] = []
            dist.on_main(
                world, lambda: prepared.append(prepare_data(config.data, self.tokenizer, progress=progress))
            )
            # The others read their own copy (on other machines, their own files): every rank agrees.
            data = dist.on_every(
                world,
                lambda: (
                    prepared[0] if prepared else prepare_data(config.data, self.tokenizer, progress=False)
                ),
            )
        shape = {
            "seq_len": config.data.seq_len,
            "batch_size": t.micro_batch_size,
            "packing": config.data.packing,
            "rank": world.rank,
            "world_size": world.world_size,
        }
        self.accum = accumulation_steps(config, world.world_size)
        taken = self.accum * t.micro_batch_size * config.data.seq_len * world.world_size
        if taken != t.global_batch_tokens:  # one process rounds (several refuse, in accumulation_steps)
            self.say(
                f"note: a step takes {self.accum} micro-batch(es) of {t.micro_batch_size} rows x "
                f"{config.data.seq_len} tokens, {taken} positions: the nearest to train.global_batch_tokens "
                f"({t.global_batch_tokens})"
            )
        self.train_loader = BatchLoader(data.train, **shape, seed=t.seed, batches_per_step=self.accum)
        # Validation: the first eval_batches x micro_batch_size rows, split among the ranks (the last
        # global batch partly empty when they do not divide), so any world size scores the same rows.
        val_rows = t.eval_batches * t.micro_batch_size
        self.val_loader = (
            BatchLoader(data.val, **shape, seed=t.seed, shuffle=False, max_rows=val_rows)
            if len(data.val)
            else None
        )
        self.total_steps = planned_steps(config, self.train_loader.batches_per_epoch, self.accum)
        self.planned_max = self.total_steps
        self.task_rows = _task_rows(config)
        if t.early_stopping_patience and (self.val_loader is None or not (t.eval_every or t.task_eval_every)):
            self.say(
                f"warning: train.early_stopping_patience={t.early_stopping_patience} never stops this run: "
                + (
                    "it has no validation rows"
                    if self.val_loader is None
                    else "train.eval_every and train.task_eval_every are 0"
                )
            )

        self.model = dist.on_every(  # init_from: a file
            world, lambda: build_model(config, model_config, self.device, resuming=resume_from is not None)
        )
        self.compiled = use_compile(t.compile, self.device)
        on_gpu = self.device.type != "cpu"
        # Under FSDP on a GPU the sharding policy casts to bf16 itself; elsewhere autocast does.
        self.autocast = None if world.mode == "fsdp" and on_gpu else self.amp
        self.loss_model = ModelWithLoss(
            self.model,
            select_positions=not on_gpu,
            attention=attention,
            segments_per_row=0
            if attention != "varlen"
            else max(loader.segments_per_row for loader in (self.train_loader, self.val_loader) if loader),
            amp_dtype=self.amp,
            compile_loss=self.compiled,
        )
        if self.compiled:
            for layer in self.model.layers:  # one graph serves every layer (torchtitan's way)
                layer.compile(dynamic=False)
        self.wrapped = dist.wrap(self.loss_model, self.model.layers, world, self.device)
        self.optimizer = build_optimizer(self.loss_model, t, self.device)
        self.state = Progress()
        self._window = (0, time.perf_counter())  # tokens since the last log line, and when it started
        self._loss_sum = torch.zeros((), device=self.device)  # train loss since the last log line
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._grad_norm = torch.zeros((), device=self.device)
        self.last_checkpoint = resume_from
        if resume_from is not None:
            self._restore(resume_from)
            if self.state.step > self.total_steps:
                raise ConfigError(
                    f"--resume: the run is at step {self.state.step}, past the {self.total_steps} steps these "
                    "settings plan (train.max_steps, train.epochs); plan more, or leave them as the run had them"
                )
            if world.is_main:
                truncate_after(self.run_dir, self.state.step)
            self.say(f"resuming from {resume_from} (step {self.state.step} of {self.total_steps})")
        dist.on_main(world, lambda: begin_run(self.run_dir, config, overwrite=overwrite))
        if world.distributed:
            self.say(
                f"{world.mode} over {world.world_size} processes: {t.micro_batch_size} rows x "
                f"{self.accum} micro-batches per process and step"
            )

    def close(self, *, together: bool = True) -> None:
        """Leave the process group (if this run joined one); see `distributed.teardown`."""
        dist.teardown(together=together)

    def run(
        self,
        *,
        stop_at_step: int | None = None,
        deadline: float | None = None,
        time_budget: float | None = None,
        seconds_per_step: float | None = None,
    ) -> TrainResult:
        """Train to the planned step; stop early on Ctrl-C, `stop_at_step`, `deadline` or early stopping.

        time_budget: seconds for this call; after FIRST_REPLAN steps and every REPLAN_EVERY steps the
        planned number of steps (and so the cosine) is refitted to the measured speed, evaluations
        included, at most `max_steps`: the one planner of a budgeted run (runs planned this way depend
        on the machine's speed, so they do not resume bitwise-identically). seconds_per_step: a first
        estimate (a speed probe's), which plans the budget from the first step.
        """
        t, state = self.t, self.state
        if time_budget and seconds_per_step:
            self._fit_plan(time_budget, seconds_per_step)
        stop_reason: StopReason = "finished"
        final: dict[str, Any] = {}
        self._window = (0, time.perf_counter())
        bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="training",
            unit="step",
            disable=not self.progress,
        )
        pin = self.device.type == "cuda"
        batches = Prefetcher(self.train_loader, depth=2 * self.accum, pin_memory=pin)
        writer = (
            MetricsWriter(self.run_dir, resumed_at=self.state.step) if self.world.is_main else nullcontext()
        )
        vote = dist.StopVote(self.world)  # whether any rank had Ctrl-C, agreed every step
        with (
            writer,
            bar,
            batches,
            sigint_flag(announce=self.world.is_main, processes=self.world.world_size) as interrupted,
        ):
            first_step, started = state.step, time.monotonic()
            if stop_at_step is not None and state.step >= stop_at_step and state.step < self.total_steps:
                stop_reason = "stop_at_step"  # a resumed run already there: nothing to do
            while stop_reason == "finished" and state.step < self.total_steps:
                done = state.step - first_step
                if time_budget and done and (done == FIRST_REPLAN or done % REPLAN_EVERY == 0):
                    self._replan(first_step, started, time_budget, bar)
                lr = self.lr()
                self.step([next(batches) for _ in range(self.accum)], lr)
                bar.update(1)
                last = state.step == self.total_steps
                stop_asked = vote.cast(interrupted.is_set())
                # Other decisions ranks take together at log steps when distributed (each is a round trip).
                sync_point = last or not self.world.distributed or state.step % t.log_every == 0
                if state.step % t.log_every == 0 or state.step in (1, self.total_steps):
                    record = self._train_record(lr)
                    if self.world.is_main:
                        writer.log(record)  # type: ignore[union-attr]
                    bar.set_postfix(
                        loss=f"{record['train_loss']:.4f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                    )

                out_of_time = sync_point and self._agree(
                    deadline is not None and time.monotonic() >= deadline
                )
                due_val = (t.eval_every and state.step % t.eval_every == 0) or last or out_of_time
                due_tasks = (t.task_eval_every and state.step % t.task_eval_every == 0) or last or out_of_time
                if due_val or due_tasks:
                    record = self.evaluate(tasks=bool(due_tasks))
                    if self.world.is_main and len(record) > 1:  # not a bare step: nothing was evaluated
                        writer.log(record)  # type: ignore[union-attr]
                    final |= record
                    if t.early_stopping_patience and state.evals_since_best >= t.early_stopping_patience:
                        stop_reason = "early_stopping"
                        self.say(f"early stopping: {state.evals_since_best} validations without improvement")

                if stop_asked and not last:
                    stop_reason = "interrupted"
                elif stop_at_step is not None and state.step >= stop_at_step and not last:
                    stop_reason = "stop_at_step"
                elif out_of_time and not last:
                    stop_reason = "deadline"
                    self.say(f"time budget reached at step {state.step} of {self.total_steps}")
                if last or stop_reason != "finished" or (t.save_every and state.step % t.save_every == 0):
                    self.last_checkpoint = self.save()
                if stop_reason != "finished":
                    break
            vote.close()
        if self.val_loader is None and stop_reason in ("finished", "deadline", "early_stopping"):
            info = {"step": state.step, "val_loss": None}
            ckpt.save_best(self.run_dir, self.loss_model, info, self.world)  # keep the last
        best = state.best_val_loss if math.isfinite(state.best_val_loss) else None
        return TrainResult(
            self.run_dir,
            state.step,
            self.total_steps,
            stop_reason,
            self.last_checkpoint,
            best,
            state.best_step if best is not None else None,
            final,
            self.world.rank,
            self.resume_command(*self._replanned_settings()),
        )

    def _replanned_settings(self) -> list[str]:
        """The settings that keep a refitted plan (a time-budgeted run) when the run is resumed: the
        saved config still holds the bound the budget planned within, whose cosine is another one."""
        if self.total_steps == self.planned_max:
            return []
        return [
            *(["train.epochs=null"] if self.t.epochs is not None else []),
            f"train.max_steps={self.total_steps}",
        ]

    def resume_command(self, *settings: str) -> str:
        """The command that resumes this run, with `--set` for each of `settings`: as it was launched
        (under torchrun, as many processes a machine), and in one process where its mode needs that said."""
        sets = "".join(f" --set {shlex.quote(setting)}" for setting in settings)
        out = shlex.quote(str(self.run_dir))
        command = f"reasoning-llama train --out {out} --resume{sets}"
        if not self.world.distributed:
            return command
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.world.world_size))
        machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        train = f"-m reasoning_llama train --out {out} --resume{sets}"
        launched = f"torchrun --nproc_per_node {processes} {train}"
        if machines > 1:  # torchrun does not tell its workers the rendezvous endpoint: the user knows it
            launched = (
                f"torchrun --nnodes {machines} --nproc_per_node {processes} --rdzv-backend c10d "
                f"--rdzv-endpoint HOST:PORT {train} on each of the {machines} machines, with the "
                "rendezvous endpoint it started with"
            )
        # auto: none in one process, ddp under torchrun; the mode this run named works under torchrun only.
        alone = command if self.t.distributed == "auto" else f"{command} --set train.distributed=auto"
        return f"{launched} (or in one process: {alone})"

    def seconds_per_step(self, steps: int = 5, give_up_after: float = math.inf) -> float:
        """Median time of a few optimizer steps, after one warm-up step, on batches from the start of
        the data; the weights, the optimizer state and the data position are put back afterwards.

        Stops early (returning that step's time) once a step takes longer than `give_up_after` seconds.
        """
        weights = copy.deepcopy(self.loss_model.state_dict())
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        batches = (batch for batch, _ in self.train_loader.batches_from(0, 0))
        timings: list[float] = []
        try:
            for _ in range(steps + 1):
                start = time.perf_counter()
                micro = [next(batches) for _ in range(self.accum)]
                optimizer_step(
                    self.wrapped,
                    self.optimizer,
                    micro,
                    self.t.lr,
                    self.t.grad_clip,
                    self.autocast,
                    self.device,
                    world=self.world,
                    skip_nonfinite=False,
                )
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timings.append(time.perf_counter() - start)
                if len(timings) > 1 and timings[-1] > give_up_after:
                    return timings[-1]
        finally:
            self.loss_model.load_state_dict(weights)
            self.optimizer.load_state_dict(optimizer_state)
        return statistics.median(timings[1:])

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a stop must happen at the same step everywhere)."""
        if not self.world.distributed:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        return bool(dist.all_reduce_sum(value, self.world).item() > 0)

    def _replan(self, first_step: int, started: float, time_budget: float, bar: tqdm) -> None:
        """Fit the planned steps to the time left at the speed measured so far (evaluations included)."""
        elapsed = time.monotonic() - started
        self._fit_plan(time_budget - elapsed, elapsed / (self.state.step - first_step))
        bar.total = self.total_steps
        bar.refresh()

    def _fit_plan(self, seconds_left: float, per_step: float) -> None:
        """Plan as many more steps as `seconds_left` holds at `per_step` seconds each (at least one,
        at most `max_steps`); rank 0's clock decides."""
        fitting = self.state.step + int(seconds_left / per_step)
        planned = max(self.state.step + 1, min(self.planned_max, fitting))
        self.total_steps = dist.broadcast_from_main(planned, self.world)

    def lr(self) -> float:
        t = self.t
        return lr_at(
            self.state.step,
            peak=t.lr,
            warmup_steps=t.warmup_steps,
            total_steps=self.total_steps,
            min_lr_ratio=t.min_lr_ratio,
        )

    def step(self, micro: list[Batch], lr: float) -> None:
        """One optimizer step over this rank's micro-batches.

        On a CPU the loss and gradient norm are read every step (that costs nothing there), so a
        non-finite one stops the run before its update; on a GPU they stay on the device until the
        next log step, evaluation or save, which checks them (see `_check_finite`).
        """
        check_now = self.device.type == "cpu"
        loss, grad_norm = optimizer_step(
            self.wrapped,
            self.optimizer,
            micro,
            lr,
            self.t.grad_clip,
            self.autocast,
            self.device,
            world=self.world,
            skip_nonfinite=check_now,
        )
        self._loss_sum += loss
        self._grad_norm = grad_norm
        self._nonfinite |= ~torch.isfinite(grad_norm)
        tokens = sum(b.n_tokens_all_ranks for b in micro)
        self.state.step += 1
        self.state.tokens += tokens
        self.state.loss_steps += 1
        self._window = (self._window[0] + tokens, self._window[1])
        if check_now:
            self._check_finite(lr)

    def _check_finite(self, lr: float | None = None) -> None:
        """Stop the run (unsaved) if any step since the last check had a non-finite loss or gradient."""
        if bool(self._nonfinite):  # on every rank alike: gradients are reduced over all of them
            loss = float(dist.all_reduce_sum(self._loss_sum.clone(), self.world))
            diverged = TrainingDiverged(
                _diverged_message(
                    self.state.step,
                    loss,
                    float(self._grad_norm),
                    lr or self.lr(),
                    self.last_checkpoint,
                    self.resume_command(*self._replanned_settings(), f"train.lr={self.t.lr / 2:.3g}"),
                )
            )
            raise dist.left_to_main(diverged, self.world)  # every rank has it

    def _train_record(self, lr: float) -> dict[str, Any]:
        self._check_finite(lr)
        state, loader = self.state, self.train_loader
        loss_sum = float(dist.all_reduce_sum(self._loss_sum.clone(), self.world))
        window_tokens, window_start = self._window
        elapsed = time.perf_counter() - window_start
        record = {
            "step": state.step,
            "train_loss": loss_sum / state.loss_steps,
            "lr": lr,
            "grad_norm": float(self._grad_norm),
            "tokens": state.tokens,
            "epoch": loader.epoch + loader.batch_index / loader.batches_per_epoch,
            "tokens_per_s": window_tokens / elapsed if elapsed > 0 else 0.0,
        }
        self._loss_sum.zero_()
        state.loss_sum, state.loss_steps = 0.0, 0
        self._window = (0, time.perf_counter())
        return record

    def evaluate(self, *, tasks: bool) -> dict[str, Any]:
        """Validation loss (tracking the best model) and, when asked, held-out task accuracy."""
        self._check_finite()
        start = time.perf_counter()
        record: dict[str, Any] = {"step": self.state.step}
        if self.val_loader is not None:
            batches = self.val_loader.iter_epoch_once()  # this rank's share, as many batches as the others'
            total, tokens = summed_loss(self.wrapped, batches, device=self.device, amp_dtype=self.autocast)
            counts = torch.tensor([float(total), float(tokens)], dtype=torch.float64, device=self.device)
            total_all, tokens_all = dist.all_reduce_sum(counts, self.world).tolist()
            record["val_loss"] = loss_report(total_all, int(tokens_all)).loss
            if _track_best(self.state, record["val_loss"]):
                info = {"step": self.state.step, "val_loss": record["val_loss"]}
                ckpt.save_best(self.run_dir, self.loss_model, info, self.world)
            record["best_val_loss"] = self.state.best_val_loss
        if tasks and self.task_rows:
            model = self._plain_model()
            if model is not None:  # rank 0
                report = evaluate_generations(
                    Engine(model, self.tokenizer, max_batch_size=32), self.task_rows
                )
                model.train()
                record["acc/overall"] = report.overall.exact_match
                record["format"] = report.overall.format_adherence
                record |= {f"acc/{name}": s.exact_match for name, s in report.families.items()}
        if len(record) > 1:
            self.say(_describe(record))
        self._leave_out_of_window(time.perf_counter() - start)
        return record

    def _leave_out_of_window(self, seconds: float) -> None:
        """tokens/s counts training time only: evaluating and saving are left out of it."""
        tokens, window_start = self._window
        self._window = (tokens, window_start + seconds)

    def _plain_model(self) -> Transformer | None:
        """The model as the engine needs it, on rank 0 (None elsewhere): itself, or a plain copy when
        it is compiled (decoding shapes would recompile it) or sharded. Every rank calls it."""
        weights = ckpt.full_model_state(self.loss_model, self.world) if self.world.mode == "fsdp" else None
        if not self.world.is_main:
            return None
        if not self.compiled and weights is None:
            return self.model
        copy = Transformer(self.model.config).to(self.device)
        copy.load_state_dict(self.model.state_dict() if weights is None else weights)
        return copy

    def save(self) -> Path:
        start = time.perf_counter()
        try:
            return self._save()
        finally:
            self._leave_out_of_window(time.perf_counter() - start)

    def _save(self) -> Path:
        self._check_finite()
        progress = dataclasses.asdict(self.state)
        progress["loss_sum"] = float(dist.all_reduce_sum(self._loss_sum.clone(), self.world))
        trainer_state = {
            "progress": progress,
            "total_steps": self.total_steps,
            "loader": self.train_loader.state_dict(),
            "rng": ckpt.capture_rng(),
            "world_size": self.world.world_size,
        }
        return ckpt.save_checkpoint(
            self.run_dir,
            self.state.step,
            self.loss_model,
            self.optimizer,
            trainer_state,
            self.t.keep_last,
            self.world,
        )

    def _restore(self, directory: Path) -> None:
        trainer_state = ckpt.restore_checkpoint(directory, self.loss_model, self.optimizer)
        self.train_loader.load_state_dict(trainer_state["loader"])
        ckpt.restore_rng(trainer_state["rng"])
        self.state = Progress(**trainer_state["progress"])
        if self.world.is_main:  # the loss since the last log line; log steps sum it over ranks
            self._loss_sum.fill_(self.state.loss_sum)
        self.state.loss_sum = 0.0


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    deadline: float | None = None,
    time_budget: float | None = None,
    seconds_per_step: float | None = None,
    tokenizer: ChatTokenizer | None = None,
    data: PreparedData | None = None,
    echo: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train as `config` says, writing checkpoints, metrics and the best model under `run_dir`.

    stop_at_step: save and stop after this step (as an interruption would); deadline: a
    `time.monotonic()` value after which the run evaluates, saves and stops; time_budget: seconds
    the run should take, to which the planned steps are refitted as it goes (see `Trainer.run`), from
    `seconds_per_step` (an estimate) on.
    """
    trainer = Trainer(
        config,
        run_dir,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        tokenizer=tokenizer,
        data=data,
        echo=echo,
    )
    try:
        result = trainer.run(
            stop_at_step=stop_at_step,
            deadline=deadline,
            time_budget=time_budget,
            seconds_per_step=seconds_per_step,
        )
    except BaseException:
        trainer.close(together=False)
        raise
    trainer.close()
    return result


def optimizer_step(
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro: list[Batch],
    lr: float,
    grad_clip: float,
    autocast: torch.dtype | None,
    device: torch.device,
    *,
    world: World = dist.SINGLE,
    skip_nonfinite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients over the micro-batches, clip, step; return (loss, grad norm) on the device.

    `wrapped` is a ModelWithLoss or its DDP / FSDP form. The loss is this rank's share of the
    token-level mean over the global batch: every rank divides by the loss tokens of the whole
    global batch, and gradients, averaged over ranks, are scaled back by the world size.
    skip_nonfinite: read the norm back and skip the update if it is not finite (a host sync).
    """
    n_loss = max(1, sum(b.n_loss_tokens_all_ranks for b in micro))
    scale = world.world_size / n_loss
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        with dist.gradient_sync(wrapped, world, enabled=i == len(micro) - 1):
            with torch.autocast(device.type, dtype=autocast) if autocast else nullcontext():
                loss = batch_loss(wrapped, batch.to(device, non_blocking=True)) * scale
            loss.backward()
        total += loss.detach().float() / world.world_size
    params = [p for p in wrapped.parameters() if p.grad is not None]
    norm = clip_gradients(params, grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
    if not skip_nonfinite or math.isfinite(norm.item()):
        set_lr(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


def _track_best(state: Progress, val_loss: float) -> bool:
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
        return True
    state.evals_since_best += 1
    return False


def _task_rows(config: RunConfig) -> list[dict[str, str]]:
    """Held-out synthetic problems scored during training (none for other sources)."""
    if config.data.source != "synthetic" or config.train.task_eval_size <= 0:
        return []
    from reasoning_llama.tasks import families_or_default

    names = families_or_default(config.data.families)
    per_family = max(1, config.train.task_eval_size // len(names))
    return synthetic_test_rows(names, per_family, seed=config.data.seed, difficulty=config.data.difficulty)


def _describe(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f}")
    accuracies = [f"{k.removeprefix('acc/')} {v:.0%}" for k, v in record.items() if k.startswith("acc/")]
    if accuracies:
        parts.append("exact match: " + ", ".join(accuracies))
    if "format" in record:
        parts.append(f"format {record['format']:.0%}")
    return " | ".join(parts)


def _diverged_message(
    step: int,
    loss: float,
    grad_norm: float,
    lr: float,
    checkpoint: Path | None,
    resume_with_lower_lr: str,
) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    where = (
        f"the last good checkpoint is {checkpoint}; resume it with a lower learning rate: {resume_with_lower_lr}"
        if checkpoint  # (--resume of a run without a checkpoint starts it over with its own settings)
        else f"no checkpoint was written yet; start it over with a lower learning rate: {resume_with_lower_lr}"
    )
    return (
        f"training diverged at step {step}: {what} (lr {lr:.3g}); stopped without saving, {where}. "
        "Lower train.lr, raise train.warmup_steps or check the data"
    )
