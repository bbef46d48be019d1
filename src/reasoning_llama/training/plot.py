"""`reasoning-llama plot RUN`: a run's curves as one PNG: the losses (training) or the rewards (RL),
the learning rate, held-out task accuracy, and the KL to the initial model (RL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reasoning_llama.errors import ConfigError
from reasoning_llama.training.metrics import METRICS_FILE, read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def draw(axis: Any, steps: list[int], values: list[float], *, dots: bool = False, **style: Any) -> Any:
    """One curve on `axis`: with dots where asked, and always for a single point (a line of one
    point is invisible)."""
    dotted = dots or len(steps) == 1
    return axis.plot(steps, values, marker="o" if dotted else None, markersize=3, **style)[0]


PLOT_FILE = "plot.png"
PLOT_FORMATS = (".png", ".pdf", ".svg")  # what matplotlib writes, by the file's suffix


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to `out` (default RUN/plot.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(f"{run_dir / METRICS_FILE} is missing or empty; is {run_dir} a training run?")
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    if out.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"cannot write a plot as {out}: name a {', '.join(PLOT_FORMATS)} file")
    accuracy_keys = sorted({k for r in records for k in r if k.startswith("acc/")})

    reward_keys = [k for k in ("reward_mean", "pass@1") if any(k in r for r in records)]
    reward_keys += sorted(
        {k for r in records for k in r if k.startswith("pass@") and "/" not in k} - {"pass@1"}
    )
    reward_keys += [k for k in ("zero_signal_groups",) if any(k in r for r in records)]
    panels = ["reward" if reward_keys else "loss", "lr"]
    panels += ["accuracy"] if accuracy_keys else []
    panels += ["kl"] if any("kl" in r for r in records) else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    ax = dict(zip(panels, axes, strict=True))
    if "loss" in ax:
        for key, label in (("train_loss", "train"), ("val_loss", "validation")):
            steps, values = _series(records, key)
            if steps:
                draw(ax["loss"], steps, values, dots=key == "val_loss", label=label)
        ax["loss"].set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log")
        ax["loss"].legend()
    if "reward" in ax:
        for key in reward_keys:
            draw(ax["reward"], *_series(records, key), label=key.replace("_", " "))
        ax["reward"].set(title="samples (train prompts)", xlabel="step", ylim=(-0.02, 1.02))
        ax["reward"].legend()
    draw(ax["lr"], *_series(records, "lr"))
    ax["lr"].set(title="learning rate", xlabel="step")
    if "accuracy" in ax:
        for key in accuracy_keys:
            draw(ax["accuracy"], *_series(records, key), dots=True, label=key.removeprefix("acc/"))
        ax["accuracy"].set(title="task exact match (held-out)", xlabel="step", ylim=(-0.02, 1.02))
        ax["accuracy"].legend()
    if "kl" in ax:
        draw(ax["kl"], *_series(records, "kl"))
        ax["kl"].set(title="KL to the initial model (per token)", xlabel="step")
    fig.suptitle(run_dir.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
