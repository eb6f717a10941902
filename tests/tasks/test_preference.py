"""The preference task: DPO with the teacher as reference; reference log-probs carry no gradient."""

import copy

import torch

from mmkd.losses import sequence_logprobs
from mmkd.objectives import answer_logprobs


def _preference_batch(tiny_assets, student, teacher):
    from mmkd.data import PreferenceCollator, PreferencePairs

    data = PreferencePairs(f"{tiny_assets['sqa']}/preference.json", f"{tiny_assets['sqa']}/images")
    return PreferenceCollator.for_models(student, teacher, max_length=192)([data[i] for i in range(4)])


def test_answer_logprobs_equals_full_logit_computation(models, sqa_batch):
    _, student = models
    with torch.no_grad():
        out = student(**sqa_batch.inputs.kwargs())
        expected = sequence_logprobs(out.logits(), sqa_batch.labels)
        got = answer_logprobs(out, sqa_batch.labels)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got < 0).all()


def test_reference_is_teacher_and_never_requires_grad(tiny_assets, models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    batch = _preference_batch(tiny_assets, student, teacher)
    module = make_module(student, teacher, {"dpo": 1.0, "lm": 0.1}, {"dpo": {"beta": 0.1}}, task="preference",
                         task_args={"reference": "teacher"}, train_parts=["language_model"])
    assert module.task.reference is None and module.teacher is teacher and module.task.needs_teacher
    reference_out, _ = module.task._reference_pass(teacher, batch.chosen)
    assert not reference_out.last_hidden.requires_grad
    terms = module.compute_losses(batch)
    assert terms["loss"].requires_grad
    # at the start the policy differs from the teacher, so rewards are not zero; the margin is their difference
    assert torch.isclose(terms["dpo_margin"], terms["dpo_chosen_reward"] - terms["dpo_rejected_reward"])
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parts()["language_model"])


def test_initial_student_reference_gives_zero_rewards_at_start(tiny_assets, models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    batch = _preference_batch(tiny_assets, student, None)
    module = make_module(student, None, {"dpo": 1.0}, {"dpo": {"beta": 0.1}}, task="preference",
                         task_args={"reference": "initial_student"}, train_parts=["language_model"])
    reference = module.task.reference
    assert not module.task.needs_teacher and module.frozen_models() == {"reference": reference}
    assert reference is not student and not any(p.requires_grad for p in reference.parameters())
    terms = module.compute_losses(batch)
    # policy == reference: DPO's implicit rewards are 0 and the loss is log 2
    assert abs(float(terms["dpo_chosen_reward"])) < 1e-5 and abs(float(terms["dpo_rejected_reward"])) < 1e-5
    assert torch.isclose(terms["dpo"], torch.log(torch.tensor(2.0)), atol=1e-5)
    assert not any(k.startswith("teacher") or k.startswith("reference") for k in module.state_dict())


def test_a_stand_in_preference_batch_gives_finite_terms(tiny_assets, models, make_module):
    """All pairs of a micro-batch dropped: the stand-in pair runs policy and teacher reference, finite terms."""
    from mmkd.data import PreferenceCollator

    teacher, student = (copy.deepcopy(m) for m in models)
    long = {"id": "long", "images": [], "messages": [{"role": "user", "content": "count " * 400}],
            "chosen": "A", "rejected": "B"}
    batch = PreferenceCollator.for_models(student, teacher, max_length=192)([long])
    assert batch.standin and batch.data_stats["samples"] == 0
    module = make_module(student, teacher, {"dpo": 1.0, "lm": 0.1}, {"dpo": {"beta": 0.1}}, task="preference",
                         train_parts=["language_model"])
    terms = module.compute_losses(batch)
    assert all(torch.isfinite(v) for v in terms.values())
    (terms["loss"] * 0.0).backward()
    grads = [p.grad for p in student.parts()["language_model"] if p.grad is not None]
    assert grads and all(not g.any() for g in grads)


def test_an_moe_students_router_loss_covers_both_answers(tiny_assets, models, make_module):
    """LLaVA-MoD adds the rejected pass's router loss too: the stage's aux term is the mean of both passes'."""
    from mmkd.models import UpcycleToMoE

    teacher, dense = (copy.deepcopy(m) for m in models)
    student = UpcycleToMoE(4, 2, every=1, router_aux_loss_coef=0.02)(dense)
    batch = _preference_batch(tiny_assets, student, teacher)
    module = make_module(student, teacher, {"dpo": 1.0}, {"dpo": {"loss_type": "kto_pair"}}, task="preference",
                         train_parts=["ffn", "router"])
    with torch.no_grad():
        terms = module.compute_losses(batch)
        chosen = student(**batch.chosen.inputs.kwargs()).aux_loss
        rejected = student(**batch.rejected.inputs.kwargs()).aux_loss
    assert float(chosen) != float(rejected)
    torch.testing.assert_close(terms["aux"], (chosen + rejected) / 2)
    torch.testing.assert_close(terms["loss"], terms["dpo"] + terms["aux"])
