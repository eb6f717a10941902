"""StageModule: the one LightningModule, whatever the stage computes.

It does what every stage shares — freezing all but the trained parts, parameter groups, optimizer and schedule, the
weighted sum of the task's terms, the stand-in batch, the finiteness check, global-batch means, logging, per-rank
RNG in checkpoints — and asks the stage's task (:mod:`mmkd.tasks`) for the collator and the loss terms. It has no
subclasses and no branch on the kind of stage.

The teacher (and any frozen model of the task's own, such as a reference copy) is frozen: always in eval mode, no
gradients, outside the optimizer, outside DDP wrapping and outside checkpoints. It is held as a plain attribute (not
a registered submodule) so that ``state_dict``, ``parameters()`` and strategy wrappers never see it; the module puts
it on its device (or partitions it under ZeRO-3) when fitting starts.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from mmkd.contract import AUX_LOSS, HEAD_GRADIENT, batch_stats
from mmkd.tasks import Task
from mmkd.train.optim import build_optimizer, build_scheduler
from mmkd.train.recipe.schema import OptimizerConfig, ScheduleConfig

__all__ = ["NonFiniteLossError", "StageModule", "gather_objects", "rng_state", "set_rng_state"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the stage, the step and the term."""


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


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _freeze(model: nn.Module) -> None:
    freeze = getattr(model, "freeze", None)
    if callable(freeze):
        freeze()
    else:
        model.eval()
        model.requires_grad_(False)


class StageModule(L.LightningModule):
    """A student trained on the weighted terms of a task, with an optional frozen teacher.

    Args:
        student: The student (``parts()`` names its trainable parts).
        teacher: The frozen teacher, or None for a stage without one.
        task: What the stage computes (its objectives are registered here: trained and checkpointed).
        weights: Objective name -> weight (the recipe's ``objectives``).
        train_parts: Student parts that train; the rest is frozen.
        optimizer: Optimizer settings.
        schedule: Schedule settings.
        total_steps: Optimizer steps of the stage (for the schedule).
        stage: The stage name, for messages and logs.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        task: Task,
        weights: Mapping[str, float],
        train_parts: list[str] | tuple[str, ...],
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        total_steps: int = 1,
        stage: str = "stage",
    ):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule
        self.task = task
        self.objectives = task.objectives  # a submodule: projectors train, schedules' buffers are checkpointed
        self.weights = dict(weights)
        task.bind_weights(self.weights)  # a task may share one head pass between weighted objectives
        self.total_steps = max(1, int(total_steps))
        self.train_parts = list(train_parts)
        self.optimizer_cfg = optimizer or OptimizerConfig()
        self.schedule_cfg = schedule or ScheduleConfig(warmup_ratio=0.0)
        self.stage = stage
        if task.needs_teacher and teacher is None:
            raise ValueError(f"stage {stage}: the {type(task).__name__} needs a teacher, but none is configured")
        self._pending_rng: dict[str, Tensor] | None = None
        self.data_stats: dict[str, int] = {}  # samples / truncated / skipped, summed over this process's batches
        self.data_stats_from_step = 0  # the global step data_stats started counting at (after a resume: > 0)
        self._step_sums: Tensor | None = None  # the loss terms summed over this optimizer step's micro-batches
        self._step_count = 0
        self._micro_in_step = 0  # every micro-batch of this optimizer step, stand-ins included (same on every rank)
        self._step_samples = 0
        self._step_started: float | None = None
        self._term_names: list[str] = []
        self._freeze_student()
        for model in self.frozen_models().values():
            _freeze(model)

    # ---- frozen models ----------------------------------------------------------------------------------------
    def frozen_models(self) -> dict[str, nn.Module]:
        """The teacher and the task's own frozen models (none of them a submodule)."""
        models = dict(self.task.frozen_models())
        if self.teacher is not None:
            models["teacher"] = self.teacher
        return models

    def on_fit_start(self) -> None:
        from mmkd.train.teachers import place_teacher

        self.student.train()  # models load in eval mode; dropout and MoE jitter follow the stage
        engines = {}
        for name, model in self.frozen_models().items():
            _freeze(model)
            # A replica on this device, or ZeRO-3 partitions whose engine (not a submodule) owns the gather hooks.
            engines[name] = place_teacher(model, self.trainer.strategy, self.device)
        object.__setattr__(self, "_frozen_engines", engines)

    def train(self, mode: bool = True):
        super().train(mode)
        for model in self.frozen_models().values():
            model.eval()  # whatever Lightning toggles, frozen models stay in eval mode
        return self

    # ---- parts and freezing -----------------------------------------------------------------------------------
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
        """Trainable parameters by part (each parameter in the first part that names it), then the task's."""
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

    # ---- steps ------------------------------------------------------------------------------------------------
    def compute_losses(self, batch: Any) -> dict[str, Tensor]:
        """The task's terms of one micro-batch plus ``loss``: the recipe-weighted objectives and the model's own
        ``aux`` loss."""
        terms = self.task.losses(self.student, self.teacher, batch)
        total = sum(self.weights[name] * terms[name] for name in self.weights)
        if HEAD_GRADIENT in terms:  # value 0: the gradient of fused objectives, whose values are their own terms
            total = total + terms.pop(HEAD_GRADIENT)
        if AUX_LOSS in terms:
            total = total + terms[AUX_LOSS]
        terms["loss"] = total
        return terms

    def _count_data(self, batch: Any) -> None:
        for key, value in batch_stats(batch).items():
            self.data_stats[key] = self.data_stats.get(key, 0) + int(value)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self._step_started is None:
            self._step_started = time.perf_counter()
        self._count_data(batch)
        self.task.on_micro_batch(self.global_step, self._micro_in_step)
        self._micro_in_step += 1
        if batch.standin:  # the collator dropped every sample: run the same modules, contribute nothing
            terms = self.compute_losses(batch)
            self._term_names = list(terms)  # this rank joins the step's reduction even if it saw nothing else
            return terms["loss"] * 0.0
        if batch.size == 0:  # no sample at all (a collator without stand-ins)
            return None
        terms = self.compute_losses(batch)
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        if not torch.isfinite(values).all():  # one check per step; name the first bad term
            name, value = next((n, float(v)) for n, v in zip(terms, values.tolist()) if not math.isfinite(v))
            step = self.global_step + 1
            raise NonFiniteLossError(f"stage {self.stage}: loss term {name!r} is {value} at step {step}")
        self._step_sums = values if self._step_sums is None else self._step_sums + values
        self._step_count += 1
        self._step_samples += batch.size
        self._term_names = list(terms)
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Once per optimizer step, after its last micro-batch (also a short one at an epoch's end), on every
        rank: the global means of the loss terms, the task's schedules, logging."""
        if self._inside_accumulation():
            return
        self._micro_in_step = 0
        if not self._term_names:
            return
        bs, self._step_samples = max(1, self._step_samples), 0
        means = dict(zip(self._term_names, self._global_step_means().unbind()))
        logged = self.task.on_optimizer_step(means)
        if self._should_log():
            for key, value in logged.items():
                self.log(f"train/{key}", float(value), batch_size=1)
            # Terms named "_..." are a task's raw material for the values it logs itself (on_optimizer_step).
            self.log_dict({f"train/{k}": v for k, v in means.items() if not k.startswith("_")}, prog_bar=False,
                          batch_size=bs)
            self.log("loss", means["loss"], prog_bar=True, logger=False, batch_size=bs)
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]), batch_size=1)
            if self._step_started is not None:
                seconds = time.perf_counter() - self._step_started
                # Timings under their own prefix: train/* holds what the run computes (equal across reruns).
                self.log("perf/step_time_s", seconds, batch_size=1)
                self.log("perf/samples_per_s", bs * self.trainer.world_size / max(seconds, 1e-9), batch_size=1)
        self._step_started = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        inside = self._inside_accumulation()
        super().optimizer_step(*args, **kwargs)
        if not inside:
            self.task.after_optimizer_step(self.student)

    def _inside_accumulation(self) -> bool:
        """Whether this micro-batch is not the last of its optimizer step although the optimizer hooks run.

        Under DeepSpeed the engine accumulates: Lightning calls ``on_before_optimizer_step`` and ``optimizer_step``
        after every micro-batch and the engine steps only at the boundary. The step's means, the task's schedules
        (TAID's ``t``) and its after-step work (CLIP's logit-scale clamp) belong to the boundary only.
        """
        trainer = self.trainer
        return bool(trainer.strategy.handles_gradient_accumulation and trainer.fit_loop._should_accumulate())

    def _global_step_means(self) -> Tensor:
        """Each term's mean over the optimizer step's global batch: its micro-batches, on every rank.

        The logged values and the schedules (TAID) use these, so they do not depend on how the global batch is
        split over ranks and accumulation (rank 0's last micro-batch alone would be noisier, and TAID's ``t``
        would drift apart between ranks). One all-reduce of a few numbers per optimizer step.
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

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        terms = self.compute_losses(batch)  # also for a stand-in: ZeRO-3 needs every rank to run the modules
        if batch.standin:
            return
        self.log_dict({f"val/{k}": v.detach() for k, v in terms.items()}, sync_dist=True, batch_size=batch.size)

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.named_trainable_groups(), self.optimizer_cfg)
        scheduler = build_scheduler(opt, self.schedule_cfg, self.total_steps)
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
