"""The mmkd command: help texts, one-line errors with exit code 2, and eval/export through the command."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from mmkd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("fit", "eval", "export", "data", "demo"):
        assert f"\n  {sub} " in out


def test_fit_help_lists_options(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--run-dir", "--stage", "--restart-from", "--print-config", "--stages.sft.optimizer.lr"):
        assert option in out


def test_fit_help_with_a_recipe_lists_its_keys(capsys):
    assert main(["fit", str(ROOT / "recipes" / "debug.yaml"), "--help"]) == 0
    out = capsys.readouterr().out
    assert "--stages.distill.optimizer.lr" in out and "--stages.sft.objectives" in out


def test_eval_and_export_help(capsys):
    assert main(["eval", "--help"]) == 0
    assert "--max_new_tokens" in capsys.readouterr().out
    assert main(["export", "--help"]) == 0
    assert "--out" in capsys.readouterr().out


def test_print_config_resolves_shared_values(capsys):
    assert main(["fit", str(ROOT / "recipes" / "debug.yaml"), "--data_root", "/x", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["stages"]["sft"]["data"]["init_args"]["root"] == "/x/sqa"
    assert printed["teacher"]["init_args"]["path"] == "/x/models/teacher"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit"], "fit: expected a recipe file"),
        (["fit", "missing.yaml"], "missing.yaml: recipe file not found"),
        (["fit", "recipes/debug.yaml", "--stages.sft.optimizer.lr", "fast"],
         "stages.sft.optimizer.lr: expected a float, got 'fast'"),
        (["fit", "recipes/debug.yaml", "--stage", "nope"], "--stage: no stage 'nope' in the recipe"),
        (["nonsense"], "unknown subcommand 'nonsense'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    code = main([*args, "--run-dir", str(run)] if args[0] == "fit" and len(args) > 1 else args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mmkd: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not run.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--stages.sft.objective_args", '{"lm": {"smoothing": 0.1}}'],
         "stages.sft.objective_args.lm.smoothing: unknown argument"),
        (["--stages.distill.objective_args", '{"kl": {"temperature": "hot"}}'],
         "stages.distill.objective_args.kl.temperature: expected a float, got 'hot'"),
        (["--trainer.strategy", "dpp"], "trainer.strategy: unknown strategy 'dpp'"),
        (["--stages.sft.trainer.precision", "bf17"], "stages.sft.trainer.precision: expected one of"),
        (["--stages.sft.task_args", '{"on_overflow": 1}'], "stages.sft.task_args.on_overflow: expected one of"),
        (["--stages.sft.task", "distil"], "stages.sft.task: unknown task 'distil'"),
    ],
)
def test_bad_names_and_arguments_of_any_stage_end_before_it_runs(override, message, tiny_assets, tmp_path, capsys):
    """Checked when the recipe loads: the first stage never starts, nothing is written."""
    run = tmp_path / "run"
    code = main(["fit", str(ROOT / "recipes" / "debug.yaml"), "--run-dir", str(run), "--data_root",
                 tiny_assets["root"], *override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmkd: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not run.exists()


def test_missing_data_and_models_fail_before_any_stage(tiny_assets, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = str(ROOT / "recipes" / "debug.yaml")
    # a data file that does not exist
    code = main(["fit", recipe, "--run-dir", str(run), "--data_root", tiny_assets["root"],
                 "--stages.sft.data.init_args.root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmkd: error: stages.sft.data: ") and err.count("\n") == 1, err
    assert not run.exists()
    # a teacher folder without weights
    empty = tmp_path / "teacher"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    code = main(["fit", recipe, "--run-dir", str(run), "--data_root", tiny_assets["root"],
                 "--teacher.init_args.path", str(empty)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmkd: error: teacher: ") and "weights" in err and err.count("\n") == 1
    assert not run.exists()


def test_stage_flag_needs_earlier_stages(tiny_assets, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["fit", str(ROOT / "recipes" / "debug.yaml"), "--run-dir", str(run), "--data_root",
                 tiny_assets["root"], "--stage", "sft"])
    assert code == 2
    assert "--stage sft: earlier stage 'distill' is pending, not done" in capsys.readouterr().err
    assert not run.exists()


def test_fit_eval_export_through_the_command(tiny_assets, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "student"
    common = ["--run-dir", str(run), "--data_root", tiny_assets["root"], "--trainer.max_steps", "2",
              "--trainer.enable_progress_bar", "false"]
    assert main(["fit", str(ROOT / "recipes" / "debug.yaml"), *common]) == 0
    assert "mmkd fit" in capsys.readouterr().out  # the summary table
    assert main(["eval", str(run), "--data", f"sqa:{tiny_assets['sqa']}", "--split", "test", "--limit", "8",
                 "--mode", "likelihood", "--batch-size", "4"]) == 0
    metrics = json.loads((run / "eval" / "sft" / "test-likelihood" / "metrics.json").read_text())
    assert metrics["count"] == 8 and metrics["mode"] == "likelihood"
    lines = (run / "eval" / "sft" / "test-likelihood" / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"question_id", "prompt", "text"} <= set(json.loads(lines[0]))
    assert main(["export", str(run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "test-likelihood" in card or "accuracy" in card.lower()
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


def test_stage_evaluation_lands_in_manifest_and_eval_folder(tiny_assets, tmp_path):
    run = tmp_path / "run"
    code = main(["fit", str(ROOT / "recipes" / "debug.yaml"), "--run-dir", str(run), "--data_root",
                 tiny_assets["root"], "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
                 "--stages.sft.sqa_eval", json.dumps({"root": tiny_assets["sqa"], "split": "test", "limit": 10})])
    assert code == 0
    metrics = json.loads((run / "eval" / "sft" / "test-likelihood" / "metrics.json").read_text())
    assert metrics["count"] == 10 and metrics["mode"] == "likelihood"
    stage_metrics = json.loads((run / "manifest.json").read_text())["stages"]["sft"]["metrics"]
    assert stage_metrics["sqa/accuracy"] == pytest.approx(metrics["accuracy"])


def test_export_an_unfinished_stage_from_its_checkpoint(tiny_assets, tmp_path):
    import subprocess
    import sys

    from mmkd.train.checkpoints import load_student_state

    run, out = tmp_path / "run", tmp_path / "student"
    env = {**__import__("os").environ, "MMKD_FAULT": "raise:sft:2"}
    proc = subprocess.run([sys.executable, "-m", "mmkd", "fit", str(ROOT / "recipes" / "debug.yaml"), "--run-dir",
                           str(run), "--data_root", tiny_assets["root"], "--trainer.max_steps", "2",
                           "--trainer.checkpoint_every_n_steps", "1", "--trainer.enable_progress_bar", "false"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    entry = json.loads((run / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "failed" and entry["checkpoint"].endswith("step-00000001.ckpt")
    assert main(["export", str(run), "--stage", "sft", "--out", str(out)]) == 0
    from mmkd.models import MLLMStudent

    exported = MLLMStudent.from_pretrained(out).state_dict()
    trained = load_student_state(run / entry["checkpoint"])
    assert trained.keys() <= exported.keys()
    assert all(torch.equal(exported[k], v) for k, v in trained.items())


def _fit_output(tiny_assets, run, *extra):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MMKD_VERBOSE", "DS_ACCELERATOR",
                                                            "HF_HUB_DISABLE_PROGRESS_BARS", "MMKD_FAULT")}
    proc = subprocess.run([sys.executable, "-m", "mmkd", "fit", str(ROOT / "recipes" / "debug.yaml"), "--run-dir",
                           str(run), "--data_root", tiny_assets["root"], "--trainer.max_steps", "2", *extra],
                          env={**env, "COLUMNS": "100"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_the_console_shows_mmkd_lines_only_unless_verbose(tiny_assets, tmp_path):
    run = tmp_path / "run"
    out, err = _fit_output(tiny_assets, run)
    # No third-party line at all: warnings, Lightning's info lines, transformers' progress bars, DeepSpeed's notice.
    assert err.strip() == "", err[-3000:]
    for noise in ("Warning", "deprecated", "GPU available", "Tip:", "weights_only", "Loading weights",
                  "Writing model shards", "accelerator", "Epoch"):
        assert noise not in out, noise
    lines = out.splitlines()
    for stage in ("distill", "sft"):
        starts = [line for line in lines if line.startswith(f"stage {stage}:") and "samples" in line]
        assert len(starts) == 1 and "samples, 2 optimizer steps" in starts[0], starts  # one size line per stage
        bar = [line for line in lines if line.startswith(f"stage {stage} ") and "2/2" in line]
        assert bar and "loss" in bar[-1], lines  # the bar counts optimizer steps under the stage's name
    # the summary table wraps the student paths instead of cutting them
    assert "…" not in out
    table = "".join(line.split("│")[-2].strip() for line in lines if line.count("│") >= 7)
    assert str(run / "stages" / "distill" / "student") in table and str(run / "stages" / "sft" / "student") in table
    _, verbose_err = _fit_output(tiny_assets, tmp_path / "verbose", "--verbose")
    assert "GPU available" in verbose_err


def test_report_command_writes_the_page_of_runs_side_by_side(tiny_assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", str(ROOT / "recipes" / "debug.yaml"), "--run-dir", str(run), "--data_root",
                 tiny_assets["root"], "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]) == 0
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "distill" in page and "sft" in page and "data:image/png;base64," in page
    assert main(["report", str(run), "--compare", str(run), "--names", "a", "b", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "index.html").is_file()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
