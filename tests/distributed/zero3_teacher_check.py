"""Run by test_teacher.py as ``python zero3_teacher_check.py OUT DATA_ROOT`` (Lightning starts rank 1 itself).

One ZeRO-3 step of the debug recipe's distillation stage on two CPU processes. Each rank writes
``OUT/rank{r}.json``: how much of the teacher it holds and the largest difference between the partitioned teacher's
output and a plain replica's on the first batch; after the step, the largest difference between its gathered
teacher weights and the weights loaded from the teacher folder (the teacher is frozen: they must not move).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]


class TeacherCheck(L.Callback):
    def __init__(self, loaded: dict[str, torch.Tensor], replica: torch.nn.Module, out: Path):
        self.loaded, self.replica, self.out = loaded, replica, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        teacher = pl_module.teacher
        params = dict(teacher.named_parameters())
        report = {
            "world": trainer.world_size,
            "all_partitioned": all(hasattr(p, "ds_id") for p in params.values()),
            "held": sum(p.ds_tensor.numel() for p in params.values()),
            "total": sum(p.ds_numel for p in params.values()),
            "teacher_in_module": any(n.startswith("teacher") for n, _ in pl_module.named_parameters()),
            "teacher_trainable": any(p.requires_grad for p in params.values()),
        }
        with torch.no_grad():
            inputs = batch.teacher_side()[0].kwargs()
            ours = teacher(**inputs).last_hidden
            theirs = self.replica(**inputs).last_hidden
        report["forward_max_diff"] = float((ours - theirs).abs().max())
        self.report = report

    def on_train_end(self, trainer, pl_module):
        # Gathered only now: leaving GatheredParameters re-partitions every parameter, the persistent LM head too,
        # which the next forward would no longer find where ZeRO-3's trace expects it.
        import deepspeed

        params = dict(pl_module.teacher.named_parameters())
        report = self.report
        with deepspeed.zero.GatheredParameters(list(params.values())):
            report["shapes_match"] = all(tuple(p.shape) == tuple(self.loaded[n].shape) for n, p in params.items())
            report["weights_max_diff"] = max(float((p.data - self.loaded[n]).abs().max()) for n, p in params.items())
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main(out: Path, data_root: str) -> None:
    from mmkd.train.recipe import load_recipe
    from mmkd.train.rundir import RunDir
    from mmkd.train.runner import Runner
    from mmkd.train.stage import build_stage

    data = {"class_path": "mmkd.data.CaptionPairs", "init_args": {
        "json_path": f"{data_root}/sqa/captions.json", "image_folder": f"{data_root}/sqa/images"}}
    recipe = load_recipe(ROOT / "recipes" / "debug.yaml", [
        "--data_root", data_root, "--run_dir", str(out / "run"), "--trainer.devices", "2",
        "--trainer.strategy", "deepspeed_stage_3", "--trainer.max_steps", "1", "--trainer.enable_progress_bar",
        "false", "--stages.distill.data", json.dumps(data), "--stages.distill.micro_batch_size", "1"])
    runner = Runner(recipe, echo=lambda _: None)
    teacher = runner.teachers.get()
    loaded = {n: p.detach().clone() for n, p in teacher.named_parameters()}  # what from_pretrained loaded
    replica = recipe.teacher.build().eval()
    trainer, module, datamodule = build_stage(recipe.stage("distill"), runner.build_student("distill"), teacher,
                                              RunDir(out / "stage"), on_saved=lambda *_: None, echo=lambda _: None)
    trainer.callbacks.append(TeacherCheck(loaded, replica, out))
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
