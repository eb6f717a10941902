"""Sequence-level KD: the student is trained on exactly the teacher's own greedy answers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mmkd.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _prompts_batch(tiny_assets, student, teacher, n=4):
    from mmkd.data import MultimodalCollator, ScienceQA

    data = ScienceQA(tiny_assets["sqa"], "train")
    records = [data[i] for i in range(n)]
    return records, MultimodalCollator.for_models(student, teacher, max_length=160, prompts=True)(records)


def test_the_student_learns_the_teachers_greedy_answers(tiny_assets, models, make_module):
    teacher, student = (copy.deepcopy(m) for m in models)
    records, batch = _prompts_batch(tiny_assets, student, teacher)
    module = make_module(student, teacher, {"lm": 1.0}, task="seq_kd", task_args={"max_new_tokens": 5},
                         train_parts=["projector", "language_model"])
    with torch.no_grad():
        terms = module.compute_losses(batch)
    # An independent computation, one record at a time: the teacher's greedy answer (up to its end token) after the
    # record's prompt, then the student's cross-entropy on [prompt, answer] at the answer tokens.
    from mmkd.data import MultimodalCollator

    prompt_collate = MultimodalCollator.for_models(student, None, train=False, max_length=160)
    total, count, lengths = 0.0, 0, []
    end = set(teacher.end_token_ids)
    for record in records:
        prompt = prompt_collate([record]).inputs
        with torch.no_grad():
            new = teacher.generate(prompt, max_new_tokens=5)[0].tolist()
        answer = next((new[: i + 1] for i, t in enumerate(new) if t in end), new)
        lengths.append(len(answer))
        ids = torch.tensor([prompt.input_ids[0].tolist() + answer])
        with torch.no_grad():
            out = student(ids, torch.ones_like(ids), **prompt.images)
        logits = out.logits()[0, prompt.input_ids.shape[1] - 1: -1]
        total += float(F.cross_entropy(logits.float(), torch.tensor(answer), reduction="sum"))
        count += len(answer)
    assert abs(float(terms["lm"]) - total / count) < 1e-4
    assert float(terms["gen_length"]) == sum(lengths) / len(lengths)
    assert 0.0 <= float(terms["gen_hit_limit"]) <= 1.0
    # the dataset's own answers play no part: a batch with other answers gives the same loss
    changed = [dict(r, messages=[r["messages"][0], {"role": "assistant", "content": "Z Z Z"}]) for r in records]
    other = MultimodalCollator.for_models(student, teacher, max_length=160, prompts=True)(changed)
    with torch.no_grad():
        assert float(module.compute_losses(other)["lm"]) == float(terms["lm"])


def test_answers_that_hit_the_length_limit_are_kept_without_an_end_token(tiny_assets, models, make_module):
    from mmkd.tasks.sequences import answer_batch, trim_answers

    teacher, student = (copy.deepcopy(m) for m in models)
    _, batch = _prompts_batch(tiny_assets, student, teacher, n=3)
    end = teacher.end_token_ids[0]
    generated = torch.tensor([[5, end, 0], [6, 7, 8], [end, 0, 0]])
    answers = trim_answers(generated, teacher.end_token_ids)
    assert answers.tokens == [[5, end], [6, 7, 8], [end]] and answers.hit_limit == [False, True, False]
    relabelled, stats = answer_batch(batch, answers, student.tokenizer.pad_token_id)
    for row, answer in enumerate(answers.tokens):
        labels = relabelled.labels[row]
        assert labels[labels != -100].tolist() == answer  # the answer, end token included when there is one
    assert stats == {"gen_length": 2.0, "gen_hit_limit": 1 / 3, "gen_truncated": 0.0}
    # a stage's max_length cuts each answer to fit its row: here row 1 keeps one token of three
    prompts = batch.prompt.attention_mask.sum(1).tolist()
    limit = prompts[1] + 1
    cut, stats = answer_batch(batch, answers, student.tokenizer.pad_token_id, max_length=limit)
    kept = [min(len(a), max(0, limit - p)) for a, p in zip(answers.tokens, prompts)]
    assert [int((row != -100).sum()) for row in cut.labels] == kept and kept[1] == 1
    assert stats["gen_truncated"] == sum(k < len(a) for k, a in zip(kept, answers.tokens)) / 3


def test_a_seq_kd_stage_runs_end_to_end(tiny_assets, tmp_path):
    run = tmp_path / "run"
    code = main(["fit", str(ROOT / "recipes" / "tiny" / "seq_kd.yaml"), "--run-dir", str(run), "--data_root",
                 tiny_assets["root"], "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    entry = json.loads((run / "manifest.json").read_text())["stages"]["seq_kd"]
    assert entry["status"] == "done" and entry["global_step"] == 2
    assert entry["metrics"]["train/gen_length"] > 0 and "train/lm" in entry["metrics"]
