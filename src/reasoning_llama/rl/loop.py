"""The `reasoning-llama rl` run: sample groups, score them, take a clipped policy-gradient step, repeat.

A run lives in a run directory like a training run's (DESIGN.md §4): the resolved config, metrics.jsonl,
atomic step checkpoints with the optimizer and the run's progress, `latest`, exact `--resume`. Nothing
random is carried between steps: step s draws its prompts from a seeded permutation of the train rows
and seeds every sample from (seed, s, i), so a resumed run samples exactly what an uninterrupted one
would have.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from reasoning_llama.config import RLConfig
from reasoning_llama.data.sources import ANSWER_FIELDS, read_rows
from reasoning_llama.data.validation import ValidationReport
from reasoning_llama.errors import ConfigError
from reasoning_llama.evaluation import synthetic_test_rows
from reasoning_llama.generation import Engine, resolve_device
from reasoning_llama.loss import ModelWithLoss
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import load_config, load_model, weights_digest
from reasoning_llama.rl.objective import (
    clipped_policy_loss,
    group_advantages,
    kl_estimate,
    zero_signal_groups,
)
from reasoning_llama.rl.rewards import Checker, make_checker
from reasoning_llama.rl.rollout import Sample, sample_groups, sampled_log_probs
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tasks import FAMILIES, generate_examples
from reasoning_llama.tokenizer import ChatTokenizer, get_tokenizer
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training.interrupts import sigint_flag
from reasoning_llama.training.metrics import MetricsWriter, read_metrics, truncate_after
from reasoning_llama.training.optim import clip_gradients, lr_at, param_groups, set_lr
from reasoning_llama.training.run_dir import begin_run, prepare_run_dir

EVAL_SEED = 7  # the held-out problems: the test split, drawn with a seed of their own


@dataclass
class RLResult:
    step: int
    stop_reason: str  # max_steps, time_budget, interrupted
    checkpoint: Path | None
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> metric -> value


def check_rl_config(config: RLConfig) -> None:
    if config.init_from is None:
        raise ConfigError("rl needs a model to start from: --init-from CHECKPOINT")
    if config.families and config.data:  # (e.g. a recipe's families, and --data)
        raise ConfigError(
            f"rl practises one task: synthetic families ({', '.join(config.families)}) or a file "
            f"(data={config.data}), not both; keep the file with --set 'families=[]', or the families "
            "with --set data=null"
        )
    if not config.families and not config.data:
        raise ConfigError("give the task as synthetic families (--task synthetic:FAMILY) or a file (--data)")
    unknown = [f for f in [*config.families, *config.eval_families, *config.difficulty] if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown synthetic family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    positive = ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "updates_per_batch", "max_steps")
    for name in (*positive, "micro_batch_size", "train_size", "save_every", "log_every", "keep_last"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.kl_samples < 0:
        raise ConfigError(f"kl_samples must be >= 0 (0 = every sample), got {config.kl_samples}")
    if config.samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt must be >= 2: advantages compare samples of one prompt")
    if config.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; use adamw or sgd")
    if not (config.temperature > 0 and config.lr > 0 and 0 <= config.min_lr_ratio <= 1):
        raise ConfigError("temperature and lr must be > 0 and min_lr_ratio in [0, 1]")
    at_least_zero = (
        "eval_every",
        "warmup_steps",
        "eval_size",
        "grad_clip",
        "kl_coef",
        "top_k",
        "weight_decay",
    )
    for name in (*at_least_zero, "clip_high", "format_reward"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not 0 <= config.clip_low < 1:
        raise ConfigError(f"clip_low must be in [0, 1), got {config.clip_low}")
    if config.max_minutes is not None and config.max_minutes <= 0:
        raise ConfigError(f"max_minutes must be > 0, got {config.max_minutes}")


def step_seeds(seed: int, step: int, count: int) -> list[int]:
    """The sampler seed of every sample of `step`: fixed by the run's seed, so a resume samples the same."""
    rng = random.Random(f"reasoning-llama/rl/{seed}/{step}")
    return [rng.getrandbits(63) for _ in range(count)]


def fitting(
    rows: list[dict[str, str]],
    part: str,
    tokenizer: ChatTokenizer,
    config: RLConfig,
    context: int,
    say: Callable[[str], None],
) -> list[dict[str, str]]:
    """The rows whose prompt leaves room for max_new_tokens in the model's context; the others are
    counted and left out (said once per `part`: train, held-out), as `eval` leaves out prompts that do
    not fit."""
    room = context - config.max_new_tokens
    lengths = [len(tokenizer.render_prompt([{"role": "user", "content": row["user"]}])) for row in rows]
    kept = [row for row, length in zip(rows, lengths, strict=True) if length <= room]
    if len(kept) < len(rows):
        where = f"--data {config.data}" if config.data else "the synthetic problems"
        say(
            f"warning: {len(rows) - len(kept)} of {len(rows)} {part} prompts of {where} are left out: with "
            f"max_new_tokens {config.max_new_tokens} they do not fit the model's context of {context} "
            f"(the longest is {max(lengths)} tokens)"
        )
    return kept


class PromptStream:
    """Train rows in a fresh seeded order every epoch; `rows_for(step)` depends on the step alone."""

    def __init__(self, rows: Sequence[dict[str, str]], per_step: int, seed: int) -> None:
        if len(rows) < per_step:
            raise ConfigError(
                f"{len(rows)} usable train prompts are fewer than prompts_per_step ({per_step}); give more "
                f"rows, or pass --set prompts_per_step={len(rows)}"
                if rows
                else "no usable train prompts (see the warnings above)"
            )
        self.rows, self.per_step, self.seed = list(rows), per_step, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            random.Random(f"reasoning-llama/rl/order/{self.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # one epoch is read at a time
        return self._orders[epoch]

    def rows_for(self, step: int) -> list[dict[str, str]]:
        picked = []
        for k in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, index = divmod(k, len(self.rows))
            picked.append(self.rows[self._order(epoch)[index]])
        return picked


def load_task_rows(config: RLConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, held-out rows): the families' train and test splits, or a file split by a seeded draw."""
    if config.families:
        examples = generate_examples(
            config.families,
            config.train_size * len(config.families),
            split="train",
            seed=config.seed,
            difficulty=dict(config.difficulty) or None,
        )
        families = list(dict.fromkeys([*config.families, *config.eval_families]))
        held_out = synthetic_test_rows(
            families, config.eval_size, seed=EVAL_SEED, difficulty=dict(config.difficulty) or None
        )
        return [e.as_row() for e in examples], held_out
    report = ValidationReport()
    rows = read_rows(str(config.data), ANSWER_FIELDS, report)
    if report.rows_skipped:
        print(f"warning: {report.summary()}", file=sys.stderr)
    random.Random(f"reasoning-llama/rl/split/{config.seed}").shuffle(rows)
    held = min(config.eval_size, len(rows) // 5)
    return rows[held:], rows[:held]


def held_out_report(
    engine: Engine,
    rows: Sequence[dict[str, str]],
    checker: Checker,
    params: SamplingParams,
    group_size: int,
    *,
    seed: int,
) -> dict[str, float]:
    """Per family: `acc/F`, the share of rows whose greedy answer earns the full reward, and `pass@G/F`,
    the share that one of G samples drawn with `params` earns it for (the same samples for the same seed).

    A checker's partial credit counts in the training reward, not here: both are exact match."""
    if not rows:
        return {}
    prompts = [engine.tokenizer.render_prompt([{"role": "user", "content": r["user"]}]) for r in rows]
    greedy_params = SamplingParams(
        max_new_tokens=params.max_new_tokens, reasoning_budget=params.reasoning_budget
    )
    greedy = engine.generate_batch(prompts, greedy_params)
    seeds = step_seeds(seed, -1, len(rows) * group_size)
    groups = sample_groups(engine, rows, group_size, params, seeds, checker)
    by_family: dict[str, list[tuple[bool, bool]]] = {}
    for row, result, group in zip(rows, greedy, groups, strict=True):
        by_family.setdefault(row.get("family") or "data", []).append(
            (checker(row, result.answer) == 1.0, any(s.correct for s in group))
        )
    report = {}
    for family, scores in sorted(by_family.items()):
        report[f"acc/{family}"] = sum(s for s, _ in scores) / len(scores)
        report[f"pass@{group_size}/{family}"] = sum(g for _, g in scores) / len(scores)
    return report


def sampling_params(config: RLConfig) -> SamplingParams:
    """How a run samples its answers (training, and held-out pass@G)."""
    params = SamplingParams(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        reasoning_budget=config.reasoning_budget,
    )
    params.validate()
    return params


def build_rl_optimizer(model: Transformer, config: RLConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    fused = device.type in ("cpu", "cuda")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.beta1, fused=fused)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)


class RLTrainer:
    """One RL run: everything is built (or restored, with resume) in __init__; `run()` trains."""

    def __init__(
        self,
        config: RLConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        check_rl_config(config)
        self.config, self.run_dir = config, Path(run_dir)
        self.say = echo or (lambda msg: tqdm.write(msg, file=sys.stderr))
        self.progress = progress
        self.device = resolve_device(config.device, use_cpu="--set device=cpu")
        ckpt.seed_everything(config.seed)
        resume_from = prepare_run_dir(
            self.run_dir, resume, overwrite=overwrite, reads=(config.init_from, config.data)
        )
        if resume and resume_from is None:
            self.say(f"{self.run_dir} stopped before its first checkpoint; starting it over from step 0")

        self.checker: Checker = make_checker(config.checker)
        train_rows, held_out = load_task_rows(config)

        assert config.init_from is not None
        if resume_from is not None and not Path(config.init_from).is_dir():
            raise ConfigError(
                f"--resume: {config.init_from}, the model this RL run started from, is gone; the run measures "
                "its KL against it, so put it back there to resume"
            )
        if resume_from is not None and load_config(config.init_from) != load_config(resume_from):
            raise ConfigError(
                f"--resume: {config.init_from} holds another model than the one this RL run started from "
                "(its config differs); the run measures its KL against the first, so put that one back there"
            )
        self.policy: Transformer = load_model(config.init_from, device=self.device, dtype=torch.float32)
        self.reference_digest = weights_digest(config.init_from)
        # Found now, not steps into the run: prompts the context cannot hold, and a checker that fails.
        tokenizer = get_tokenizer()
        context = self.policy.config.max_seq_len
        train_rows = fitting(train_rows, "train", tokenizer, config, context, self.say)
        held_out = fitting(held_out, "held-out", tokenizer, config, context, self.say)
        self.prompts = PromptStream(train_rows, config.prompts_per_step, config.seed)
        self.held_out = held_out
        if not held_out:
            self.say(
                "warning: no prompts held out (a file gives one in five, up to eval_size): no held-out evaluation"
            )
        self.checker(train_rows[0], train_rows[0]["assistant"])
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)  # the initial model, for KL
        self.container = ModelWithLoss(self.policy)  # what checkpoints save: the model under `model.`
        self.optimizer = build_rl_optimizer(self.policy, config, self.device)
        self.tokenizer = tokenizer
        group = config.prompts_per_step * config.samples_per_prompt
        self.engine = Engine(self.policy, self.tokenizer, max_batch_size=group, device=self.device)
        self.params = sampling_params(config)
        self.step, self.elapsed = 0, 0.0
        self.last_checkpoint = resume_from
        if resume_from is not None:
            state = ckpt.restore_checkpoint(resume_from, self.container, self.optimizer)
            if state.get("reference_sha256", self.reference_digest) != self.reference_digest:
                raise ConfigError(
                    f"--resume: {config.init_from} holds other weights than the model this RL run started "
                    "from (the same shape, another file); the run measures its KL against the first, so put "
                    "that one back there"
                )
            self.step, self.elapsed = state["progress"]["step"], state["progress"]["elapsed_s"]
            truncate_after(self.run_dir, self.step)
            self.say(f"resuming from {resume_from} (step {self.step} of {config.max_steps})")
        begin_run(self.run_dir, config, overwrite=overwrite)

    # -- one step ----------------------------------------------------------------------------

    def lr(self) -> float:
        c = self.config
        return lr_at(
            self.step,
            peak=c.lr,
            warmup_steps=c.warmup_steps,
            total_steps=c.max_steps,
            min_lr_ratio=c.min_lr_ratio,
        )

    def _log_probs(self, model: Transformer, samples: list[Sample]) -> torch.Tensor:
        """Sampled-token log-probabilities of every sample, by micro-batches, without gradients."""
        size = self.config.micro_batch_size
        with torch.no_grad():
            return torch.cat(
                [
                    sampled_log_probs(model, samples[i : i + size], temperature=self.config.temperature)
                    for i in range(0, len(samples), size)
                ]
            )

    def train_step(self) -> dict[str, Any]:
        """Sample a batch of groups, score it, update the policy; the step's metrics."""
        c = self.config
        started = time.perf_counter()
        rows = self.prompts.rows_for(self.step)
        seeds = step_seeds(c.seed, self.step, len(rows) * c.samples_per_prompt)
        groups = sample_groups(
            self.engine,
            rows,
            c.samples_per_prompt,
            self.params,
            seeds,
            self.checker,
            format_reward=c.format_reward,
        )
        sampled_at = time.perf_counter()
        samples = [s for group in groups for s in group]
        rewards = torch.tensor([[s.reward for s in group] for group in groups])
        advantages = group_advantages(rewards, normalize_std=c.normalize_std).flatten().tolist()
        n_tokens = sum(s.n_sampled for s in samples)  # the normaliser: every sampled token of the batch
        no_signal = zero_signal_groups(rewards)
        # A group whose rewards are all equal has advantage 0 on every token and adds nothing to the
        # policy gradient: unless the KL penalty needs its samples, they skip the forward and backward.
        keep = [c.kl_coef > 0 or not flat for flat in no_signal.tolist() for _ in range(c.samples_per_prompt)]
        trained = [s for s, k in zip(samples, keep, strict=True) if k]
        token_advantages = torch.tensor(
            [a for s, a, k in zip(samples, advantages, keep, strict=True) if k for _ in range(s.n_sampled)],
            device=self.device,
        )
        # A batch in which every group is uniform has no gradient, and an optimizer step on nothing
        # would still move the weights (Adam's momentum): skip the update.
        updates = 0 if bool(no_signal.all()) else c.updates_per_batch
        # The KL to the initial model, before this step's update: penalised over every sample (with
        # kl_coef, all are trained), or only reported, from the step's first kl_samples samples (0 =
        # all), the same share of every step whichever groups carry signal, so steps compare.
        penalised = c.kl_coef > 0 and updates > 0
        measured = trained if c.kl_coef > 0 else samples[: c.kl_samples or len(samples)]  # (trained: all)
        self.policy.train()
        reference = self._log_probs(self.reference, measured)
        old = self._log_probs(self.policy, trained) if updates > 1 else None
        lr = self.lr()
        set_lr(self.optimizer, lr)
        loss_total, kl_total, grad_norm = 0.0, 0.0, 0.0
        clipped_sum = torch.zeros((), device=self.device)  # summed there, read once at the end
        if not penalised:
            kl_total = kl_estimate(self._log_probs(self.policy, measured), reference).sum().item()
        for update in range(updates):
            self.optimizer.zero_grad(set_to_none=True)
            done = 0
            for i in range(0, len(trained), c.micro_batch_size):
                piece = trained[i : i + c.micro_batch_size]
                count = sum(s.n_sampled for s in piece)
                log_probs = sampled_log_probs(self.policy, piece, temperature=c.temperature)
                span = slice(done, done + count)
                before = log_probs.detach() if old is None else old[span]
                loss, clipped = clipped_policy_loss(
                    log_probs,
                    before,
                    token_advantages[span],
                    n_tokens,
                    clip_low=c.clip_low,
                    clip_high=c.clip_high,
                )
                if penalised:
                    kl = kl_estimate(log_probs, reference[span])
                    loss = loss + c.kl_coef * kl.sum() / max(n_tokens, 1)
                    if update == 0:
                        kl_total += kl.detach().sum().item()
                loss.backward()
                clipped_sum += clipped  # a share of the batch's tokens
                if update == 0:  # as sampled: the loss before this batch moved the policy
                    loss_total += loss.item()
                done += count
            grad_norm = float(clip_gradients(self.policy.parameters(), c.grad_clip))
            if math.isfinite(grad_norm):
                self.optimizer.step()
        self.policy.eval()
        self.step += 1
        finished = time.perf_counter()
        correct = torch.tensor([[s.correct for s in group] for group in groups], dtype=torch.float32)
        return {
            "step": self.step,
            "reward_mean": rewards.mean().item(),
            "pass@1": correct.mean().item(),
            f"pass@{c.samples_per_prompt}": correct.amax(dim=1).mean().item(),
            "zero_signal_groups": no_signal.float().mean().item(),
            "well_formed": sum(s.well_formed for s in samples) / len(samples),
            "response_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
            "kl": kl_total / max(sum(s.n_sampled for s in measured), 1),
            "loss": loss_total,
            "clipped": clipped_sum.item() / max(updates, 1),  # over the step's updates
            "grad_norm": grad_norm,
            "lr": lr,
            "sample_s": sampled_at - started,
            "update_s": finished - sampled_at,
            "tokens_per_s": sum(len(s.completion_ids) for s in samples) / (finished - started),
        }

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out exact match (greedy) per family, and pass@G of samples at the training temperature."""
        c = self.config
        return held_out_report(
            self.engine, self.held_out, self.checker, self.params, c.samples_per_prompt, seed=c.seed + 1
        )

    # -- the run -----------------------------------------------------------------------------

    def save(self) -> Path:
        state = {
            "progress": {"step": self.step, "elapsed_s": self.elapsed},
            "reference_sha256": self.reference_digest,  # the KL's model: a resume must find the same one
        }
        self.last_checkpoint = ckpt.save_checkpoint(
            self.run_dir, self.step, self.container, self.optimizer, state, self.config.keep_last
        )
        return self.last_checkpoint

    def run(self) -> RLResult:
        c = self.config
        result = RLResult(self.step, "max_steps", self.last_checkpoint)
        budget = None if c.max_minutes is None else c.max_minutes * 60
        bar = tqdm(
            total=c.max_steps,
            initial=self.step,
            disable=not self.progress,
            desc="rl",
            unit="step",
            file=sys.stderr,
        )
        # A resumed run's earlier evaluations (the summary compares the first with the last, and a
        # finished run resumed is not evaluated, nor logged, twice).
        result.evaluations.update(self._logged_evaluations())
        with MetricsWriter(self.run_dir, resumed_at=self.step) as writer, bar, sigint_flag() as interrupted:
            if self.step == 0:
                result.evaluations[0] = self._evaluate_and_log(writer)
            while self.step < c.max_steps:
                started = time.perf_counter()
                record = self.train_step()
                self.elapsed += time.perf_counter() - started
                record["elapsed_s"] = self.elapsed
                if self.step % c.log_every == 0 or self.step == c.max_steps:
                    writer.log(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.4f}")
                out_of_time = budget is not None and self.elapsed >= budget
                last = self.step == c.max_steps or out_of_time or interrupted.is_set()
                if c.eval_every and self.step % c.eval_every == 0 and not last:
                    result.evaluations[self.step] = self._evaluate_and_log(writer)
                if self.step % c.save_every == 0 or last:
                    self.save()
                if interrupted.is_set():
                    result.stop_reason = "interrupted"
                    break
                if out_of_time:
                    result.stop_reason = "time_budget"
                    break
            if result.stop_reason != "interrupted" and self.step not in result.evaluations:
                result.evaluations[self.step] = self._evaluate_and_log(writer)
        result.step, result.checkpoint = self.step, self.last_checkpoint
        return result

    def _logged_evaluations(self) -> dict[int, dict[str, float]]:
        """The held-out evaluations RUN/metrics.jsonl holds, by step (a resumed run's earlier ones)."""
        return {
            record["step"]: {k: v for k, v in record.items() if "/" in k}  # acc/F, pass@G/F
            for record in read_metrics(self.run_dir)
            if any(k.startswith("acc/") for k in record)
        }

    def _evaluate_and_log(self, writer: MetricsWriter) -> dict[str, float]:
        report = self.evaluate()
        if report:
            writer.log({"step": self.step, **report})
            shown = ", ".join(
                f"{k.removeprefix('acc/')} {v:.0%}" for k, v in report.items() if k.startswith("acc/")
            )
            self.say(f"step {self.step} | held-out exact match: {shown}")
        return report


def run_rl(
    config: RLConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> RLResult:
    """Improve `config.init_from` by RL against checkable answers; the run is written under `run_dir`."""
    return RLTrainer(config, run_dir, resume=resume, overwrite=overwrite, progress=progress, echo=echo).run()
