"""On-policy distillation (the ``gkd`` task) on two CPU processes: DDP and ZeRO-3 give what one process gives, with
ranks whose sampled answers have different lengths (ZeRO-3's partitioned generation must not hang on them), and a
killed run resumes bit-exact.

The student is first trained for 4 teacher-forced steps (recipes/debug.yaml's ``distill`` stage, one process), so
that its samples at temperature 1 end at different lengths; the recipe's ``sft`` stage then runs as a purely
on-policy GKD stage (lam = 1, JSD) with a micro-batch of 1: the sampling seed of a micro-batch depends only on the
seed, the step and its prompt, so one process and two sample the same answers for the same samples.
"""

import csv
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from dist_helpers import RECIPE, ROOT, manifest, run_env, student

GKD_STEPS = 3
TASK_ARGS = '{"lam": 1.0, "max_new_tokens": 6, "do_sample": true, "temperature": 1.0, "top_k": 20, "seed": 3}'


def _mmkd(run, assets, *extra, zero_config=None, fault=None):
    cmd = [sys.executable, "-m", "mmkd", "fit", str(RECIPE), "--run-dir", str(run), "--data_root", assets["root"],
           "--trainer.enable_progress_bar", "false", "--stages.distill.trainer", '{"max_steps": 4}', *extra]
    return subprocess.run(cmd, env=run_env(zero_config, fault), capture_output=True, text=True, timeout=900,
                          cwd=ROOT)


def _gkd(run, assets, devices=1, strategy="auto", zero_config=None, fault=None):
    return _mmkd(run, assets, "--stage", "sft", "--stages.sft.task", "gkd", "--stages.sft.task_args", TASK_ARGS,
                 "--stages.sft.objectives", '{"jsd": 1.0}', "--stages.sft.micro_batch_size", "1",
                 "--stages.sft.trainer", f'{{"max_steps": {GKD_STEPS}}}', "--trainer.devices", str(devices),
                 "--trainer.strategy", strategy, zero_config=zero_config, fault=fault)


def _logged(run) -> list[dict[str, float]]:
    with open(run / "stages" / "sft" / "logs" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def warm_run(tiny_assets, tmp_path_factory):
    """A run whose ``distill`` stage is done (4 teacher-forced steps, one process)."""
    run = tmp_path_factory.mktemp("gkd-warm") / "run"
    proc = _mmkd(run, tiny_assets, "--stage", "distill")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def _copy(warm_run, tmp_path_factory, name):
    run = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(warm_run, run)
    return run


@pytest.fixture(scope="module")
def one_process(warm_run, tiny_assets, tmp_path_factory):
    run = _copy(warm_run, tmp_path_factory, "gkd-1")
    proc = _gkd(run, tiny_assets)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def test_one_process_generates_answers_of_different_lengths(one_process):
    steps = [r for r in _logged(one_process) if "train/gen_length" in r]
    assert len(steps) == GKD_STEPS and all(r["train/on_policy"] == 1.0 for r in steps)
    # some answers end before the limit and some reach it, in the same step: the ranks of a two-process run see
    # micro-batches of different lengths
    assert any(0.0 < r["train/gen_hit_limit"] < 1.0 for r in steps), steps
    assert all(1.0 <= r["train/gen_length"] <= 6.0 for r in steps)
    assert all(r["train/jsd_on_policy"] == pytest.approx(r["train/jsd"]) for r in steps)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_3"])
def test_two_processes_match_one(strategy, one_process, warm_run, tiny_assets, tmp_path_factory, zero_config):
    run = _copy(warm_run, tmp_path_factory, f"gkd-2-{strategy}")
    proc = _gkd(run, tiny_assets, 2, strategy, zero_config=zero_config if "deepspeed" in strategy else None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert manifest(run)["stages"]["sft"]["global_step"] == GKD_STEPS
    ours, ref = student(run, "sft"), student(one_process, "sft")
    start = student(warm_run)
    assert ours.keys() == ref.keys()
    moved = max(float((ref[k].float() - start[k].float()).abs().max()) for k in ref if k in start)
    assert moved > 1e-3  # the on-policy steps trained the student
    # The same sampled answers, the same objective: equal up to float summation order (a different answer for any
    # sample would show at the size of an update, ~1e-3).
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 2e-5, worst
    # The logged step means are over the global batch (under DeepSpeed too, whose engine accumulates: the hooks
    # run after every micro-batch there), and the same lengths were generated.
    logged, ref_logged = _logged(run), _logged(one_process)
    assert len(logged) == len(ref_logged) == GKD_STEPS
    for a, b in zip(logged, ref_logged):
        for key in ("train/gen_length", "train/gen_hit_limit", "train/on_policy"):
            assert a[key] == b[key], key
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)


def test_a_killed_on_policy_stage_resumes_bit_exact(one_process, warm_run, tiny_assets, tmp_path_factory):
    run = _copy(warm_run, tmp_path_factory, "gkd-kill")
    killed = _gkd(run, tiny_assets, fault=f"kill:sft:{GKD_STEPS}")
    assert killed.returncode == -signal.SIGKILL
    assert manifest(run)["stages"]["sft"]["status"] == "running"
    resumed = _gkd(run, tiny_assets)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage sft: resuming from" in resumed.stdout
    ours, ref = student(run, "sft"), student(one_process, "sft")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
