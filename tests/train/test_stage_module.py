"""StageModule (with the distillation task): frozen teacher, trainable parts, optimizer groups, schedule, checkpoints
without the teacher, global-batch means, the stand-in batch."""

import copy
import math
import random

import lightning as L
import numpy as np
import pytest
import torch

from mmkd.objectives import ForwardKLObjective
from mmkd.tasks import DistillTask
from mmkd.train.optim import build_optimizer, warmup_schedule
from mmkd.train.recipe import OptimizerConfig
from mmkd.train.stage_module import StageModule, rng_state, set_rng_state


def _loader(batch, n):
    return torch.utils.data.DataLoader([batch] * n, batch_size=None)


def test_teacher_frozen_through_training_and_validation(models, sqa_batch, tmp_path, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = make_module(student, teacher, {"lm": 1.0, "kl": 1.0, "mdist": 0.5},
                         train_parts=["projector", "language_model"], total_steps=3)
    assert not any(name.startswith("teacher") for name, _ in module.named_parameters())
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                        limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, _loader(sqa_batch, 3), _loader(sqa_batch, 1))
    assert trainer.global_step == 3
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # student: the trained parts moved, the frozen vision tower did not
    parts = student.parts()
    assert all(p.requires_grad for p in parts["projector"]) and not any(p.requires_grad for p in parts["vision_tower"])
    assert "val/loss" in trainer.callback_metrics and "train/kl" in trainer.callback_metrics
    # the checkpoint holds the student and the objectives' state, never a teacher tensor
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    keys = set(state["state_dict"])
    assert not any("teacher" in k for k in keys)
    assert {f"student.{k}" for k in student.state_dict()} <= keys
    assert "mmkd_rng" in state


def test_trainable_parts_and_parameter_groups(models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    module = make_module(student, teacher, {"lm": 1.0}, train_parts=["projector"],
                         optimizer={"name": "adamw", "lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.99),
                                    "eps": 1e-8, "part_lr": {"projector": 1e-3}})
    groups = module.configure_optimizers()["optimizer"].param_groups
    names = {g["name"]: g for g in groups}
    assert set(names) == {"projector", "projector.no_decay"}
    assert names["projector"]["lr"] == 1e-3 and names["projector"]["weight_decay"] == 0.1
    assert names["projector.no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in names["projector.no_decay"]["params"])  # biases
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in student.parts()["projector"]}
    with pytest.raises(ValueError, match="no part 'experts'"):
        make_module(copy.deepcopy(student), None, {"lm": 1.0}, train_parts=["experts"])
    with pytest.raises(ValueError, match="needs a teacher"):
        StageModule(copy.deepcopy(student), None, DistillTask({"kl": ForwardKLObjective()}), {"kl": 1.0}, ["projector"])


def test_build_optimizer_excludes_norms_from_decay():
    layer, norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    groups = {"language_model": [("layer.weight", layer.weight), ("layer.bias", layer.bias),
                                 ("norm.weight", norm.weight)]}
    opt = build_optimizer(groups, OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5, betas=(0.9, 0.9), eps=1e-8))
    decay, no_decay = opt.param_groups
    assert decay["params"] == [layer.weight] and decay["weight_decay"] == 0.5
    assert no_decay["params"] == [layer.bias, norm.weight] and no_decay["weight_decay"] == 0.0


def test_warmup_cosine_schedule_values():
    f = warmup_schedule(total_steps=10, warmup_steps=2, name="cosine", min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1)
    lin = warmup_schedule(10, 0, "linear", 0.0)
    assert lin(5) == pytest.approx(0.5)
    assert warmup_schedule(10, 0, "constant", 0.0)(7) == 1.0


def test_rng_state_round_trip_through_tensors():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = rng_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # loadable with weights_only=True
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_feature_projector_is_trained_and_checkpointed(models, sqa_batch, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    module = make_module(student, teacher, {"feature": 1.0}, train_parts=["language_model"])
    projector = [p for n, p in module.objectives.named_parameters()]
    assert projector and all(p.requires_grad for p in projector)  # teacher width 128 -> student width 64
    groups = module.configure_optimizers()["optimizer"].param_groups
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in projector)
    assert any(k.startswith("objectives.feature") for k in module.state_dict())
    loss = module.compute_losses(sqa_batch)["feature"]
    loss.backward()
    assert all(p.grad is not None for p in projector)


def test_logged_terms_and_taid_use_the_mean_over_the_global_batch(models, tiny_assets, tmp_path, make_module):
    """With 2 accumulated micro-batches, train/* and TAID's update see both micro-batches, not the last one."""
    from mmkd.data import MultimodalCollator, ScienceQA

    teacher, student = (copy.deepcopy(m) for m in models)
    data = ScienceQA(tiny_assets["sqa"], "train")
    collate = MultimodalCollator.for_models(student, teacher, max_length=160)
    batches = [collate([data[i] for i in range(0, 3)]), collate([data[i] for i in range(3, 7)])]
    module = make_module(student, teacher, {"lm": 1.0, "taid": 1.0}, train_parts=["projector"], total_steps=1,
                         optimizer={"name": "adamw", "lr": 0.0, "weight_decay": 0.0, "betas": (0.9, 0.999),
                                    "eps": 1e-8})
    with torch.no_grad():
        per_batch = [module.compute_losses(b) for b in batches]
    expected = {k: (float(per_batch[0][k]) + float(per_batch[1][k])) / 2 for k in per_batch[0]}
    assert abs(float(per_batch[0]["loss"]) - float(per_batch[1]["loss"])) > 1e-3  # the two differ
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                        default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    for k in ("lm", "taid", "loss"):
        assert float(trainer.callback_metrics[f"train/{k}"]) == pytest.approx(expected[k], rel=1e-5)
    assert float(module.objectives["taid"].loss.prev_loss) == pytest.approx(expected["taid"], rel=1e-5)


def test_a_stand_in_batch_runs_the_modules_and_contributes_nothing(models, tiny_assets, tmp_path, make_module):
    """The collator's stand-in (every sample dropped) gives a zero loss: the step equals skipping the batch."""
    from mmkd.data import MultimodalCollator, ScienceQA

    teacher, _ = models
    data = ScienceQA(tiny_assets["sqa"], "train")
    collate = MultimodalCollator.for_models(models[1], teacher, max_length=160)
    normal = collate([data[i] for i in range(4)])
    long = {"id": "long", "images": [], "messages": [{"role": "user", "content": "count " * 400},
                                                     {"role": "assistant", "content": "B"}]}
    standin = collate([long])
    assert standin.standin and standin.data_stats["samples"] == 0

    def fit(batches, accumulate):
        student = copy.deepcopy(models[1])
        module = make_module(student, copy.deepcopy(teacher), {"lm": 1.0, "kl": 1.0}, train_parts=["projector"],
                             total_steps=1, optimizer={"name": "sgd", "lr": 0.5, "weight_decay": 0.0,
                                                       "betas": (0.9, 0.999), "eps": 1e-8})
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                            default_root_dir=tmp_path)
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
        return student, float(trainer.callback_metrics["train/loss"]), module.data_stats

    with_standin, loss, stats = fit([normal, standin], 2)
    alone, loss_alone, _ = fit([normal], 1)
    assert loss == pytest.approx(loss_alone, rel=1e-6)  # the stand-in is not part of the step's mean
    assert stats["samples"] == normal.data_stats["samples"]
    # Lightning divides each micro-batch by 2: the update is half of the batch alone, as skipping would give
    initial = models[1].parts()["projector"]
    moved = [(p1 - p0).detach() for p1, p0 in zip(with_standin.parts()["projector"], initial)]
    moved_alone = [(p1 - p0).detach() for p1, p0 in zip(alone.parts()["projector"], initial)]
    assert max(float(m.abs().max()) for m in moved_alone) > 1e-4
    for m, m_alone in zip(moved, moved_alone):
        torch.testing.assert_close(m, m_alone / 2, rtol=1e-4, atol=1e-7)


def test_a_short_last_step_of_an_epoch_gets_its_own_mean_and_taid_update(models, tiny_assets, tmp_path,
                                                                          make_module):
    """3 micro-batches with accumulation 2: Lightning steps after 2, then after the epoch's last 1 alone."""
    from mmkd.data import MultimodalCollator, ScienceQA

    teacher, student = (copy.deepcopy(m) for m in models)
    data = ScienceQA(tiny_assets["sqa"], "train")
    collate = MultimodalCollator.for_models(student, teacher, max_length=160)
    batches = [collate([data[i] for i in range(3 * j, 3 * j + 3)]) for j in range(3)]
    module = make_module(student, teacher, {"lm": 1.0, "taid": 1.0}, train_parts=["projector"], total_steps=2,
                         optimizer={"name": "adamw", "lr": 0.0, "weight_decay": 0.0, "betas": (0.9, 0.999),
                                    "eps": 1e-8})
    with torch.no_grad():
        last = module.compute_losses(batches[2])
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                        log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    taid = module.objectives["taid"].loss
    assert int(taid.num_steps) == 2  # one update per optimizer step, the short one included
    assert float(taid.prev_loss) == pytest.approx(float(last["taid"]), rel=1e-5)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(last["loss"]), rel=1e-5)


def test_taid_update_on_ce_steps_with_the_global_mean_of_the_cross_entropy(models, tiny_assets, tmp_path,
                                                                           make_module):
    """update_on='ce' (TAID's released code): t moves on the cross-entropy to the interpolated target, averaged over
    the optimizer step's micro-batches, checked against a full-logits computation."""
    import torch.nn.functional as F

    from mmkd.data import MultimodalCollator, ScienceQA
    from mmkd.objectives import answer_positions

    teacher, student = (copy.deepcopy(m) for m in models)
    data = ScienceQA(tiny_assets["sqa"], "train")
    collate = MultimodalCollator.for_models(student, teacher, max_length=160)
    batches = [collate([data[i] for i in range(0, 3)]), collate([data[i] for i in range(3, 7)])]
    module = make_module(student, teacher, {"taid": 1.0}, {"taid": {"update_on": "ce"}}, train_parts=["projector"],
                         total_steps=1, optimizer={"name": "sgd", "lr": 0.0})
    ce = []
    with torch.no_grad():
        for b in batches:  # the cross-entropy -sum p_t log p_S over answer tokens, p_t at t = t_start = 0.4
            s, t = student(**b.inputs.kwargs()), teacher(**b.teacher_side()[0].kwargs())
            zs = s.logits(s.last_hidden[answer_positions(b.labels)]).float()
            zt = t.logits(t.last_hidden[answer_positions(b.teacher_side()[1])]).float()
            target = F.softmax(0.6 * zs + 0.4 * zt, -1)
            ce.append(float(-(target * F.log_softmax(zs, -1)).sum(-1).mean()))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                        default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    taid = module.objectives["taid"].loss
    assert float(taid.prev_loss) == pytest.approx(sum(ce) / 2, rel=1e-5)
    assert float(trainer.callback_metrics["train/taid_update"]) == pytest.approx(sum(ce) / 2, rel=1e-5)
    assert float(trainer.callback_metrics["train/taid"]) < sum(ce) / 2  # the KL itself: CE minus the entropy
