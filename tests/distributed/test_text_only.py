"""Micro-batches without any image on one rank while the other rank has one, under DDP, ZeRO-2 and ZeRO-3.

The data is two conversations, one with an image and one text-only, with a global batch of 2 and a micro-batch
of 1: with two processes every step gives one rank the image sample and the other the text-only one, whatever
the shuffle. Under ZeRO-3 (every parameter partitioned) this used to hang: the text-only rank called the vision
modules in another order than the image rank, so their parameter gathers paired up wrongly. The last case uses a
tiny LLaVA-OneVision teacher (any-resolution, the paper recipes' family), partitioned too, with MDist and RDist; and
one a tiny Qwen2.5-VL teacher and student (dynamic visual-token counts, ``image_grid_thw``), both partitioned.
"""

import json
import subprocess

import pytest
from dist_helpers import STEPS, fit, manifest, student


def _two_samples(tiny_assets, folder, second: dict) -> str:
    """A LLaVA conversation file of the first caption pair (with its image) and ``second``, as a recipe data value."""
    root = tiny_assets["root"]
    with open(f"{root}/sqa/captions.json") as f:
        with_image = json.load(f)[0]
    path = folder / "data.json"
    path.write_text(json.dumps([with_image, second]))
    return json.dumps({"class_path": "mmkd.data.LlavaConversations",
                       "init_args": {"json_path": str(path), "image_folder": f"{root}/sqa/images"}})


@pytest.fixture(scope="module")
def mixed_data(tiny_assets, tmp_path_factory) -> str:
    text_only = {"id": "text-only", "conversations": [
        {"from": "human", "value": "Which is a primary colour: green or red?"}, {"from": "gpt", "value": "red"}]}
    return _two_samples(tiny_assets, tmp_path_factory.mktemp("mixed"), text_only)


@pytest.fixture(scope="module")
def onevision(tiny_assets, tmp_path_factory) -> list[str]:
    """Overrides for a tiny LLaVA-OneVision teacher (any-resolution, the paper recipes' family) with MDist/RDist."""
    from mmkd.models.presets import build_tiny

    out = build_tiny("onevision-teacher", str(tmp_path_factory.mktemp("ov") / "t"), tokenizer=tiny_assets["tokenizer"])
    teacher = {"class_path": "mmkd.models.LlavaModel", "init_args": {"path": str(out)}}
    objectives = {"lm": 1.0, "kl": 1.0, "mdist": 1.0, "rdist": 1.0}
    return ["--teacher", json.dumps(teacher), "--stages.distill.objectives", json.dumps(objectives)]


@pytest.fixture(scope="module")
def qwen(tiny_assets, tmp_path_factory) -> list[str]:
    """Overrides for a tiny Qwen2.5-VL teacher and student (dynamic counts, image_grid_thw) with MDist/RDist."""
    from mmkd.models.presets import build_tiny

    root = tmp_path_factory.mktemp("qwen")
    models = {kind: {"class_path": "mmkd.models.LlavaModel", "init_args": {"path": str(build_tiny(
        f"qwen-vl-{kind}", str(root / kind), tokenizer=tiny_assets["tokenizer"], seed=i))}}
        for i, kind in enumerate(("teacher", "student"))}
    objectives = {"lm": 1.0, "kl": 1.0, "mdist": 1.0, "rdist": 1.0}
    return ["--teacher", json.dumps(models["teacher"]), "--student", json.dumps(models["student"]),
            "--stages.distill.objectives", json.dumps(objectives)]


def _run(tmp_path_factory, name, tiny_assets, mixed_data, devices, strategy, zero_config=None, extra=()):
    run = tmp_path_factory.mktemp(name) / "run"
    try:
        proc = fit(run, tiny_assets, devices, strategy, "--stages.distill.batch_size", "2", *extra, data=mixed_data,
                   zero_config=zero_config, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{strategy} with a text-only rank did not finish in 300 s (hang)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert manifest(run)["stages"]["distill"]["global_step"] == STEPS
    return run


@pytest.fixture(scope="module")
def mixed_single(tmp_path_factory, tiny_assets, mixed_data):
    return _run(tmp_path_factory, "mixed-single", tiny_assets, mixed_data, 1, "auto")


# ZeRO-3 (the strictest: every module of every rank in the same order) runs by default; the other strategies and
# families are the slow job's (CI runs them all).
SLOW = pytest.mark.slow


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=SLOW), pytest.param("deepspeed_stage_2", marks=SLOW),
                                      "deepspeed_stage_3", pytest.param("deepspeed_stage_3+onevision", marks=SLOW),
                                      pytest.param("deepspeed_stage_3+qwen", marks=SLOW)])
def test_a_text_only_rank_runs_and_matches_one_process(strategy, mixed_single, tmp_path_factory, tiny_assets,
                                                       mixed_data, zero_config, onevision, qwen):
    strategy, _, teacher = strategy.partition("+")
    config = None if strategy == "ddp" else zero_config
    extra = {"": (), "onevision": onevision, "qwen": qwen}[teacher]
    run = _run(tmp_path_factory, f"mixed-{strategy}{teacher}", tiny_assets, mixed_data, 2, strategy, config, extra)
    if teacher:  # the single-process reference with the same models and objectives
        mixed_single = _run(tmp_path_factory, f"mixed-single-{teacher}", tiny_assets, mixed_data, 1, "auto", None,
                            extra)
    ours, ref = student(run), student(mixed_single)
    assert ours.keys() == ref.keys()
    # The same two samples per step, one per rank against both accumulated in one process.
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 2e-5, f"{strategy}: max |w - w_single| = {worst}"
    # The manifest reports the global batch, not rank 0's half of it: samples over all ranks, and each loss
    # term's mean over the last step's global batch.
    got, want = manifest(run)["stages"]["distill"], manifest(mixed_single)["stages"]["distill"]
    assert got["data"]["samples"] == want["data"]["samples"] == 2 * STEPS
    assert got["data"]["counted_from_step"] == 0
    for key in [k for k in want["metrics"] if k.startswith("train/")]:
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-4), key


@pytest.fixture(scope="module")
def dropped_data(tiny_assets, tmp_path_factory) -> str:
    """One sample with an image and one whose prompt alone is longer than the recipe's max_length (160)."""
    too_long = {"id": "too-long", "conversations": [
        {"from": "human", "value": "count the red circles " * 60}, {"from": "gpt", "value": "3"}]}
    return _two_samples(tiny_assets, tmp_path_factory.mktemp("dropped"), too_long)


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=SLOW), "deepspeed_stage_3"])
def test_a_rank_whose_micro_batch_is_all_dropped_still_steps(strategy, tmp_path_factory, tiny_assets, dropped_data,
                                                             zero_config):
    """Every step, one rank's only sample is too long: its collator gives the stand-in, weighted by 0, so the ranks
    stay in step (skipping the backward on one rank hangs DDP and DeepSpeed) and the result is one process's."""
    config = None if strategy == "ddp" else zero_config
    single = _run(tmp_path_factory, "dropped-single", tiny_assets, dropped_data, 1, "auto")
    run = _run(tmp_path_factory, f"dropped-{strategy}", tiny_assets, dropped_data, 2, strategy, config)
    ours, ref = student(run), student(single)
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 2e-5, f"{strategy}: max |w - w_single| = {worst}"
    got, want = manifest(run)["stages"]["distill"], manifest(single)["stages"]["distill"]
    assert got["data"]["samples"] == want["data"]["samples"] == STEPS  # only the sample with an image counts
    assert got["data"]["skipped_overflow"] == want["data"]["skipped_overflow"] == STEPS
    assert got["metrics"]["train/loss"] == pytest.approx(want["metrics"]["train/loss"], rel=1e-4)
