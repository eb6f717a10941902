"""Strategy presets, and DDP / ZeRO-2 / ZeRO-3 runs with two CPU processes against the single-process run."""

import json
from types import SimpleNamespace

import pytest
import torch
from dist_helpers import STEPS, manifest, student
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn

from mmkd.train.strategies import (
    CONFIG_ENV,
    MMKDDeepSpeedStrategy,
    build_strategy,
    is_zero3,
    load_without_frozen,
)


def _spec(train: list[str], batch_size: int = 8, devices: int = 2):
    """A resolved stage with these trainable parts and batch, on ``devices`` processes."""
    from mmkd.train.recipe.validate import resolve_stages

    stage = {"data": {"class_path": "x.Data", "init_args": {}}, "val_data": None, "task": "distill", "task_args": {},
             "train": train, "objectives": {"lm": 1.0}, "objective_args": {},
             "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                           "part_lr": {}, "args": {}},
             "schedule": {"name": "cosine", "warmup_ratio": 0.0, "warmup_steps": None, "min_lr_ratio": 0.0,
                          "args": {}},
             "batch_size": batch_size, "micro_batch_size": None, "max_length": 8, "trainer": {}, "init_from": None,
             "student_transform": None, "sqa_eval": None}
    return resolve_stages({"seed": 0, "trainer": {"devices": devices}, "stages": {"s": stage}}, ["s"])["s"]


def test_presets_map_onto_lightning_strategies():
    spec = _spec(["projector", "language_model"])
    ddp = build_strategy("ddp", spec=spec)
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is True
    dense = build_strategy("ddp", spec=_spec(["language_model"]), student=nn.Linear(2, 2))
    assert dense._ddp_kwargs["find_unused_parameters"] is False  # every batch uses a dense LM
    for name, stage, offload in (("deepspeed_stage_2", 2, False), ("deepspeed_stage_3", 3, False),
                                 ("deepspeed_stage_3_offload", 3, True)):
        ds = build_strategy(name, accelerator="cpu", spec=spec)
        assert isinstance(ds, MMKDDeepSpeedStrategy)
        zero = ds.config["zero_optimization"]
        assert zero["stage"] == stage
        assert ("offload_optimizer" in zero) is offload and ("offload_param" in zero) is offload
        assert ds.config["train_micro_batch_size_per_gpu"] == 4  # global 8 over 2 devices
        assert ds.exclude_frozen_parameters is True
        assert is_zero3(ds) is (stage == 3)
        assert ds.config.get("zero_force_ds_cpu_optimizer", True) is not offload  # torch AdamW accepted with offload
    fsdp = build_strategy("fsdp", spec=spec)
    assert isinstance(fsdp, FSDPStrategy) and fsdp.kwargs["use_orig_params"] is True
    assert build_strategy("ddp_spawn") == "ddp_spawn"  # other Lightning names pass through


def test_deepspeed_strategy_accepts_the_cpu_accelerator():
    from lightning.pytorch.accelerators import CPUAccelerator

    ds = MMKDDeepSpeedStrategy(stage=3, accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")] * 2)
    assert ds.root_device == torch.device("cpu", 0)  # DeepSpeed reads the device index from it


def test_deepspeed_config_file_merges_over_the_preset(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    zero = build_strategy("deepspeed_stage_3").config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    path.write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_ENV):
        build_strategy("deepspeed_stage_3")


def test_load_without_frozen_accepts_only_missing_frozen_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    trained = {k: v for k, v in nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).state_dict().items()
               if k.startswith("1.")}
    load_without_frozen(model, trained)
    assert torch.equal(model[1].weight, trained["1.weight"])
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match="missing"):
        load_without_frozen(model, trained, source="ckpt")
    with pytest.raises(ValueError, match="unexpected"):
        load_without_frozen(model, {**model.state_dict(), "2.weight": torch.zeros(1)})


# ---- two processes against one --------------------------------------------------------------------------------


def _data_is_sharded_by_rank() -> bool:
    """Whether the data module gives each rank its own shard (else every rank trains on the same samples)."""
    from mmkd.data.datamodule import MMKDDataModule

    dm = MMKDDataModule(list(range(8)), list, batch_size=1)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    sampler = dm.train_dataloader().sampler
    return (sampler.num_replicas, sampler.rank) == (2, 1)


def _lm_loss(folder_or_model, tiny_assets, n: int = 12) -> float:
    """The student's LM loss on the first ``n`` caption pairs (fixed data, no training)."""
    from mmkd.data import CaptionPairs, MultimodalCollator
    from mmkd.models import MLLMStudent
    from mmkd.objectives import LanguageModeling

    model = folder_or_model if isinstance(folder_or_model, nn.Module) else MLLMStudent.from_pretrained(folder_or_model)
    data = CaptionPairs(f"{tiny_assets['root']}/sqa/captions.json", f"{tiny_assets['root']}/sqa/images")
    batch = MultimodalCollator.for_models(model, None, max_length=160)([data[i] for i in range(n)])
    model.eval()
    with torch.no_grad():
        out = model(**batch.inputs.kwargs())
        return float(LanguageModeling()(out, None, batch))


@pytest.fixture(scope="module")
def initial_loss(single_run, tiny_assets) -> float:
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import Runner

    recipe = load_recipe(single_run / "recipe.yaml", ["--run_dir", str(single_run)])
    return _lm_loss(Runner(recipe).build_student("distill"), tiny_assets)


@pytest.mark.parametrize("name", ["ddp_run", pytest.param("zero2_run", marks=pytest.mark.slow), "zero3_run"])
def test_two_processes_match_one(name, request, single_run, initial_loss, tiny_assets):
    run = request.getfixturevalue(name)
    entry = manifest(run)["stages"]["distill"]
    assert entry["global_step"] == STEPS
    # the student folder is whole (ZeRO-3 keeps only partitions in the module: it is consolidated on save)
    ours, ref = student(run), student(single_run)
    assert ours.keys() == ref.keys() and all(ours[k].shape == ref[k].shape and ours[k].numel() for k in ref)
    final = _lm_loss(str(run / "stages" / "distill" / "student"), tiny_assets)
    assert final < initial_loss - 0.3, (initial_loss, final)  # the loss went down
    assert _data_is_sharded_by_rank()  # each rank trains on its own shard, as the single process sees them all
    # Same samples, same objective: equal up to float summation order (measured with ranks sharded: <= 5e-7; Adam
    # moves a weight by up to 3e-3 in 3 steps, and a difference in loss scaling or data would show at that size).
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 2e-5, f"{name}: max |w - w_single| = {worst}"


@pytest.mark.slow  # the three against one process: each of them is tested against it (ZeRO-2 in the slow job too)
def test_ddp_and_zero_agree(ddp_run, zero2_run, zero3_run):
    """The three strategies compute the same thing on the same shards: equal up to float summation order."""
    ref = student(ddp_run)
    for run in (zero2_run, zero3_run):
        other = student(run)
        worst = max(float((other[k].float() - ref[k].float()).abs().max()) for k in ref)
        assert worst < 2e-5, (run, worst)
