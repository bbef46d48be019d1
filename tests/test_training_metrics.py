"""metrics.jsonl and the `plot` PNG."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from reasoning_llama.errors import ConfigError
from reasoning_llama.training.metrics import MetricsWriter, read_metrics, truncate_after
from reasoning_llama.training.plot import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps=20):
    with MetricsWriter(run_dir, tensorboard=False) as writer:
        for step in range(1, steps + 1):
            writer.log(
                {"step": step, "train_loss": 5.0 / step, "lr": 1e-3 * min(1, step / 5), "grad_norm": 1.0}
            )
            if step % 5 == 0:
                writer.log(
                    {
                        "step": step,
                        "val_loss": 6.0 / step,
                        "acc/chain_sum": step / steps,
                        "acc/overall": step / steps,
                    }
                )


def test_jsonl_records_read_back_in_order_and_a_torn_line_is_skipped(tmp_path):
    write_run(tmp_path, steps=10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train_lo')  # a process killed mid-write
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 11))
    assert records[-1] == {"step": 10, "val_loss": 0.6, "acc/chain_sum": 1.0, "acc/overall": 1.0}


def test_lines_that_are_no_records_are_skipped_by_line_and_plot_still_draws(tmp_path, caplog):
    """Valid JSON that is no record (a number, an object without a step) is named, not a traceback."""
    write_run(tmp_path, steps=10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('5\n{"lr": 0.2}\n["step"]\n')
    records = read_metrics(tmp_path)
    assert len(records) == 12 and all(isinstance(r["step"], int) for r in records)
    for line in (13, 14, 15):  # after 10 train and 2 validation records
        assert f"metrics.jsonl:{line}: skipping a line that is no metrics record" in caplog.text
    assert plot_run(tmp_path).read_bytes().startswith(PNG_SIGNATURE)


def test_truncate_after_drops_later_steps(tmp_path):
    write_run(tmp_path, steps=10)
    truncate_after(tmp_path, 5)
    assert max(r["step"] for r in read_metrics(tmp_path)) == 5
    assert sum("val_loss" in r for r in read_metrics(tmp_path)) == 1


def test_plot_writes_a_png(tmp_path):
    write_run(tmp_path)
    out = plot_run(tmp_path)
    assert out == tmp_path / "plot.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert plot_run(tmp_path, tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    for name in (
        "curves",
        "curves.xyz",
    ):  # matplotlib would add .png to one, fail with a traceback on the other
        with pytest.raises(
            ConfigError, match=f"cannot write a plot as .*{name}: name a .png, .pdf, .svg file"
        ):
            plot_run(tmp_path, tmp_path / name)


@pytest.mark.slow
def test_plot_cli_with_out_and_error_on_a_non_run(tmp_path):
    write_run(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "reasoning_llama", "plot"]
    result = subprocess.run(
        [*cli, str(tmp_path / "run"), "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_SIGNATURE)
    result = subprocess.run([*cli, str(tmp_path / "nothing")], capture_output=True, text=True, env=env)
    assert (
        result.returncode == 2
        and "is missing or empty; is" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_a_curve_of_one_point_is_drawn_as_a_dot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reasoning_llama.training.plot import draw

    fig, axis = plt.subplots()
    assert draw(axis, [1], [2.0]).get_marker() == "o"  # a line of one point would show nothing
    assert draw(axis, [1, 2], [2.0, 1.0]).get_marker() in (None, "None")
    assert draw(axis, [1, 2], [2.0, 1.0], dots=True).get_marker() == "o"
    plt.close(fig)
