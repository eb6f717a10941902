"""LLaVA-KD at its real sizes on a CPU: DPT, SFT and DFT of recipes/llava_kd_onevision.yaml, two optimizer steps each.

SLOW (about 20-30 minutes on 2 cores; ``--quick`` is a 2-layer smoke version of a few minutes). Not a test: never run
by ``make test``.

Writes, from configs and random weights (nothing is downloaded), the recipe's parts at their real shapes:

* student parts (what ``MLLMStudent`` assembles, adding its 2-layer MLP projector): a SigLIP-so400m-patch14-384
  vision tower (1152 wide, 27 layers, 16 heads, MLP 4304, 384 px images in 14 px patches: 729 visual tokens) and a
  Qwen2.5-0.5B language model (896 wide, 24 layers, 14 heads, 2 KV heads, MLP 4864, V = 151,936, tied embeddings);
* the teacher: LLaVA-OneVision-Qwen2-0.5B's shapes (the same SigLIP tower, Qwen2-0.5B, any-resolution tiling on a
  384 px grid; a 384 px image gives its 729-token base grid, one 729-token tile and 27 row newlines). The recipe's
  7B teacher does not fit a 24 GiB CPU machine: its bf16 weights alone are about 15 GB, before the student, its
  optimizer and the activations of ~2,800-token teacher sequences;
* the synthetic ScienceQA world (``mmkd data synth-sqa``) at 384 px, its tokenizer's vocabulary filled to 151,936
  entries (bench/cache.py's ``fill_vocabulary``), and long samples in the recipe's data layouts: caption pairs whose
  captions are many of the world's texts joined, and multi-turn conversations of the world's problems, each about
  ``--tokens`` student tokens long (729 visual tokens plus text).

Each stage then runs in its own process through the recipe code path: ``load_recipe`` with overrides of the paths,
data, steps, batch sizes and accelerator, and ``Runner(recipe, only_stage=NAME).run()``. The bench adds one Lightning
callback (wrapping ``build_stage``, first in the callback list) that times the teacher's and the student's forward
passes (module forward hooks), the losses (the rest until ``on_before_backward``) and the backward, and reads the
process's resident memory per phase (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``). Step time
is the run's own ``perf/step_time_s`` (RUN/stages/NAME/logs/metrics.csv). Prints markdown tables.

    OMP_NUM_THREADS=2 .venv/bin/python bench/real_size.py                 # full: 2,048 tokens, ~25 min
    OMP_NUM_THREADS=2 .venv/bin/python bench/real_size.py --quick         # 2-layer towers and LMs, 1,024 tokens
    OMP_NUM_THREADS=2 .venv/bin/python bench/real_size.py --build-only --out DIR   # the folders only (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llava_kd_onevision.yaml"
STAGES = ("dpt", "sft", "dft")
V = 151_936
TEACHER_VOCAB = 152_000  # LLaVA-OneVision-Qwen2-0.5B's padded head; mmkd aligns both sides to len(tokenizer)
VISUAL_TOKENS = 729  # (384 / 14)² for the student's SigLIP tower

SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
QWEN_0_5B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "tie_word_embeddings": True}
# LLaVA-OneVision's any-resolution grid: multiples of the 384 px tile up to 6 x 6.
PINPOINTS = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]


# ---- the folders ---------------------------------------------------------------------------------------------------
def _layers(quick: bool) -> dict[str, int]:
    return {"vision": 2, "lm": 2} if quick else {"vision": SIGLIP_SO400M["num_hidden_layers"],
                                                  "lm": QWEN_0_5B["num_hidden_layers"]}


def _vision_config(quick: bool, teacher: bool = False) -> Any:
    """The student's tower as google/siglip-so400m-patch14-384 ships it (27 layers and the pooling head), or the
    teacher's as LLaVA-OneVision's config has it (26 layers, no pooling head: transformers' defaults for it)."""
    from transformers import SiglipVisionConfig

    layers = _layers(quick)["vision"] - (1 if teacher and not quick else 0)
    return SiglipVisionConfig(**{**SIGLIP_SO400M, "num_hidden_layers": layers, "vision_use_head": not teacher})


def _lm_config(tok: Any, vocab: int, quick: bool) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**{**QWEN_0_5B, "num_hidden_layers": _layers(quick)["lm"]}, vocab_size=vocab,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def _save_bf16(model: Any, folder: Path) -> int:
    import torch

    model.to(torch.bfloat16).save_pretrained(folder)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_models(root: Path, tokenizer: Path, quick: bool) -> dict[str, Any]:
    """SigLIP tower and Qwen2.5-0.5B LM folders (the student's parts) and a LLaVA-OneVision-0.5B teacher folder."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2ForCausalLM,
        SiglipImageProcessor,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    size = {"height": SIGLIP_SO400M["image_size"], "width": SIGLIP_SO400M["image_size"]}
    counts = {"vision": _save_bf16(SiglipVisionModel(_vision_config(quick)), root / "siglip")}
    SiglipImageProcessor(size=size).save_pretrained(root / "siglip")
    counts["lm"] = _save_bf16(Qwen2ForCausalLM(_lm_config(tok, V, quick)), root / "qwen2.5-0.5b")
    config = LlavaOnevisionConfig(
        vision_config=_vision_config(quick, teacher=True), text_config=_lm_config(tok, TEACHER_VOCAB, quick),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )
    counts["teacher"] = _save_bf16(LlavaOnevisionForConditionalGeneration(config), root / "teacher")
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, crop_size=size, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok, num_image_tokens=VISUAL_TOKENS,
        vision_feature_select_strategy="full", chat_template=tok.chat_template,
    ).save_pretrained(root / "teacher")
    return counts


def _paragraphs(sqa: Path) -> list[str]:
    """The world's texts: every problem's question, options, answer, solution and lecture, and every caption."""
    from mmkd.data.scienceqa import letters

    out = []
    for p in json.loads((sqa / "problems.json").read_text()).values():
        options = " ".join(f"{letter}. {c}" for letter, c in zip(letters(len(p["choices"])), p["choices"]))
        out.append(f"Question: {p['question']} {p['hint']} Options: {options}\n"
                   f"The answer is {letters(len(p['choices']))[p['answer']]}. {p['solution']} {p['lecture']}")
    out += [c["conversations"][1]["value"] for c in json.loads((sqa / "captions.json").read_text())]
    return out


def write_data(data_root: Path, sqa: Path, tok: Any, tokens: int, samples: int) -> None:
    """The recipe's data files under ``data_root``: long caption pairs (DPT) and long conversations (SFT, DFT)."""
    captions = json.loads((sqa / "captions.json").read_text())
    texts = _paragraphs(sqa)
    budget = tokens - VISUAL_TOKENS - 8  # chat-template tokens of the first turn
    (data_root / "pretrain").mkdir(parents=True, exist_ok=True)
    for link in (data_root / "pretrain" / "images", data_root / "images"):
        if not link.exists():
            link.symlink_to((sqa / "images").resolve())
    pairs, conversations = [], []
    k = 0
    for i in range(samples):
        image = captions[i % len(captions)]["image"]
        caption, turns, used = [], [], 0
        while used < budget:  # one caption of many of the world's texts
            text = texts[k % len(texts)]
            k += 1
            caption.append(text.replace("\n", " "))
            used += len(tok(text)["input_ids"]) + 1
        pairs.append({"id": f"long-{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nGive a brief description of the image."},
            {"from": "gpt", "value": " ".join(caption)}]})
        used = 0
        while used < budget:  # one conversation of many problems, the image in its first turn
            question, answer = texts[k % len(texts)].split("\n", 1) if "\n" in texts[k % len(texts)] else (
                "Describe the image.", texts[k % len(texts)])
            k += 1
            turns += [{"from": "human", "value": ("<image>\n" if not turns else "") + question},
                      {"from": "gpt", "value": answer}]
            used += len(tok(question + answer)["input_ids"]) + 6  # two turns' template tokens
        conversations.append({"id": f"conv-{i}", "image": f"images/{image}", "conversations": turns})
    (data_root / "pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pairs))
    (data_root / "llava_v1_5_mix665k.json").write_text(json.dumps(conversations))


def build_world(root: Path, quick: bool, tokens: int, samples: int) -> dict[str, Any]:
    """Everything the recipe's overrides point at, written under ``root`` (kept if already there)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cache import fill_vocabulary  # bench/cache.py: the synthetic tokenizer filled to V entries
    from transformers import AutoTokenizer

    from mmkd.data.synth import synth_sqa

    done = root / "world.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    sqa = root / "sqa"
    synth_sqa(sqa, 60, 0, SIGLIP_SO400M["image_size"])
    tokenizer = root / "tokenizer"
    shutil.copytree(sqa / "tokenizer", tokenizer, dirs_exist_ok=True)
    fill_vocabulary(tokenizer, V)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    assert len(tok) == V, len(tok)
    write_data(root / "data", sqa, tok, tokens, samples)
    counts = build_models(root, tokenizer, quick)
    world = {"quick": quick, "tokens": tokens, "parameters": counts, "build_s": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(world))
    return world


def recipe_overrides(root: Path, stage: str | None, steps: int, strategy: str, accelerator: str = "cpu",
                     devices: int = 1, precision: str = "bf16-mixed") -> list[str]:
    """Overrides of recipes/llava_kd_onevision.yaml: this world's paths and data, micro-batch 1, ``steps`` steps."""
    args = ["--run_dir", str(root / "run"), "--data_root", str(root / "data"),
            "--teacher.init_args.path", str(root / "teacher"),
            "--student.init_args.vision", str(root / "siglip"),
            "--student.init_args.language_model", str(root / "qwen2.5-0.5b"),
            "--student.init_args.tokenizer", str(root / "tokenizer"),
            "--trainer.accelerator", accelerator, "--trainer.devices", str(devices), "--trainer.precision", precision,
            "--trainer.max_steps", str(steps), "--trainer.num_workers", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.checkpoint_every_n_steps", "100000"]
    for name in STAGES:
        args += [f"--stages.{name}.batch_size", str(devices), f"--stages.{name}.micro_batch_size", "1"]
        if strategy != "recipe":
            args += [f"--stages.{name}.trainer.strategy", strategy]
    return args


# ---- the probe (in the stage's process) ------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def make_probe(out: Path) -> Any:
    """The Lightning callback that times and measures each phase of every training step (see the module docstring)."""
    import lightning as L

    class Probe(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.checks: dict[str, Any] = {}
            self.cur: dict[str, Any] = {}
            self.mark = 0.0
            self.in_backward = False
            self.layer_calls = Counter()

        # phases: each ends with its wall time and its resident-memory peak, the next starts with a fresh peak
        def _phase(self, name: str) -> None:
            now = time.perf_counter()
            self.cur[name + "_s"] = self.cur.get(name + "_s", 0.0) + now - self.mark
            self.cur[name + "_peak_mib"] = max(self.cur.get(name + "_peak_mib", 0.0), _mib(_status_kib("VmHWM")))
            self.cur[name + "_end_mib"] = _mib(_status_kib("VmRSS"))
            _reset_peak()
            self.mark = time.perf_counter()

        def on_train_start(self, trainer, pl_module):
            student, teacher = pl_module.student, pl_module.teacher
            for model, name in ((student, "student"), (teacher, "teacher")):
                if model is None:
                    continue
                model.register_forward_pre_hook(lambda m, a, name=name: self._phase(f"before_{name}"))
                model.register_forward_hook(lambda m, a, o, name=name: self._phase(f"{name}_forward"))
            # transformers checkpoints a layer's forward, not its __call__: its submodules run again in backward.
            layer = student.hf.model.language_model.layers[0].mlp
            layer.register_forward_hook(lambda m, a, o: self.layer_calls.update(
                ["backward" if self.in_backward else "forward"]))
            self.checks.update(_checks(trainer, pl_module))
            self.checks["rss_models_loaded_mib"] = _mib(_status_kib("VmRSS"))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.cur = {"step": trainer.global_step + 1, "start_mib": _mib(_status_kib("VmRSS")),
                        "tokens": int(batch.inputs.attention_mask.sum())}
            teacher_inputs = batch.teacher_side()[0]
            self.cur["teacher_tokens"] = int(teacher_inputs.attention_mask.sum()) if pl_module.teacher else 0
            self.cur["answer_tokens"] = int((batch.labels != -100).sum())
            self.t0 = self.mark = time.perf_counter()
            _reset_peak()

        def on_before_backward(self, trainer, pl_module, loss):
            self._phase("losses")
            self.in_backward = True

        def on_after_backward(self, trainer, pl_module):
            self._phase("backward")
            self.in_backward = False

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._phase("after_backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._phase("optimizer")
            self.cur["wall_s"] = time.perf_counter() - self.t0
            self.cur["layer0_calls"] = dict(self.layer_calls)
            self.layer_calls.clear()
            if not self.steps:
                self.checks["adam_state_dtypes"] = _state_dtypes(trainer)
            self.steps.append(self.cur)
            self.write()

        def write(self) -> None:
            # VmHWM resets (clear_refs) reset ru_maxrss too, and before the first reset ru_maxrss still holds the
            # parent's peak from before the exec: the process peak is the largest phase peak or the peak since the
            # last reset (the stage's final checkpoint and student save).
            phases = [v for s in self.steps for k, v in s.items() if k.endswith("_peak_mib")]
            self.checks["process_peak_mib"] = max([*phases, _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)])
            out.write_text(json.dumps({"steps": self.steps, "checks": self.checks}, indent=1))

    return Probe()


def _numel_by_dtype(params: Any) -> dict[str, int]:
    counts: Counter = Counter()
    for p in {id(p): p for p in params}.values():
        counts[str(p.dtype).replace("torch.", "")] += p.numel()
    return dict(counts)


def _checks(trainer: Any, module: Any) -> dict[str, Any]:
    """What the optimizer sees, the models' dtypes, tied heads and checkpointing flags, when training starts."""
    student, teacher = module.student, module.teacher
    in_optimizer = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
    teacher_ids = {id(p) for p in teacher.parameters()} if teacher is not None else set()
    lm = student.hf.model.language_model
    return {
        "optimizer_parameters": sum(p.numel() for p in in_optimizer),
        "optimizer_dtypes": _numel_by_dtype(in_optimizer),
        "teacher_tensors_in_optimizer": sum(id(p) in teacher_ids for p in in_optimizer),
        "trainable_student": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "student_dtypes": _numel_by_dtype(student.parameters()),
        "teacher_dtypes": _numel_by_dtype(teacher.parameters()) if teacher is not None else {},
        "teacher_requires_grad": sum(p.requires_grad for p in teacher.parameters()) if teacher is not None else 0,
        "student_head_tied": student.hf.get_output_embeddings().weight is student.hf.get_input_embeddings().weight,
        "student_lm_checkpointing": bool(getattr(lm, "gradient_checkpointing", False)),
        "student_training_mode": bool(lm.training),
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
    }


def _state_dtypes(trainer: Any) -> dict[str, int]:
    counts: Counter = Counter()
    for opt in trainer.optimizers:
        for state in opt.state.values():
            for key, value in state.items():
                if hasattr(value, "dtype") and value.ndim:
                    counts[f"{key}:{str(value.dtype).replace('torch.', '')}"] += value.numel()
    return dict(counts)


def worker(root: Path, stage: str, steps: int, strategy: str, precision: str) -> None:
    """One stage of the recipe through ``Runner``, with the probe added to its Trainer."""
    import mmkd.train.stage as stage_module
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import Runner

    out = root / f"probe-{stage}.json"
    probe = make_probe(out)
    build_stage = stage_module.build_stage

    def build_with_probe(*args: Any, **kwargs: Any) -> Any:
        trainer, module, datamodule = build_stage(*args, **kwargs)
        trainer.callbacks.insert(0, probe)  # before StepCheckpoint: a phase ends before the stage's last checkpoint
        return trainer, module, datamodule

    stage_module.build_stage = build_with_probe  # Runner.run_stage imports it from the module when a stage starts
    recipe = load_recipe(RECIPE, recipe_overrides(root, stage, steps, strategy, precision=precision))
    t0 = time.perf_counter()
    Runner(recipe, only_stage=stage, echo=lambda m: print(m, flush=True)).run()
    probe.checks["stage_process_s"] = round(time.perf_counter() - t0, 1)
    probe.write()


# ---- the report ----------------------------------------------------------------------------------------------------
def _logged_step_times(root: Path, stage: str) -> list[float]:
    path = root / "run" / "stages" / stage / "logs" / "metrics.csv"
    if not path.exists():
        return []
    return [float(r["perf/step_time_s"]) for r in csv.DictReader(path.open()) if r.get("perf/step_time_s")]


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def report(root: Path, stages: list[str], walls: dict[str, float]) -> str:
    rows = ["| stage | trains | tokens (student / teacher / answer) | peak RSS, process (GiB) | peak RSS, training "
            "(GiB) | step time, logged (s) | step, wall (s) | tokens/s | teacher fwd | student fwd | losses | "
            "backward | optimizer + rest |", "|" + " --- |" * 13]
    memory = ["| stage | models loaded | student fwd peak | teacher fwd peak | losses peak | backward peak | "
              "optimizer peak |", "|" + " --- |" * 7]
    notes = []
    for stage in stages:
        path = root / f"probe-{stage}.json"
        if not path.exists():
            rows.append(f"| {stage} | (failed, see the log) |" + " |" * 11)
            continue
        probe = json.loads(path.read_text())
        steps, checks = probe["steps"], probe["checks"]
        logged = _logged_step_times(root, stage)
        # The first step pays one-off costs (allocator growth, lazy initialisation): report the last one.
        last = steps[-1]
        wall = last["wall_s"]
        walls_per_step = [s["wall_s"] for s in steps]
        parts = {k: last.get(k + "_s", 0.0) for k in ("teacher_forward", "student_forward", "losses", "backward")}
        rest = wall - sum(parts.values())
        share = {k: f"{v / wall:.0%} ({v:.1f} s)" for k, v in {**parts, "rest": rest}.items()}
        peak_train = max(max(s.get(k, 0.0) for k in s if k.endswith("_peak_mib")) for s in steps)
        trained = f"{checks['trainable_student'] / 1e6:.1f}M"
        rows.append(
            f"| {stage} | {trained} | {last['tokens']:,} / {last['teacher_tokens']:,} / {last['answer_tokens']:,} | "
            f"{_gib(checks['process_peak_mib'])} | {_gib(peak_train)} | "
            f"{' / '.join(f'{t:.1f}' for t in logged) or '-'} | {' / '.join(f'{w:.1f}' for w in walls_per_step)} | "
            f"{last['tokens'] / wall:.0f} | {share['teacher_forward'] if last.get('teacher_tokens') else '-'} | "
            f"{share['student_forward']} | {share['losses']} | {share['backward']} | {share['rest']} |")
        memory.append(f"| {stage} | {_gib(checks['rss_models_loaded_mib'])} | "
                      + " | ".join(_gib(last.get(k + "_peak_mib", 0.0)) if last.get(k + "_peak_mib") else "-"
                                   for k in ("student_forward", "teacher_forward", "losses", "backward", "optimizer"))
                      + " |")
        notes.append(f"- {stage}: process {walls.get(stage, 0):.0f} s; optimizer {checks['optimizer_parameters']:,} "
                     f"parameters {checks['optimizer_dtypes']}, Adam states {checks.get('adam_state_dtypes')}; "
                     f"teacher tensors in the optimizer {checks['teacher_tensors_in_optimizer']}; student "
                     f"{checks['student_dtypes']}, teacher {checks['teacher_dtypes'] or '-'}; head tied "
                     f"{checks['student_head_tied']}; LM checkpointing flag {checks['student_lm_checkpointing']}, "
                     f"layer-0 MLP calls per step {last['layer0_calls']}; {checks['strategy']}, {checks['precision']}")
    return "\n".join(rows + ["", "Resident-memory peak per phase of the last step (GiB):", ""] + memory + [""]
                     + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer towers and LMs (real widths and vocabulary)")
    parser.add_argument("--tokens", type=int, default=None, help="student tokens per sample (default 2048; quick 1024)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in recipe order")
    parser.add_argument("--strategy", default="auto",
                        help="every stage's trainer.strategy ('recipe': keep the recipe's ZeRO presets)")
    parser.add_argument("--precision", default="bf16-mixed",
                        help="trainer.precision (the recipe's bf16-mixed; bf16-true: the same bf16 models without "
                             "autocast; under autocast SFT and DFT fail, see docs/performance.md)")
    parser.add_argument("--out", default=None, help="keep the folders and runs here (default: a temporary folder)")
    parser.add_argument("--build-only", action="store_true", help="write the folders and data, run nothing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.tokens or (1024 if args.quick else 2048)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mmkd-real-size-"))
    if args.worker:
        worker(root, args.worker, args.steps, args.strategy, args.precision)
        return
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        world = build_world(root, args.quick, tokens, samples=max(4, args.steps))
        print(f"world in {root}: {world} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.build_only:
            return
        stages = [s for s in args.stages.split(",") if s]
        walls: dict[str, float] = {}
        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        for stage in stages:
            t1 = time.perf_counter()
            cmd = [sys.executable, __file__, "--worker", stage, "--out", str(root), "--steps", str(args.steps),
                   "--strategy", args.strategy, "--precision", args.precision]
            print(f"== {stage}: {' '.join(cmd[1:])} (OMP_NUM_THREADS={threads})", flush=True)
            code = subprocess.call(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            walls[stage] = time.perf_counter() - t1
            if code:
                print(f"stage {stage} failed (exit {code}); later stages need it", flush=True)
                break
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end; OMP_NUM_THREADS={threads}; "
              f"{statistics.fmean(walls.values()) if walls else 0:.0f} s per stage process\n")
        print(report(root, stages, walls), flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
