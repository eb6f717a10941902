"""The teacher under each strategy: a replica outside DDP, ZeRO-3 partitions that hold the loaded weights."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from dist_helpers import ROOT, run_env
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from mmkd.train.strategies import MMKDDeepSpeedStrategy
from mmkd.train.teachers import is_partitioned, is_quantized, place_teacher


def test_replica_under_ddp_and_for_quantized_teachers():
    teacher = nn.Linear(4, 4).requires_grad_(False)
    assert place_teacher(teacher, DDPStrategy(), torch.device("cpu")) is None
    assert not is_partitioned(teacher)
    teacher.quantize = "4bit"  # bitsandbytes' packed weights cannot be split by ZeRO-3: kept whole
    assert is_quantized(teacher)
    assert place_teacher(teacher, MMKDDeepSpeedStrategy(stage=3), torch.device("cpu")) is None
    assert not is_partitioned(teacher)


def test_zero3_teacher_is_partitioned_and_holds_the_loaded_weights(tiny_assets, zero_config, tmp_path):
    script = Path(__file__).with_name("zero3_teacher_check.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), tiny_assets["root"]], cwd=ROOT,
                          env=run_env(zero_config), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, report in enumerate(reports):
        assert report["world"] == 2 and report["all_partitioned"], (r, report)
        # each rank holds about half of every tensor (DeepSpeed pads each partition to a multiple of the world)
        assert report["held"] <= report["total"] // 2 + 2 * 64, (r, report)
        assert report["shapes_match"] and report["weights_max_diff"] == 0.0, (r, report)  # loaded, not empty
        assert report["forward_max_diff"] < 1e-5, (r, report)  # gathered on the fly, same output as a replica
        assert not report["teacher_in_module"] and not report["teacher_trainable"], (r, report)
