"""Per-step overhead of running the StageModule under the Lightning Trainer vs. a plain PyTorch loop.

Both sides train the same student against the same frozen teacher on the same collated batch with the same
objectives, optimizer and schedule (the module's own ``compute_losses`` and ``configure_optimizers``), so the
only difference is the Trainer's machinery. Steady-state time per optimizer step is measured after warm-up
(Trainer: between ``on_train_batch_start`` hooks, so data fetching, hooks, logging and the optimizer step are
all inside), alternating the two sides over several rounds; the median ratio is printed.

    python bench/overhead.py --rounds 5 --steps 20 [--clock wall]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

CLOCK = time.process_time


def build(assets: dict, batch_size: int):
    from mmkd.data import MultimodalCollator, ScienceQA
    from mmkd.models import LlavaModel, MLLMStudent
    from mmkd.objectives import build_objective
    from mmkd.tasks import build_task
    from mmkd.train.stage_module import StageModule

    teacher = LlavaModel(assets["teacher"])
    torch.manual_seed(0)
    student = MLLMStudent(assets["student_vision"], assets["student_lm"], tokenizer=assets["tokenizer"])
    data = ScienceQA(assets["sqa"], "train")
    collate = MultimodalCollator.for_models(student, teacher, max_length=160)
    batch = collate([data[i] for i in range(batch_size)])
    weights = {"lm": 1.0, "kl": 1.0}
    task = build_task("distill", {}, {name: build_objective(name) for name in weights})
    module = StageModule(student, teacher, task, weights, ["projector", "language_model"], total_steps=10_000)
    return module, batch


def plain_loop(module, batch, steps: int, warmup: int) -> float:
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    module.train()  # the student trains; the teacher stays in eval (StageModule.train keeps it there)
    times = []
    for _ in range(warmup + steps):
        t0 = CLOCK()
        loss = module.compute_losses(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(CLOCK() - t0)
    return statistics.median(times[warmup:])


def trainer_loop(module, batch, steps: int, warmup: int) -> float:
    import lightning as L

    class Clock(L.Callback):
        def __init__(self):
            self.starts: list[float] = []

        def on_train_batch_start(self, *args):
            self.starts.append(CLOCK())

    clock = Clock()
    loader = [batch] * (warmup + steps + 1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[clock], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(loader, batch_size=None))
    gaps = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    return statistics.median(gaps[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("process", "wall"), default="process",
                        help="process: CPU time of this process (robust to other load on the machine); wall: elapsed")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    from mmkd.assets import prepare_tiny_assets

    with tempfile.TemporaryDirectory() as tmp:
        assets = prepare_tiny_assets(Path(tmp) / "assets", n=120, seed=0)
        ratios, plain_t, trainer_t = [], [], []
        for r in range(args.rounds):
            module, batch = build(assets, args.batch_size)
            p = plain_loop(module, batch, args.steps, args.warmup)
            module, batch = build(assets, args.batch_size)
            t = trainer_loop(module, batch, args.steps, args.warmup)
            plain_t.append(p)
            trainer_t.append(t)
            ratios.append(t / p)
            print(f"round {r}: plain {p * 1e3:.1f} ms/step, trainer {t * 1e3:.1f} ms/step, ratio {t / p:.3f}")
    print(f"median plain {statistics.median(plain_t) * 1e3:.1f} ms/step, trainer "
          f"{statistics.median(trainer_t) * 1e3:.1f} ms/step, median ratio {statistics.median(ratios):.3f} "
          f"(target <= 1.03)")


if __name__ == "__main__":
    main()
