"""On-policy distillation (GKD): lam = 0 is teacher-forced distillation, lam = 1 distills on exactly the student's own
tokens, the draws are seeded by the step, and bad settings are one-line recipe errors."""

from __future__ import annotations

import copy

import pytest
import torch

from mmkd.contract import HEAD_GRADIENT


def _batch(tiny_assets, student, teacher, n=4, start=0):
    from mmkd.data import MultimodalCollator, ScienceQA

    data = ScienceQA(tiny_assets["sqa"], "train")
    records = [data[start + i] for i in range(n)]
    return records, MultimodalCollator.for_models(student, teacher, max_length=160, prompts=True)(records)


def _loss_and_grads(module, batch):
    module.student.zero_grad(set_to_none=True)
    terms = module.compute_losses(batch)
    terms["loss"].backward()
    grads = {k: p.grad.clone() for k, p in module.student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in terms.items()}, grads


def test_lam_zero_is_teacher_forced_distillation(tiny_assets, models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    _, batch = _batch(tiny_assets, student, teacher)
    weights = {"lm": 1.0, "jsd": 1.0}
    gkd = make_module(student, teacher, weights, task="gkd", task_args={"lam": 0.0},
                      train_parts=["projector", "language_model"])
    distill = make_module(student, teacher, weights, train_parts=["projector", "language_model"])
    (a, ga), (b, gb) = _loss_and_grads(gkd, batch), _loss_and_grads(distill, batch)
    for name in ("lm", "jsd", "loss"):
        assert a[name] == b[name], name
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert a["_on"] == 0.0
    logged = gkd.task.on_optimizer_step({k: torch.tensor(v) for k, v in a.items()})
    assert logged["on_policy"] == 0.0 and logged["jsd_off_policy"] == pytest.approx(a["jsd"])
    assert "jsd_on_policy" not in logged


def test_lam_one_distills_on_exactly_the_students_greedy_tokens(tiny_assets, models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    records, batch = _batch(tiny_assets, student, teacher, n=3)
    module = make_module(student, teacher, {"jsd": 1.0}, task="gkd",
                         task_args={"lam": 1.0, "do_sample": False, "max_new_tokens": 4},
                         train_parts=["projector", "language_model"])
    student.train()
    with torch.no_grad():
        terms = module.compute_losses(batch)
    assert student.training  # generation ran in eval mode for that call only
    # By hand, one record at a time: the student's greedy tokens from its own forward passes (argmax, up to an end
    # token or 4 tokens), then JSD(0.5) between teacher and student at exactly those positions.
    from mmkd.data import MultimodalCollator
    from mmkd.losses import JSD

    prompts = MultimodalCollator.for_models(student, None, train=False, max_length=160)
    end = set(student.end_token_ids)
    student.eval()
    values, lengths = [], []
    for record in records:
        prompt = prompts([record]).inputs
        ids = prompt.input_ids[0].tolist()
        answer = []
        with torch.no_grad():
            for _ in range(4):
                seq = torch.tensor([ids + answer])
                answer.append(int(student(seq, torch.ones_like(seq), **prompt.images).logits()[0, -1].argmax()))
                if answer[-1] in end:
                    break
            seq = torch.tensor([ids + answer])
            s = student(seq, torch.ones_like(seq), **prompt.images).logits()[0, len(ids) - 1:-1]
            t = teacher(seq, torch.ones_like(seq), **prompt.images).logits()[0, len(ids) - 1:-1]
        values.append(JSD(0.5).per_token(s, t))
        lengths.append(len(answer))
    student.train()
    expected = torch.cat(values).mean()
    assert abs(float(terms["jsd"]) - float(expected)) < 1e-5
    assert float(terms["_on"]) == 1.0
    assert float(terms["_gen_length"]) == sum(lengths) / len(lengths)
    assert float(terms["_gen_hit_limit"]) == sum(n == 4 for n in lengths) / len(lengths)


def test_draws_follow_seed_step_and_micro_batch(tiny_assets, models):
    from mmkd.objectives import build_objective
    from mmkd.tasks import build_task

    teacher, student = models

    def task(seed):
        return build_task("gkd", {"lam": 0.3, "seed": seed}, {"jsd": build_objective("jsd", {})}, student=student)

    a, b, c = task(0), task(0), task(1)
    draws = {}
    for t in (a, b, c):
        out = []
        for step in range(200):
            for micro in range(2):
                t.on_micro_batch(step, micro)
                out.append(t.on_policy())
        draws[id(t)] = out
    assert draws[id(a)] == draws[id(b)] != draws[id(c)]
    assert 0.2 < sum(draws[id(a)]) / 400 < 0.4


def test_an_on_policy_step_updates_the_student_and_logs_the_split(tiny_assets, models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    _, batch = _batch(tiny_assets, student, teacher)
    module = make_module(student, teacher, {"lm": 1.0, "jsd": 1.0}, task="gkd",
                         task_args={"lam": 1.0, "max_new_tokens": 3, "temperature": 0.7, "top_k": 5},
                         train_parts=["projector", "language_model"])
    terms, grads = _loss_and_grads(module, batch)
    assert HEAD_GRADIENT not in terms and grads
    assert 1.0 <= terms["_gen_length"] <= 3.0
    logged = module.task.on_optimizer_step({k: torch.tensor(v) for k, v in terms.items()})
    assert logged["on_policy"] == 1.0 and logged["jsd_on_policy"] == pytest.approx(terms["jsd"])
    assert logged["gen_length"] == terms["_gen_length"] and "jsd_off_policy" not in logged


@pytest.mark.parametrize(("args", "message"), [
    ({"lam": 1.5}, "lam=1.5: expected a probability in [0, 1]"),
    ({"max_new_tokens": 0}, "max_new_tokens=0: expected at least 1"),
    ({"temperature": 0.0}, "temperature=0.0: sampling needs a temperature > 0"),
    ({"do_sample": False, "top_p": 0.9}, "top_p=0.9: sampling settings with do_sample: false"),
    ({"top_p": 0.0}, "top_p=0.0: expected a mass in (0, 1]"),
])
def test_bad_settings_are_one_line_recipe_errors(tmp_path, args, message):
    import yaml

    from mmkd.train.recipe import RecipeError, load_recipe

    recipe = {
        "run_dir": str(tmp_path / "run"),
        "teacher": {"class_path": "mmkd.models.LlavaModel", "init_args": {"path": "T"}},
        "student": {"class_path": "mmkd.models.MLLMStudent", "init_args": {"vision": "V", "language_model": "L"}},
        "stages": {"gkd": {"task": "gkd", "task_args": args, "objectives": {"jsd": 1.0}, "train": ["projector"],
                           "data": {"class_path": "mmkd.data.ScienceQA", "init_args": {"root": "x"}},
                           "batch_size": 4}},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value) and str(err.value).startswith("stages.gkd.task_args")


def test_on_policy_needs_a_divergence(tmp_path):
    from mmkd.objectives import build_objective
    from mmkd.tasks import build_task

    with pytest.raises(ValueError, match="on-policy answers would train the student on its own samples"):
        build_task("gkd", {"lam": 0.5}, {"lm": build_objective("lm", {})})
    assert build_task("gkd", {"lam": 0.0}, {"lm": build_objective("lm", {})}).lam == 0.0


def test_answers_cut_at_the_end_token_or_kept_at_the_limit(tiny_assets, models, make_module):
    """End of turn and the length limit, through the task: the end token is trained on, a cut answer has none."""
    teacher, student = (copy.deepcopy(m) for m in models)
    _, batch = _batch(tiny_assets, student, teacher, n=2)
    end = student.end_token_ids[0]
    module = make_module(student, teacher, {"jsd": 1.0}, task="gkd", task_args={"lam": 1.0, "max_new_tokens": 3})
    student.generate = lambda prompt, **kw: torch.tensor([[7, end, 0], [8, 9, 10]])  # what generate returned
    with torch.no_grad():
        terms = module.compute_losses(batch)
    assert float(terms["_gen_length"]) == 2.5 and float(terms["_gen_hit_limit"]) == 0.5
    del student.generate


def test_sampling_is_seeded_by_the_micro_batch_and_leaves_the_training_rng_alone(tiny_assets, models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    _, batch = _batch(tiny_assets, student, teacher, n=2)
    _, other = _batch(tiny_assets, student, teacher, n=2, start=2)
    module = make_module(student, teacher, {"jsd": 1.0}, task="gkd",
                         task_args={"lam": 1.0, "max_new_tokens": 5, "top_k": 20})
    seen = []
    real = student.generate

    def recording(prompt, **kw):
        out = real(prompt, **kw)
        seen.append(out)
        return out

    student.generate = recording
    try:
        with torch.no_grad():
            torch.manual_seed(123)
            module.task.on_micro_batch(7, 0)
            first = float(module.compute_losses(batch)["jsd"])
            after = torch.rand(3)
            torch.manual_seed(999)  # another training RNG state: the same answers for the same micro-batch and step
            module.task.on_micro_batch(7, 1)
            again = float(module.compute_losses(batch)["jsd"])
            module.task.on_micro_batch(8, 0)
            module.compute_losses(batch)
            module.task.on_micro_batch(7, 0)
            module.compute_losses(other)
    finally:
        del student.generate
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # generation drew from a forked RNG
    assert first == again and torch.equal(seen[0], seen[1])
    a, b, c = (module.task.sample_seed(x.prompt.input_ids) for x in (batch, batch, other))
    module.task.on_micro_batch(8, 0)
    assert a == b != c != module.task.sample_seed(batch.prompt.input_ids)
