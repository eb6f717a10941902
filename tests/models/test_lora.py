"""LoRA / QLoRA students (mmkd.models.LoRA): targets by part, what trains, merging, the adapters-off reference, and
bad settings as one-line recipe errors. The recipes end to end (resume, export): tests/train/test_lora_resume.py."""

import copy
from pathlib import Path

import pytest
import torch

from mmkd.cli import main
from mmkd.models import AdaptersOff, LoRA, LoRAStudent, MLLMStudent

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def student(tiny_assets):
    torch.manual_seed(0)
    return MLLMStudent(tiny_assets["student_vision"], tiny_assets["student_lm"], tokenizer=tiny_assets["tokenizer"])


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 5, 9, 14, 2, 7, 30, 11], [3, 8, 21, 4, 6, 12, 40, 2]])
    return ids, torch.ones_like(ids)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(*_ids())
        return out.logits(out.last_hidden)


def test_targets_by_name_regex_and_part(student):
    names = LoRA(target_modules=["q_proj", "v_proj"]).targets(student)
    assert names == sorted(f"model.language_model.layers.{i}.self_attn.{p}" for i in (0, 1)
                           for p in ("q_proj", "v_proj"))
    assert LoRA(target_modules=r".*layers\.1\.mlp\..*").targets(student) == [
        f"model.language_model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    # the vision tower has q_proj too; only the named parts are adapted; the LM head never is
    both = LoRA(target_modules=["q_proj"], parts=["vision_tower", "language_model"]).targets(student)
    assert len(both) == 4 and sum("vision_tower" in n for n in both) == 2
    assert LoRA(parts=["projector"]).targets(student) == ["model.multi_modal_projector.linear_1",
                                                          "model.multi_modal_projector.linear_2"]
    assert not [n for n in LoRA(parts=list(("vision_tower", "projector", "language_model"))).targets(student)
                if "lm_head" in n]
    with pytest.raises(ValueError, match="'qproj' matches no linear layer of language_model"):
        LoRA(target_modules=["qproj"]).targets(student)


def test_a_fresh_adapter_leaves_the_student_unchanged_and_trains_only_through_its_adapters(student, make_module):
    before = _logits(student)
    lora = LoRA(r=4, alpha=8, target_modules=["q_proj", "o_proj"])(student)
    assert isinstance(lora, LoRAStudent) and lora.adapter_parts() == ["language_model"]
    assert torch.equal(_logits(lora), before)  # B starts at zero
    module = make_module(lora, None, {"lm": 1.0}, train_parts=["projector", "language_model"])
    trainable = {n: p.numel() for n, p in lora.named_parameters() if p.requires_grad}
    adapters = {n: v for n, v in trainable.items() if ".lora_" in n}
    # rank 4 on q (64->64) and o (64->64) of 2 layers: 4 * (64 + 64) per A/B pair
    assert sum(adapters.values()) == 2 * 2 * 4 * (64 + 64)
    assert set(trainable) - set(adapters) == {f"hf.model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2)
                                              for w in ("weight", "bias")}  # the projector in full
    assert not lora.hf.model.language_model.embed_tokens.weight.requires_grad
    groups = module.named_trainable_groups()
    assert sum(p.numel() for _, p in groups["language_model"]) == sum(adapters.values())
    # the checkpoint holds exactly what trains
    state = module.state_dict()
    assert sorted(k[len("student."):] for k in state if k.startswith("student.")) == sorted(trainable)
    module.load_state_dict(state)  # strict: the frozen base may be absent


def test_merged_student_equals_the_adapted_one_and_saves_a_plain_folder(student, tmp_path):
    from transformers import AutoModelForImageTextToText

    lora = LoRA(r=4, alpha=8)(student)
    with torch.no_grad():
        for name, p in lora.hf.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    adapted = _logits(lora)
    merged = lora.merged()
    assert not isinstance(merged, LoRAStudent)
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=1e-5)
    assert torch.equal(_logits(lora), adapted)  # merging a copy leaves the student adapted
    lora.save_pretrained(tmp_path / "merged")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    ids, mask = _ids()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, merged.hf(input_ids=ids,
                                                                                      attention_mask=mask).logits)
    assert not [n for n, _ in plain.named_parameters() if "lora_" in n or "base_layer" in n]


def test_adapters_off_reference_equals_the_initial_student_without_a_copy(student, make_module, tiny_assets):
    """The reference a preference stage would use: the base with the adapters off equals the initial-student copy
    (PreferenceTask's ``reference: initial_student``) at step 0 and after training steps."""
    from mmkd.data import MultimodalCollator, ScienceQA
    from mmkd.objectives import answer_logprobs

    lora = LoRA(r=4, alpha=8, dropout=0.1)(student)
    initial = copy.deepcopy(lora).freeze()  # what reference: initial_student holds (a second copy)
    reference = AdaptersOff(lora).freeze()
    assert not list(reference.parameters())  # nothing of its own: no second copy
    data = ScienceQA(tiny_assets["sqa"], "train")
    batch = MultimodalCollator.for_models(lora, None, max_length=192)([data[i] for i in range(4)])
    kwargs = batch.inputs.kwargs()

    def logps(model):
        with torch.no_grad():
            return answer_logprobs(model(**kwargs), batch.labels, False)

    assert torch.equal(logps(reference), logps(initial))
    module = make_module(lora, None, {"lm": 1.0}, train_parts=["language_model"], optimizer={"lr": 1e-2})
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(2):
        module.compute_losses(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert lora.training  # the reference pass left the student's mode alone
    assert torch.equal(logps(reference), logps(initial))
    assert not torch.equal(logps(lora.eval()), logps(initial))  # the adapters did train


def test_qlora_stores_the_adapted_layers_in_4bit_and_merges_into_a_float_student(student, tmp_path):
    import bitsandbytes as bnb

    qlora = LoRA(r=4, alpha=8, quantize="4bit")(student)
    base = qlora.hf.model.language_model.layers[0].self_attn.q_proj.get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_state.quant_type == "nf4"
    assert isinstance(qlora.hf.model.multi_modal_projector.linear_1, torch.nn.Linear)  # not adapted: not quantized
    assert not isinstance(qlora.hf.model.multi_modal_projector.linear_1, bnb.nn.Linear4bit)
    assert qlora.hf.lm_head.weight.dtype == torch.float32
    qlora.save_pretrained(tmp_path / "merged")
    merged = MLLMStudent.from_pretrained(str(tmp_path / "merged"))
    assert not [m for m in merged.hf.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # B = 0: the merged student is the student before quantisation again, exactly (the transform reloaded a copy)
    assert torch.equal(_logits(merged), _logits(student))
    assert not torch.equal(_logits(qlora), _logits(student))  # the 4-bit layers compute with rounded weights


def _tiny(assets: dict, run_dir: Path) -> list[str]:
    """recipes/tiny/llava_kd_lora.yaml with the tiny assets' models and data."""
    import json

    sqa = {"class_path": "mmkd.data.ScienceQA", "init_args": {"root": assets["sqa"], "split": "train"}}
    args = ["--run-dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--teacher", json.dumps({"class_path": "mmkd.models.LlavaModel", "init_args": {"path": assets["teacher"]}}),
            "--student", json.dumps({"class_path": "mmkd.models.MLLMStudent", "init_args": {
                "vision": assets["student_vision"], "language_model": assets["student_lm"],
                "tokenizer": assets["tokenizer"]}})]
    for stage in ("dpt", "sft", "dft"):
        args += [f"--stages.{stage}.data", json.dumps(sqa), f"--stages.{stage}.trainer.max_steps", "1"]
    return args


@pytest.mark.parametrize("override, message", [
    (["--stages.sft.student_transform.init_args.r", "0"], "stages.sft.student_transform: r=0: expected a rank >= 1"),
    (["--stages.dft.student_transform.init_args.target_modules", "[q_proj, qproj]"],
     "stages.dft.student_transform: target_modules: 'qproj' matches no linear layer of language_model (expected one "
     "of down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)"),
    (["--stages.sft.student_transform.init_args.parts", "[router]"],
     "stages.sft.student_transform: parts: cannot put adapters on 'router'"),
    (["--stages.sft.student_transform.init_args.quantize", "8bit"],
     "stages.sft.student_transform: quantize='8bit': expected 4bit or null"),
])
def test_bad_lora_settings_are_one_line_recipe_errors(override, message, tiny_assets, tmp_path, capsys):
    """Found before anything is written: values when the recipe loads, targets against the first stage's student
    (a typo in the last stage ends the command before the first stage runs)."""
    run = tmp_path / "run"
    code = main(["fit", str(ROOT / "recipes" / "tiny" / "llava_kd_lora.yaml"), *_tiny(tiny_assets, run), *override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"mmkd: error: {message}"), err[-1]
    assert not (run / "manifest.json").exists()




def test_a_preference_stage_takes_the_base_with_adapters_off_as_its_reference(student, make_module, tiny_assets):
    from mmkd.data import MultimodalCollator, ScienceQA
    from mmkd.objectives import build_objective
    from mmkd.tasks import build_task

    lora = LoRA(r=4, alpha=8)(student)
    task = build_task("preference", {"reference": "base_adapters_off"}, {"dpo": build_objective("dpo", {})},
                      student=lora)
    assert isinstance(task.reference, AdaptersOff) and not list(task.reference.parameters())
    data = ScienceQA(tiny_assets["sqa"], "train")
    batch = MultimodalCollator.for_models(lora, None, max_length=192)([data[i] for i in range(2)])
    make_module(lora, None, {"lm": 1.0}, train_parts=["language_model"])  # adapters only: the base stays put
    with torch.no_grad():
        task.reference(**batch.inputs.kwargs())
    make_module(lora, None, {"lm": 1.0}, train_parts=["projector", "language_model"])  # the projector in full
    with pytest.raises(ValueError, match="base_adapters_off needs every trained part adapted"):
        task.reference(**batch.inputs.kwargs())
