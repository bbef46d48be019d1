"""Scoring generations and measuring loss: the real engine and model, with outputs made known by a logits hook."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import run_cli, run_clis
from reasoning_llama import evaluation
from reasoning_llama.errors import ConfigError
from reasoning_llama.generation import Engine
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import save_model
from reasoning_llama.tasks import DEFAULT_FAMILIES, problem_split
from reasoning_llama.tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def forcing_engine(model: Transformer, outputs: dict[str, tuple[str, str]]) -> Engine:
    """An engine whose model is steered (through the engine's logits hook) to write outputs[user]."""
    tokenizer = get_tokenizer()
    by_prompt = {
        tuple(tokenizer.render_prompt([{"role": "user", "content": user}])): tokenizer.render_generation(
            *output
        )
        for user, output in outputs.items()
    }

    def hook(request, logits):
        target = by_prompt[tuple(request.prompt_ids)][len(request.output_ids)]
        forced = torch.full_like(logits, -math.inf)
        forced[target] = 0.0
        return forced

    return Engine(model, tokenizer, max_batch_size=4, logits_hook=hook)


def test_scores_exact_match_format_and_reasoning_length_per_family(tiny_config):
    rows = evaluation.synthetic_test_rows(["chain_sum", "sort_digits"], 3, seed=5)
    outputs = {r["user"]: (r["reasoning"], r["assistant"]) for r in rows}
    wrong = rows[0]["user"]  # a chain_sum problem answered off by one
    outputs[wrong] = (outputs[wrong][0], str(int(rows[0]["assistant"]) + 1))
    leading_zero = rows[2]["user"]  # the family's checker accepts 07 for 7
    outputs[leading_zero] = (outputs[leading_zero][0], "0" + rows[2]["assistant"])

    report = evaluation.evaluate_generations(forcing_engine(Transformer(tiny_config), outputs), rows)
    assert report.families["chain_sum"].n == 3
    assert report.families["chain_sum"].exact_match == pytest.approx(2 / 3)
    assert report.families["sort_digits"].exact_match == 1.0
    assert report.overall.exact_match == pytest.approx(5 / 6)
    assert report.overall.format_adherence == 1.0 and report.overall.finished == 1.0
    tokenizer = get_tokenizer()
    lengths = [len(tokenizer.encode(r["reasoning"])) for r in rows]
    assert report.overall.mean_reasoning_tokens == pytest.approx(sum(lengths) / len(lengths))
    assert [e["correct"] for e in report.examples] == [False, True, True, True, True, True]


def test_unfinished_output_is_neither_correct_nor_well_formed(tiny_config):
    rows = evaluation.synthetic_test_rows(["chain_sum"], 1, seed=5)
    engine = forcing_engine(
        Transformer(tiny_config), {rows[0]["user"]: (rows[0]["reasoning"], rows[0]["assistant"])}
    )
    report = evaluation.evaluate_generations(engine, rows, max_new_tokens=3)  # cut inside the reasoning
    assert report.overall.exact_match == 0.0 and report.overall.format_adherence == 0.0
    assert report.overall.finished == 0.0
    for bad in (0, -5):  # a budget of nothing is an error, never a table of zeros or the default
        with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
            evaluation.evaluate_generations(engine, rows, max_new_tokens=bad)


def test_a_prompt_filling_the_context_counts_wrong_and_is_reported_not_averaged(tiny_config):
    rows = evaluation.synthetic_test_rows(["chain_sum"], 2, seed=5)
    too_long = {**rows[1], "user": "word " * tiny_config.max_seq_len}
    engine = forcing_engine(
        Transformer(tiny_config), {rows[0]["user"]: (rows[0]["reasoning"], rows[0]["assistant"])}
    )
    report = evaluation.evaluate_generations(engine, [rows[0], too_long])
    assert report.overall.n == 2 and report.overall.prompts_not_fitting == 1
    assert report.overall.exact_match == 0.5  # the one not attempted is wrong
    reasoning = len(get_tokenizer().encode(rows[0]["reasoning"]))
    assert report.overall.mean_reasoning_tokens == reasoning  # over the one attempted


def test_answer_matching():
    assert evaluation.row_is_correct({"assistant": "7", "family": "chain_sum"}, " 07 ")
    assert evaluation.row_is_correct({"assistant": "1 2 5", "family": "sort_digits"}, "1, 2, 5")
    assert not evaluation.row_is_correct({"assistant": "7", "family": "chain_sum"}, "8")
    assert evaluation.row_is_correct({"assistant": "Paris."}, "  paris")  # no family: normalised text
    assert evaluation.row_is_correct({"assistant": "Paris.", "family": "geo"}, "paris")  # not synthetic
    assert not evaluation.row_is_correct({"assistant": "Paris."}, "Lyon")


def test_task_spec_and_test_split_rows():
    assert evaluation.parse_task_spec("synthetic") == list(DEFAULT_FAMILIES)
    assert evaluation.parse_task_spec("synthetic:chain_sum, add") == ["chain_sum", "add"]
    with pytest.raises(ConfigError, match="unknown task"):
        evaluation.parse_task_spec("math")
    with pytest.raises(ConfigError, match="unknown synthetic family nope"):
        evaluation.parse_task_spec("synthetic:nope")
    with pytest.raises(ConfigError, match="unknown task 'synthetic:'"):  # not the default families
        evaluation.parse_task_spec("synthetic:")
    rows = evaluation.synthetic_test_rows(["chain_sum", "count_letter"], 4, seed=0)
    assert sorted(r["family"] for r in rows) == ["chain_sum"] * 4 + ["count_letter"] * 4
    assert all(problem_split(r["user"]) == "test" for r in rows)


def test_loss_on_rows_is_the_token_mean_of_per_example_cross_entropy(tiny_config):
    model = Transformer(tiny_config)
    tokenizer = get_tokenizer()
    rows = evaluation.synthetic_test_rows(["chain_sum", "sort_digits"], 2, seed=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            example = tokenizer.render_example(row["user"], row["reasoning"], row["assistant"])
            ids = torch.tensor([example.ids])
            mask = torch.tensor(example.loss_mask[1:])
            logits = model(ids[:, :-1])[0]
            total += F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum").item()
            count += int(mask.sum())
    report = evaluation.loss_on_rows(model, tokenizer, rows, batch_size=2)
    assert report.loss_tokens == count
    assert report.loss == pytest.approx(total / count, rel=1e-5)
    assert report.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert report.cut_rows == 0
    # A row longer than the context is scored on what fits of it, and counted.
    long_row = {**rows[0], "reasoning": "step " * tiny_config.max_seq_len}
    with_long = evaluation.loss_on_rows(model, tokenizer, [*rows, long_row], batch_size=2)
    assert with_long.cut_rows == 1 and with_long.loss_tokens > report.loss_tokens


@pytest.mark.slow
def test_eval_cli_json_on_tasks_and_on_a_data_file(tmp_path, tiny_config):
    checkpoint = tmp_path / "ckpt"
    model = Transformer(tiny_config)
    save_model(checkpoint, model)

    result = run_cli(
        "eval", "--checkpoint", str(checkpoint), "--task", "synthetic:chain_sum,sort_digits",
        "--limit", "2", "--max-new-tokens", "6", "--device", "cpu", "--json", one_thread=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["families"]) == {"chain_sum", "sort_digits"}
    for score in report["families"].values():
        assert score["n"] == 2
        assert {"exact_match", "format_adherence", "mean_reasoning_tokens", "finished"} <= set(score)
    assert report["overall"]["format_adherence"] == 0.0  # 6 tokens cannot hold a finished answer
    assert report["loss"] > 0 and report["perplexity"] == pytest.approx(math.exp(report["loss"]))

    rows = evaluation.synthetic_test_rows(["chain_sum"], 3, seed=2)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"user": "no answer"}\n')
    result = run_cli(
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--device",
        "cpu",
        "--json",
        one_thread=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = evaluation.loss_on_rows(model, get_tokenizer(), rows[:3])
    assert report["rows"] == 3 and "families" not in report
    # The skipped row is in the report, with where it is, as `data stats --json` has it.
    assert report["validation"]["rows_read"] == 4 and report["validation"]["rows_skipped"] == 1
    assert report["validation"]["first_offending"][0].startswith(f"{data}:4:")
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-4)
    assert report["perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)


@pytest.mark.slow
def test_eval_cli_prints_its_table_on_stdout_and_writes_examples_beside_never_over_the_data(
    tmp_path, tiny_config
):
    checkpoint = save_model(tmp_path / "ckpt", Transformer(tiny_config))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in evaluation.synthetic_test_rows(["chain_sum"], 2)))
    (tmp_path / "adir").mkdir()
    common = ["eval", "--checkpoint", checkpoint, "--data", data, "--generate", "--max-new-tokens", "4"]
    over_data, into_dir, no_parent, fine = run_clis(
        [
            (*common, "--examples", data),
            (*common, "--examples", tmp_path / "adir"),
            (*common, "--examples", tmp_path / "nowhere" / "e.jsonl"),
            (*common, "--examples", tmp_path / "e.jsonl"),
        ],
        one_thread=True,
    )
    assert over_data.returncode == 2 and "is the --data file; give another file" in over_data.stderr
    assert into_dir.returncode == 2 and "is a directory; give a file name" in into_dir.stderr
    assert (
        no_parent.returncode == 2
        and f"the directory {tmp_path / 'nowhere'} does not exist" in no_parent.stderr
    )
    assert all("Traceback" not in r.stderr for r in (over_data, into_dir, no_parent))
    assert data.read_text().count("\n") == 2  # untouched
    assert fine.returncode == 0, fine.stderr
    assert "exact match" in fine.stdout and "perplexity" in fine.stdout  # the output, not a message
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 2


def test_eval_cli_scores_answer_only_rows_with_rls_checkers(tmp_path, tiny_config):
    """The rows `rl --data` practises (user and assistant, no reasoning) are scored by their answers,
    with the checkers `rl` takes; there is no loss to measure without reasoning."""
    checkpoint = save_model(tmp_path / "ckpt", Transformer(tiny_config))
    data = tmp_path / "qa.jsonl"
    data.write_text((json.dumps({"user": "Say 7.", "assistant": "7"}) + "\n") * 3)
    (tmp_path / "checks.py").write_text("def anything(expected, given):\n    return True\n")
    common = ["eval", "--checkpoint", checkpoint, "--data", data, "--max-new-tokens", "4", "--json"]
    lenient, plain = run_clis(
        [(*common, "--checker", f"{tmp_path / 'checks.py'}:anything"), tuple(common)], one_thread=True
    )
    assert lenient.returncode == 0 and plain.returncode == 0, lenient.stderr + plain.stderr
    lenient, plain_report = json.loads(lenient.stdout), json.loads(plain.stdout)
    assert lenient["rows"] == plain_report["rows"] == 3 and lenient["loss"] is None
    assert lenient["overall"]["exact_match"] == 1.0  # every answer, whatever it is, by this checker
    assert plain_report["overall"]["exact_match"] == 0.0  # 4 tokens of an untrained model: no "7"
    assert "has no reasoning to measure a loss on: scoring its answers instead" in plain.stderr
    listed = run_cli(*common, "--examples", tmp_path / "e.jsonl", one_thread=True)  # generations: listed
    assert listed.returncode == 0 and len((tmp_path / "e.jsonl").read_text().splitlines()) == 3
    # Answers are scored whatever else the rows lack, as `rl --data` takes them: an empty reasoning,
    # a parquet file without the column, a saved dataset; a bad row among them is skipped and said.
    import datasets

    (tmp_path / "empty.jsonl").write_text(
        json.dumps({"user": "q", "reasoning": " ", "assistant": "7"}) + "\n"
    )
    (tmp_path / "mixed.jsonl").write_text(
        data.read_text() + json.dumps({"user": "", "assistant": "7"}) + "\n"
    )
    answers = datasets.Dataset.from_list([{"user": "Say 7.", "assistant": "7"}] * 2)
    answers.to_parquet(str(tmp_path / "qa.parquet"))
    datasets.DatasetDict(train=answers, test=answers.select([0])).save_to_disk(str(tmp_path / "saved"))
    inputs = ("empty.jsonl", "mixed.jsonl", "qa.parquet", "saved", "saved/test")
    results = run_clis([(*common, "--data", tmp_path / name) for name in inputs], one_thread=True)
    reports = {name: json.loads(r.stdout or "{}") for name, r in zip(inputs, results, strict=True)}
    assert [reports[name].get("rows") for name in inputs] == [1, 3, 2, None, 1]
    assert "skipped 1 (empty field 'user': 1)" in results[1].stderr
    assert "no row has a usable reasoning: read 1 rows, kept 0, skipped 1 (empty field 'reasoning'" in (
        results[0].stderr
    )
    several = results[3]  # the splits side by side: the message names one by the flag eval has
    assert (
        several.returncode == 2 and f'read one with --data "{tmp_path / "saved" / "train"}"' in several.stderr
    )


@pytest.mark.slow
def test_eval_cli_with_int8_weights_scores_the_int8_engine(tmp_path, tiny_config):
    checkpoint = save_model(tmp_path / "ckpt", Transformer(tiny_config))
    result = run_cli(
        "eval", "--checkpoint", str(checkpoint), "--task", "synthetic:chain_sum", "--limit", "2",
        "--max-new-tokens", "8", "--device", "cpu", "--quantize", "int8", "--json", one_thread=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    engine = Engine.from_checkpoint(checkpoint, device="cpu", max_batch_size=32, quantize="int8")
    rows = evaluation.synthetic_test_rows(["chain_sum"], 2)
    expected = evaluation.evaluate_generations(engine, rows, max_new_tokens=8)
    assert {k: report[k] for k in ("overall", "families")} == expected.to_dict()
    loss = evaluation.loss_on_rows(engine.model, engine.tokenizer, rows)
    assert report["loss"] == pytest.approx(loss.loss, rel=1e-4)


EVAL_MISTAKES = [  # (arguments, what the one line says); x.jsonl: rows with reasoning
    (["--task", "synthetic", "--data", "x.jsonl"], "exactly one of --task"),
    (["--task", "synthetic:nope"], "unknown synthetic family"),
    (["--data", "x.jsonl", "--examples", "e.jsonl"], "--examples lists generations"),
    (["--task", "synthetic", "--quantize", "int4"], "unknown quantization 'int4'; use int8"),
    (["--task", "synthetic", "--quantize", "int8", "--compile"], "--compile does not apply to int8"),
    (["--task", "synthetic", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--data", "x.jsonl", "--difficulty", "3"], "--seed and --difficulty choose synthetic problems"),
    (["--task", "synthetic", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--data", "missing.jsonl"], "--data missing.jsonl does not exist; give a .jsonl"),
    (["--task", "synthetic", "--checker", "exact"], "--checker scores the answers of --data rows"),
    (["--data", "x.jsonl", "--checker", "exact"], "--checker scores generated answers: add --generate"),
]


@pytest.mark.slow
def test_eval_cli_errors_are_one_line(tmp_path, tiny_config):
    save_model(tmp_path / "ckpt", Transformer(tiny_config))
    rows = tmp_path / "x.jsonl"  # rows with reasoning: a loss to measure, answers only with --generate
    rows.write_text(json.dumps({"user": "q", "reasoning": "r", "assistant": "a"}) + "\n")
    calls = [
        ("eval", "--checkpoint", str(tmp_path / "ckpt"), *[str(rows) if a == "x.jsonl" else a for a in args])
        for args, _ in EVAL_MISTAKES
    ]
    for result, (args, message) in zip(run_clis(calls, one_thread=True), EVAL_MISTAKES, strict=True):
        assert result.returncode == 2, args
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
