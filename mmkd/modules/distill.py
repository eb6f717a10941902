"""DistillModule: distilled pretraining, SFT and distilled fine-tuning as one LightningModule.

The teacher is frozen: always in eval mode, no gradients, outside the optimizer, outside DDP wrapping and
outside checkpoints. It is held as a plain attribute (not a registered submodule) so that ``state_dict``,
``parameters()`` and strategy wrappers never see it; the module moves it to its own device.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from mmkd.data.collate import IMAGE_INPUT_KEYS
from mmkd.modules.objectives import TEACHER_FREE, build_objective

__all__ = ["DistillModule", "NonFiniteLossError", "build_optimizer", "warmup_schedule"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the stage, the step and the term."""


def _split_inputs(batch: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    keys = ("input_ids", "attention_mask", *IMAGE_INPUT_KEYS)
    out = {k: batch[prefix + k] for k in keys if prefix + k in batch}
    if prefix and "input_ids" not in out:  # the teacher shares the student's inputs
        out = {k: batch[k] for k in keys if k in batch}
    return out


def warmup_schedule(total_steps: int, warmup_steps: int, name: str, min_lr_ratio: float):
    """LambdaLR factor: linear warmup, then cosine / linear decay to ``min_lr_ratio``, or constant."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return factor


def build_optimizer(
    named_groups: dict[str, list[tuple[str, nn.Parameter]]], optimizer: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Optimizer with one group per (part, decay) pair: per-part learning rate, no decay on norms and biases."""
    groups = []
    part_lr = optimizer.get("part_lr") or {}
    for part, params in named_groups.items():
        lr = part_lr.get(part, optimizer["lr"])
        decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n.lower()]
        no_decay = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n.lower())]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": optimizer["weight_decay"], "name": part})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}.no_decay"})
    name = optimizer["name"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=optimizer["lr"], momentum=0.9)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=optimizer["lr"], betas=tuple(optimizer["betas"]), eps=optimizer["eps"])


def rng_state() -> dict[str, Tensor]:
    """Torch, NumPy and Python RNG states as tensors (Lightning loads checkpoints with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(list(py_state[1]), dtype=torch.int64),
        "python_version": torch.tensor([py_state[0]], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if py_state[2] is None else py_state[2]], dtype=torch.float64),
        **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}),
    }


def set_rng_state(state: Mapping[str, Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1],
                         float(state["numpy_gauss"][0])))
    gauss = float(state["python_gauss"][0])
    random.setstate((int(state["python_version"][0]), tuple(int(x) for x in state["python"].tolist()),
                     None if math.isnan(gauss) else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this process's current device (dropout on a GPU draws from it)


class DistillModule(L.LightningModule):
    """A student trained on a weighted sum of objectives, with an optional frozen teacher.

    Args:
        student: The student model (output contract; ``parts()`` names its trainable parts).
        teacher: The teacher model, or None for a stage without one.
        objectives: Objective name -> weight.
        objective_args: Objective name -> constructor arguments.
        train_parts: Student parts that train; the rest is frozen.
        optimizer: Optimizer settings (``mmkd.recipe.OptimizerConfig`` as a mapping).
        schedule: Schedule settings (``mmkd.recipe.ScheduleConfig`` as a mapping).
        total_steps: Optimizer steps of the stage (for the schedule).
        stage: The stage name, for messages and logs.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        objectives: Mapping[str, float],
        objective_args: Mapping[str, Mapping[str, Any]] | None = None,
        train_parts: list[str] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        total_steps: int = 1,
        stage: str = "stage",
    ):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule
        self.weights = dict(objectives)
        objective_args = objective_args or {}
        self.total_steps = max(1, int(total_steps))
        self.objectives = self.build_objectives(objective_args)
        needs_teacher = [n for n in self.objectives if n not in TEACHER_FREE
                         and getattr(self.objectives[n], "needs_teacher", True)]
        if needs_teacher and teacher is None:
            raise ValueError(f"stage {stage}: objectives {needs_teacher} need a teacher, but none is configured")
        self.train_parts = list(train_parts or [])
        self.optimizer_cfg = dict(optimizer or {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0,
                                                "betas": (0.9, 0.999), "eps": 1e-8})
        self.schedule_cfg = dict(schedule or {"name": "cosine", "warmup_ratio": 0.0, "warmup_steps": None,
                                              "min_lr_ratio": 0.0})
        self.stage = stage
        self._pending_rng: dict[str, Tensor] | None = None
        self.data_stats: dict[str, int] = {}  # samples / truncated / skipped, summed over this process's batches
        self.data_stats_from_step = 0  # the global step data_stats started counting at (after a resume: > 0)
        self._step_sums: Tensor | None = None  # the loss terms summed over this optimizer step's micro-batches
        self._step_count = 0
        self._step_samples = 0
        self._term_names: list[str] = []
        self._freeze_student()
        if teacher is not None:
            _freeze(teacher)
            from mmkd.models.mllm import ImageTextModel

            if isinstance(teacher, ImageTextModel) and isinstance(student, ImageTextModel):
                from mmkd.models.vocab import align_vocab

                # Same tokenizer, differently padded heads (151,936 vs 152,064 rows): logits over len(tokenizer).
                align_vocab(teacher, student)

    def build_objectives(self, objective_args: Mapping[str, Mapping[str, Any]]) -> nn.ModuleDict:
        """One module per objective name (subclasses with other objectives override this)."""
        built = {}
        for name in self.weights:
            args = dict(objective_args.get(name, {}))
            if name == "feature" and self.teacher is not None:
                # Widths are known now, so the projector exists before configure_optimizers collects parameters.
                args.setdefault("student_dim", _hidden_size(self.student))
                args.setdefault("teacher_dim", _hidden_size(self.teacher))
            built[name] = build_objective(name, total_steps=self.total_steps, **args)
        return nn.ModuleDict(built)

    def _batch_size(self, batch: Mapping[str, Any]) -> int | None:
        ids = batch.get("input_ids")
        return int(ids.shape[0]) if ids is not None else None

    # ---- parts and freezing -------------------------------------------------------------------------------------
    def _freeze_student(self) -> None:
        parts = self.student.parts()
        unknown = [p for p in self.train_parts if p not in parts]
        if unknown:
            raise ValueError(f"stage {self.stage}: the student has no part {unknown[0]!r} (it has {sorted(parts)})")
        self.student.requires_grad_(False)
        for part in self.train_parts:
            for p in parts[part]:
                p.requires_grad_(True)

    def named_trainable_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        parts = self.student.parts()
        names = {id(p): n for n, p in self.student.named_parameters()}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        seen: set[int] = set()
        for part in self.train_parts:
            for p in parts[part]:
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    groups.setdefault(part, []).append((names.get(id(p), part), p))
        extra = [(n, p) for n, p in self.objectives.named_parameters() if p.requires_grad]
        if extra:
            groups["objectives"] = extra
        return groups

    # ---- teacher ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.student.train()  # models load in eval mode; dropout and MoE jitter follow the stage
        if self.teacher is not None:
            from mmkd.modules.teacher import place_teacher

            _freeze(self.teacher)
            # A replica on this device, or ZeRO-3 partitions whose engine (not a submodule) owns the gather hooks.
            object.__setattr__(self, "_teacher_engine", place_teacher(self.teacher, self.trainer.strategy, self.device))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # whatever Lightning toggles, the teacher stays in eval mode
        return self

    def teacher_forward(self, batch: Mapping[str, Tensor], output_hidden_states: bool = False):
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(**_split_inputs(batch, "teacher_"), output_hidden_states=output_hidden_states)

    # ---- steps ------------------------------------------------------------------------------------------------
    def compute_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        hidden = any(o.needs_hidden_states for o in self.objectives.values())
        student_out = self.student(**_split_inputs(batch), output_hidden_states=hidden)
        needs_teacher = any(self.objectives[n].needs_teacher for n in self.weights)
        teacher_out = self.teacher_forward(batch, hidden) if needs_teacher else None
        terms = {name: self.objectives[name](student_out, teacher_out, batch) for name in self.weights}
        total = sum(self.weights[name] * terms[name] for name in self.weights)
        if student_out.aux_loss is not None:
            terms["aux"] = student_out.aux_loss
            total = total + student_out.aux_loss
        terms["loss"] = total
        return terms

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        if _fault("raise", self.stage, self.global_step + 1):
            raise RuntimeError(f"injected failure at step {self.global_step + 1}")
        self._count_data(batch)
        if batch.get("standin"):  # the collator dropped every sample: run the same modules, contribute nothing
            terms = self.compute_losses(batch)
            self._term_names = list(terms)  # this rank joins the step's reduction even if it saw nothing else
            return terms["loss"] * 0.0
        if self._batch_size(batch) == 0:  # no sample at all (a collator without stand-ins)
            return None
        terms = self.compute_losses(batch)
        if _fault("nan", self.stage, self.global_step + 1):
            terms[next(iter(self.weights))] = terms[next(iter(self.weights))] * float("nan")
            terms["loss"] = terms["loss"] * float("nan")
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        if not torch.isfinite(values).all():  # one check per step; name the first bad term
            name, value = next((n, float(v)) for n, v in zip(terms, values.tolist()) if not math.isfinite(v))
            step = self.global_step + 1
            raise NonFiniteLossError(f"stage {self.stage}: loss term {name!r} is {value} at step {step}")
        self._step_sums = values if self._step_sums is None else self._step_sums + values
        self._step_count += 1
        self._step_samples += self._batch_size(batch) or 0
        self._term_names = list(terms)
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Once per optimizer step, after its last micro-batch (also a short one at an epoch's end), on every
        rank: the global means of the loss terms, TAID's update, logging."""
        if not self._term_names:
            return
        bs, self._step_samples = max(1, self._step_samples), 0
        means = dict(zip(self._term_names, self._global_step_means().unbind()))
        self._advance_schedules(means)
        if self._should_log():
            self.log_dict({f"train/{k}": v for k, v in means.items()}, prog_bar=False, batch_size=bs)
            self.log("loss", means["loss"], prog_bar=True, logger=False, batch_size=bs)

    def _global_step_means(self) -> Tensor:
        """Each term's mean over the optimizer step's global batch: its micro-batches, on every rank.

        The logged values and TAID's schedule use these, so they do not depend on how the global batch is split
        over ranks and accumulation (rank 0's last micro-batch alone would be noisier, and TAID's ``t`` would
        drift apart between ranks). One all-reduce of a few numbers per optimizer step.
        """
        sums, count = self._step_sums, self._step_count
        self._step_sums, self._step_count = None, 0
        if sums is None:  # every micro-batch of this step was empty here: count nothing, still join the reduce
            sums = torch.zeros(len(self._term_names), device=self.device)
        packed = torch.cat([sums, sums.new_tensor([count])])
        packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
        return packed[:-1] / packed[-1].clamp(min=1)

    def _should_log(self) -> bool:
        """Log on the steps the logger writes (and the last one): Lightning's per-call bookkeeping is not free."""
        step = self.global_step + 1
        every = max(1, int(self.trainer.log_every_n_steps))
        return step % every == 0 or step >= self.trainer.max_steps > 0 or step == 1

    def _count_data(self, batch: Mapping[str, Any]) -> None:
        for key, value in (batch.get("data_stats") or {}).items():
            self.data_stats[key] = self.data_stats.get(key, 0) + int(value)

    def _advance_schedules(self, terms: Mapping[str, Tensor]) -> None:
        """Objectives with a schedule driven by their own loss (TAID) advance once per optimizer step, on the
        term's mean over the global batch (the same value on every rank)."""
        for name, objective in self.objectives.items():
            loss = getattr(objective, "loss", None)
            if hasattr(loss, "step") and callable(loss.step):
                loss.step(terms[name].detach())
                if self._should_log():
                    self.log(f"train/{name}_t", float(loss.interpolation), batch_size=1)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        terms = self.compute_losses(batch)  # also for a stand-in: ZeRO-3 needs every rank to run the modules
        if batch.get("standin"):
            return
        bs = self._batch_size(batch)
        self.log_dict({f"val/{k}": v.detach() for k, v in terms.items()}, sync_dist=True, batch_size=bs)

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.named_trainable_groups(), self.optimizer_cfg)
        sched = self.schedule_cfg
        warmup = sched.get("warmup_steps")
        if warmup is None:
            warmup = int(round(sched.get("warmup_ratio", 0.0) * self.total_steps))
        lr_lambda = warmup_schedule(self.total_steps, warmup, sched.get("name", "cosine"),
                                    sched.get("min_lr_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: RNG states, no teacher ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank calls this (checkpoints are saved on all ranks), but only rank 0's dict reaches the file:
        # gather each rank's RNG state into it, since the ranks' streams part as soon as their batches differ.
        own = rng_state()
        checkpoint["mmkd_rng"] = own
        checkpoint["mmkd_rng_ranks"] = gather_objects(own)
        checkpoint["mmkd_stage"] = self.stage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ranks = checkpoint.get("mmkd_rng_ranks") or []
        rank, world = self.trainer.global_rank, self.trainer.world_size
        # The same world size resumes each rank's own stream; another one (an execution change) starts every rank
        # from rank 0's.
        self._pending_rng = ranks[rank] if len(ranks) == world else checkpoint.get("mmkd_rng")

    def on_train_start(self) -> None:
        self.data_stats_from_step = int(self.global_step)
        # Restored here, after Lightning's own set-up has drawn whatever it draws, so the next batch sees
        # exactly the state the interrupted run had after its last checkpointed step.
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _hidden_size(model: nn.Module) -> int:
    """Width of a model's final hidden states (its language model's ``hidden_size``)."""
    config = getattr(getattr(model, "hf", None), "config", None)
    config = getattr(config, "text_config", config)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}; set objective_args.feature dims")
    return int(size)


def _freeze(model: nn.Module) -> None:
    model.eval()
    model.requires_grad_(False)


def _fault(kind: str, stage: str, step: int) -> bool:
    """Test-only fault injection: ``MMKD_FAULT=kind:stage:step`` (e.g. ``kill:dft:3``)."""
    spec = os.environ.get("MMKD_FAULT")
    if not spec:
        return False
    parts = spec.split(":")
    return len(parts) == 3 and parts[0] == kind and parts[1] == stage and int(parts[2]) == step
