"""`reasoning-llama plot RUN`: train/validation loss, learning rate and task accuracy as one PNG."""

from __future__ import annotations

from pathlib import Path

from reasoning_llama.errors import ConfigError
from reasoning_llama.training.metrics import METRICS_FILE, read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to `out` (default RUN/plot.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(f"{run_dir / METRICS_FILE} is missing or empty; is {run_dir} a training run?")
    out = Path(out) if out is not None else run_dir / "plot.png"
    accuracy_keys = sorted({k for r in records for k in r if k.startswith("acc/")})

    panels = 3 if accuracy_keys else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    loss_ax, lr_ax = axes[0], axes[1]
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        steps, values = _series(records, key)
        if steps:
            loss_ax.plot(steps, values, label=label, marker="o" if key == "val_loss" else None, markersize=3)
    loss_ax.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log")
    loss_ax.legend()
    steps, values = _series(records, "lr")
    lr_ax.plot(steps, values)
    lr_ax.set(title="learning rate", xlabel="step")
    if accuracy_keys:
        acc_ax = axes[2]
        for key in accuracy_keys:
            steps, values = _series(records, key)
            acc_ax.plot(steps, values, label=key.removeprefix("acc/"), marker="o", markersize=3)
        acc_ax.set(title="task exact match (held-out)", xlabel="step", ylim=(-0.02, 1.02))
        acc_ax.legend()
    fig.suptitle(run_dir.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
