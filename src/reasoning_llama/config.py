"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from reasoning_llama.errors import ConfigError
from reasoning_llama.tokenizer import N_VOCAB

_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _is_of_type(value: Any, type_name: str) -> bool:
    """Whether a value fits a ModelConfig field annotated `type_name` (annotations are strings here)."""
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer (DESIGN.md §2)."""

    vocab_size: int = N_VOCAB  # the tokenizer's ids (DESIGN.md §1)
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 768
    max_seq_len: int = 1280
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # The seed's extra SwiGLU block between the final norm and the head. With it off
    # the model is exactly transformers' LlamaForCausalLM.
    final_block: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        wrong_type = [
            f"{f.name} must be {_TYPE_NAMES[f.type]}, got {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if not _is_of_type(getattr(self, f.name), f.type)
        ]
        if wrong_type:  # (from a config.json or model_overrides, which no schema types)
            raise ConfigError("invalid model config: " + "; ".join(wrong_type))
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not 0 < getattr(self, name) < float("inf"):
                problems.append(f"{name} must be positive and finite, got {getattr(self, name)}")
        if self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_heads > 0 and (self.dim // self.n_heads) % 2:
            problems.append(f"head dim ({self.dim // self.n_heads}) must be even for RoPE")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            close = [m for key in unknown for m in difflib.get_close_matches(key, sorted(known), n=1)]
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}{hint}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"model config not found: {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config {path} is not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"model config {path} must hold a JSON object")
        return cls.from_dict(values)


PRESETS: dict[str, ModelConfig] = {
    # The reference model, "Reasoning-LLaMA-Small": 100,217,088 parameters.
    "small-100m": ModelConfig(),
    # For CPU work and the quickstart: most of its parameters are the 50,263-way
    # embedding and head, so the trunk can stay small.
    "tiny": ModelConfig(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=512),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


# --- data and training -------------------------------------------------------------


@dataclass
class DataConfig:
    """Where training rows come from and how they become fixed-length rows."""

    # "synthetic", "hub", "local" (json/jsonl/parquet with user/reasoning/assistant) or
    # "text" (plain-text corpus: .txt files or JSONL with a `text` field, for pretraining).
    source: str = "synthetic"
    # hub: the dataset name; local/text: a file, a directory or a glob.
    path: str = "KingNish/reasoning-base-20k"
    split: str = "train"  # the hub split to read
    # synthetic tasks: families (empty = the defaults), counts and difficulty.
    families: list[str] = field(default_factory=list)
    synthetic_train_size: int = 10000  # the default families hold ~12k distinct train problems
    synthetic_val_size: int = 500
    difficulty: int | None = None
    val_fraction: float = 0.02  # for sources without a held-out split
    seq_len: int = 512
    packing: bool = True  # best-fit packing; False = the seed's one example per padded row
    overlong: str = "truncate"  # or "drop": examples longer than seq_len
    train_on_prompt: bool = False
    system_prompt: str | None = None
    cache_dir: str | None = None  # tokenized data; None: the user cache's data/ (see user_cache.py)
    seed: int = 1234


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging of one run."""

    preset: str = "tiny"
    # Overrides of the preset's ModelConfig fields, e.g. {"final_block": false}.
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint whose weights start the run (e.g. pretrained)
    global_batch_tokens: int = 16384  # reached by gradient accumulation
    micro_batch_size: int = 16  # rows per forward pass
    max_steps: int = 1000  # optimizer steps; epochs, when set, take precedence
    epochs: float | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"
    compile: bool | None = None  # torch.compile of the decoder layers; unset = on CUDA only
    attention: str = "auto"  # auto = FlexAttention on CUDA, sdpa (dense mask) on CPU; or flex, varlen, sdpa
    # Data parallelism under torchrun: none, ddp or fsdp (FSDP2); auto = ddp when torchrun started
    # more than one process, else none.
    distributed: str = "auto"
    eval_every: int = 100  # validation loss every N steps
    eval_batches: int = 20
    task_eval_every: int = 0  # synthetic-task accuracy every N steps (0 = only at the end)
    task_eval_size: int = 100
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    save_every: int = 200
    keep_last: int = 2  # plus the best by validation loss
    log_every: int = 10
    seed: int = 1234


@dataclass
class RunConfig:
    """Everything a `reasoning-llama train` run needs; YAML recipes (recipes/, or a file of your own) fill it."""

    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class RLConfig:
    """A `reasoning-llama rl` run: GRPO-style policy gradient from a checkpoint against checkable answers."""

    init_from: str | None = None  # the checkpoint (or run directory) to improve
    # What to practise: synthetic task families (their train split), or a file of rows with `user` and
    # `assistant` (no reasoning needed) scored by `checker`: exact, numeric, package.module:function
    # or path/to/file.py:function.
    families: list[str] = field(default_factory=list)
    data: str | None = None
    checker: str = "exact"
    difficulty: dict[str, int] = field(default_factory=dict)  # per family; missing = the family's default
    train_size: int = 5000  # distinct train-split problems drawn per family (the prompts cycle through them)
    # Sampling: G answers to each of B prompts per step, through the engine.
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    reasoning_budget: int | None = None
    # Rewards and objective.
    format_reward: float = 0.0  # added for a well-formed reasoning -> answer turn
    normalize_std: bool = False  # divide advantages by the group's standard deviation
    updates_per_batch: int = 1  # optimizer steps per sampled batch; beyond 1 the PPO clip matters
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0  # penalty on the KL to the initial model (always measured)
    # With kl_coef 0 the KL is only reported: measured over this many of a step's samples (0 = all),
    # which spares most of the initial model's forward pass.
    kl_samples: int = 32
    micro_batch_size: int = 64  # sequences per forward pass when recomputing log-probabilities
    # Optimisation.
    lr: float = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 1.0  # 1 = constant after warmup
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"  # or sgd (momentum beta1): steps in proportion to the gradient, not its sign
    grad_clip: float = 1.0
    max_steps: int = 100
    max_minutes: float | None = None  # save and stop after this much time in RL steps (not evaluations)
    # Held-out evaluation (test split, greedy) of the trained families plus `eval_families`.
    eval_every: int = 0  # 0 = at the start and the end only
    eval_size: int = 100  # problems per family
    eval_families: list[str] = field(default_factory=list)
    save_every: int = 20
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "auto"


T = TypeVar("T")

RECIPES = Path(__file__).parent / "recipes"


RL_RECIPE_PREFIX = "rl-"  # recipes for `reasoning-llama rl` (RLConfig); the others are for `train`


def recipe_names(*, rl: bool = False) -> list[str]:
    """The recipes shipped with the package (`--config NAME`): `train`'s, or with `rl` those of `rl`."""
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    return [n for n in names if n.startswith(RL_RECIPE_PREFIX) == rl]


def recipe_path(name_or_path: str | Path, *, rl: bool = False) -> Path:
    """A YAML file given by path, or a packaged recipe given by name (e.g. `quickstart`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config file {name_or_path} is a directory; give a YAML file or a packaged recipe")
    name = path.name.removesuffix(".yaml").removesuffix(".yml")  # `quickstart.yaml` names the recipe too
    packaged = RECIPES / f"{name}.yaml"
    if path.parent == Path(".") and name in recipe_names(rl=rl):
        return packaged
    if path.parent == Path(".") and name in recipe_names(rl=not rl):
        other = "rl" if not rl else "train"
        raise ConfigError(
            f"{name_or_path} is a recipe of `reasoning-llama {other}`; this command's are: "
            f"{', '.join(recipe_names(rl=rl))}"
        )
    raise ConfigError(
        f"config file {name_or_path} does not exist; give a YAML file or a packaged recipe: {', '.join(recipe_names(rl=rl))}"
    )


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file or packaged recipe <- `key=value` overrides (e.g. `train.lr=3e-4`), type-checked by OmegaConf."""
    return load_config(RunConfig, path, overrides)


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """A `schema` dataclass from its defaults <- a YAML file or packaged recipe <- `key=value` overrides."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    example = "train.lr=3e-4" if schema is RunConfig else "lr=1e-4"  # a setting of this command's own
    for override in overrides or ():
        if "=" not in override:
            raise ConfigError(f"--set {override}: give key=value, e.g. --set {example}")
        key, _, value = override.partition("=")
        try:  # with OmegaConf's own YAML reader, one override at a time, to name the one it cannot read
            OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)
        except (yaml.YAMLError, OmegaConfBaseException) as e:  # `*.jsonl` reads as an alias, `${` as a
            reason = str(e).strip().splitlines()[0]  # broken interpolation, `[a,` as an unclosed list
            if value.lstrip().startswith(("[", "{")):  # a list or a mapping: quoting would make it a string
                fix = "close its brackets and name each key once"
            else:  # as `setting` writes a literal string: quoted, `${` escaped
                fix = f"quote it, e.g. --set {shlex.quote(setting(key, value))}"
            raise ConfigError(f"--set {override}: YAML cannot read the value ({reason}); {fix}") from None
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            merged = OmegaConf.merge(merged, _read_yaml(recipe_path(path, rl=schema is RLConfig), schema))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        reason, key = str(e).splitlines()[0], getattr(e, "full_key", None)
        where = f"{key}: " if key and f"'{key.rsplit('.', 1)[-1]}'" not in reason else ""  # the value's key
        raise ConfigError(f"bad config: {where}{reason}{_hint(schema, e)}") from None


def setting(key: str, value: object) -> str:
    """A `key=value` override that keeps `value` (a path, say) a string whatever it holds."""
    # `\${` keeps OmegaConf from reading `${...}` in a path as an interpolation. JSON's quoting is
    # YAML's, but YAML reads no escaped surrogate pair (hence ensure_ascii=False) while it refuses
    # raw control characters and folds raw line separators (hence those escaped).
    quoted = json.dumps(_not_interpolated(str(value)), ensure_ascii=False)
    return f"{key}={_YAML_UNSAFE.sub(_escaped, quoted)}"


# OmegaConf reads `\${` as a literal `${`, and `\\` as a backslash only right before one.
_NOT_INTERPOLATED = re.compile(r"(\\*)\$\{")
# What YAML reads raw inside double quotes: printable characters, line separators excepted.
_YAML_UNSAFE = re.compile(
    r"[^\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)


def _not_interpolated(text: str) -> str:
    return _NOT_INTERPOLATED.sub(r"\1\1\\${", text)


def _escaped(character: re.Match[str]) -> str:
    return f"\\u{ord(character.group()):04x}"


def config_yaml(config: Any) -> str:
    """A config dataclass as the YAML that `load_config` reads back as it was: a `${` in a value (a
    path, say) is escaped, or reading it again would take it for an interpolation."""
    from omegaconf import OmegaConf

    def literal(value: Any) -> Any:
        if isinstance(value, str):
            return _not_interpolated(value)
        if isinstance(value, dict):
            return {key: literal(item) for key, item in value.items()}
        if isinstance(value, list):
            return [literal(item) for item in value]
        return value

    text = OmegaConf.to_yaml(OmegaConf.create(literal(dataclasses.asdict(config))))
    if isinstance(config, RunConfig) and config.train.init_from:
        # The saved file says so, where it would otherwise read as a run of the preset's model.
        text = "# the model is train.init_from's: train.preset does not apply to this run\n" + text
    return text


def _read_yaml(path: Path, schema: type) -> Any:
    """A YAML file of settings (a mapping), or a one-line ConfigError saying what is wrong with it."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path} is not a readable YAML file: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, DictConfig):
        example = "train: {lr: 3e-4}" if schema is RunConfig else "lr: 1e-4"
        raise ConfigError(f"{path} must hold settings as a mapping (e.g. {example}), not a list")
    return loaded


def _hint(schema: type, error: Exception) -> str:
    """What the user most likely meant, for the mistakes OmegaConf's message leaves unexplained."""
    from omegaconf.errors import ConfigKeyError, InterpolationResolutionError

    key = getattr(error, "full_key", None)
    if isinstance(error, ConfigKeyError) and schema is RunConfig and key and "." not in key:
        for section, fields in (("train", TrainConfig), ("data", DataConfig)):
            if key in {f.name for f in dataclasses.fields(fields)}:
                return f" (did you mean {section}.{key}?)"
    if isinstance(error, InterpolationResolutionError):
        return " (${...} is OmegaConf's interpolation, e.g. ${oc.env:HOME}; write \\${ for a literal ${)"
    if "is not a ListConfig" in str(error):
        families = "data.families" if schema is RunConfig else "families"
        return f" (a list is written [a, b], e.g. {families}=[chain_sum,max_digit])"
    return ""


def pin_paths(config: RunConfig | RLConfig) -> None:
    """Make the local files, directories and globs a run reads absolute, so `--resume` finds them from
    any working directory (names that are no local path, such as a hub dataset, stay)."""

    def pinned(path: str | None) -> str | None:
        local = Path(path).expanduser() if path else None
        if local is not None and glob.has_magic(str(local)):
            return str(local if local.is_absolute() else Path.cwd() / local)
        return str(local.resolve()) if local is not None and local.exists() else path

    if isinstance(config, RunConfig):
        if config.data.source != "synthetic":  # the one source that reads no path
            config.data.path = pinned(config.data.path) or config.data.path
        config.train.init_from = pinned(config.train.init_from)
        if config.data.cache_dir:  # made if missing: absolute whether it exists yet or not
            config.data.cache_dir = os.path.abspath(Path(config.data.cache_dir).expanduser())
    else:
        config.data, config.init_from = pinned(config.data), pinned(config.init_from)
        source, _, function = config.checker.rpartition(":")
        if source.endswith(".py"):  # a checker given by its file
            config.checker = f"{pinned(source)}:{function}"


def run_config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
