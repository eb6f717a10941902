"""On-policy distillation (GKD, Agarwal et al., ICLR 2024): the student's own answers, scored by the teacher.

For each micro-batch, with probability ``lam``, the student answers the batch's prompts (its images included) and the
stage's token objectives compare student and teacher on the student's tokens (the teacher reads its own inputs: its
processor, its visual-token count, its template); otherwise the batch is teacher-forced on the dataset's answers, as
in the ``distill`` task. ``lam = 0`` is the ``distill`` task step for step; ``lam = 1`` is purely on-policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmkd.contract import DistillBatch
from mmkd.objectives import Objective
from mmkd.tasks.base import Collator
from mmkd.tasks.distill import DistillTask
from mmkd.tasks.sequences import answer_batch, trim_answers

__all__ = ["OnPolicyTask"]


def _accelerators(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG a seeded generation call must leave as it found them."""
    return [device.index or 0] if device.type == "cuda" else []


class OnPolicyTask(DistillTask):
    """GKD's mixture of on-policy and teacher-forced batches.

    Whether a micro-batch is on-policy is drawn from ``seed``, the optimizer step and the micro-batch's index in it:
    the same on every rank (under ZeRO-3 every rank must generate together) and again after a resume. The student
    generates under ``no_grad`` in eval mode for that call only (KV cache, left-padded prompts); an answer ends at
    its first end-of-turn token (kept and trained on) or at ``max_new_tokens`` (kept as it is and counted as hitting
    the limit). Sampling is seeded per micro-batch from ``seed``, the step and the prompts (:meth:`sample_seed`), in a
    forked RNG: one process and two sample the same answers for the same micro-batches, a resumed run samples what
    the uninterrupted one did, and the training RNG stream is left untouched.

    Logged per optimizer step: ``on_policy`` (fraction of on-policy micro-batches), ``gen_length`` and
    ``gen_hit_limit`` (over the on-policy ones), and every teacher-reading objective's mean over on-policy and over
    teacher-forced micro-batches separately (``<name>_on_policy``, ``<name>_off_policy``).

    Args:
        objectives: The stage's token objectives (``jsd`` is GKD's default divergence; ``kl``, ``rkl``, ``skl``,
            ``srkl``, ``taid``, ``topk_kl`` work too; ``lm`` adds the LM loss on whichever answers the batch has).
        lam: Probability that a micro-batch is on-policy, in [0, 1].
        max_new_tokens: Longest answer the student writes.
        do_sample: Sample the student's answers (GKD) or decode greedily.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling mass, in (0, 1].
        top_k: Sample among the k most likely tokens (0: all).
        seed: Seed of the on-policy draws.
    """

    def __init__(self, objectives: dict[str, Objective], lam: float = 0.5, max_new_tokens: int = 64,
                 do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0) -> None:
        super().__init__(objectives)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam={lam}: expected a probability in [0, 1]")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature={temperature}: sampling needs a temperature > 0 (or do_sample: false)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}: expected a mass in (0, 1]")
        if top_k < 0:
            raise ValueError(f"top_k={top_k}: expected 0 (all tokens) or a positive number")
        scoring = [n for n, o in self.objectives.items() if o.needs_teacher]
        if lam > 0 and not scoring:
            raise ValueError("lam > 0 with no objective that reads the teacher: on-policy answers would train the "
                             "student on its own samples only (add jsd, kl, ...)")
        if not do_sample:
            unused = [f"{k}={v}" for k, v, default in (("temperature", temperature, 1.0), ("top_p", top_p, 1.0),
                                                        ("top_k", top_k, 0)) if v != default]
            if unused:
                raise ValueError(f"{', '.join(unused)}: sampling settings with do_sample: false (greedy decoding "
                                 "ignores them); set do_sample: true or drop them")
        self.lam = float(lam)
        self.seed = int(seed)
        self.scoring = scoring
        self.generation: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            self.generation.update(temperature=temperature, top_p=top_p, top_k=top_k)
        self.max_length: int | None = None
        self._draw_key = (0, 0)

    @classmethod
    def teacher_needed(cls, objectives: Mapping[str, type[Objective]], **args: Any) -> bool:
        return True

    @classmethod
    def teacher_inputs_needed(cls, objectives: Mapping[str, type[Objective]], **args: Any) -> bool:
        return False

    def collator(self, student: Any, teacher: Any | None, max_length: int) -> Collator:
        from mmkd.data.collate import MultimodalCollator

        self.max_length = max_length
        return MultimodalCollator.for_models(student, teacher, max_length=max_length, on_overflow=self.on_overflow,
                                             prompts=True)

    def on_micro_batch(self, global_step: int, micro: int) -> None:
        self._draw_key = (int(global_step), int(micro))

    def on_policy(self) -> bool:
        """This micro-batch's draw: a function of ``seed``, the optimizer step and the micro-batch index only."""
        if self.lam in (0.0, 1.0):
            return self.lam == 1.0
        step, micro = self._draw_key
        digest = hashlib.sha256(f"mmkd.gkd/{self.seed}/{step}/{micro}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < self.lam

    def sample_seed(self, prompt_ids: Tensor) -> int:
        """The sampling seed of a micro-batch: a function of ``seed``, the optimizer step and the prompts' tokens, so
        the same micro-batch samples the same answers on any rank, with any number of processes, and after a resume."""
        step, _ = self._draw_key
        digest = hashlib.sha256(f"mmkd.gkd.sample/{self.seed}/{step}/".encode())
        digest.update(prompt_ids.detach().to("cpu", torch.int64).numpy().tobytes())
        return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)

    def losses(self, student: nn.Module, teacher: nn.Module | None, batch: DistillBatch) -> dict[str, Tensor]:
        on = self.on_policy()
        stats = {"gen_length": 0.0, "gen_hit_limit": 0.0}
        if on:
            was_training = student.training
            student.eval()
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=_accelerators(batch.labels.device)):
                    torch.manual_seed(self.sample_seed(batch.prompt.input_ids))
                    generated = student.generate(batch.prompt, **self.generation)
            finally:
                student.train(was_training)
            answers = trim_answers(generated, student.end_token_ids)
            batch, counts = answer_batch(batch, answers, student.tokenizer.pad_token_id, self.max_length,
                                         teacher.tokenizer.pad_token_id)
            stats = {"gen_length": counts["gen_length"], "gen_hit_limit": counts["gen_hit_limit"]}
        terms = super().losses(student, teacher, batch)
        device = batch.labels.device
        flag = torch.tensor(float(on), device=device)
        terms["_on"] = flag
        for key, value in stats.items():
            terms[f"_{key}"] = torch.tensor(value, device=device)
        for name in self.scoring:
            terms[f"_{name}_on"] = terms[name].detach() * flag
        return terms

    def on_optimizer_step(self, means: Mapping[str, Tensor]) -> dict[str, float]:
        logged = super().on_optimizer_step(means)
        on = float(means.get("_on", 0.0))
        logged["on_policy"] = on
        if on > 0:
            logged["gen_length"] = float(means["_gen_length"]) / on
            logged["gen_hit_limit"] = float(means["_gen_hit_limit"]) / on
        for name in self.scoring:
            if name in means:
                total, on_part = float(means[name]), float(means[f"_{name}_on"])
                if on > 0:
                    logged[f"{name}_on_policy"] = on_part / on
                if on < 1:
                    logged[f"{name}_off_policy"] = (total - on_part) / (1 - on)
        return logged
