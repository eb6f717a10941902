"""Export a trained student as a complete, self-contained Hugging Face folder with a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mmkd.models.errors import check_folder
from mmkd.models.mllm import ImageTextModel


def export_student(
    student_dir: str,
    out_dir: str,
    *,
    recipe: dict | None = None,
    metrics: dict | None = None,
    teacher: str | None = None,
) -> Path:
    """Write the student in ``student_dir`` to ``out_dir`` as a plain transformers folder plus model card.

    The folder holds safetensors weights, ``config.json`` (router logits off for MoE students, so transformers'
    Llava forward and generate work), ``generation_config.json``, the processor (tokenizer with chat template
    and ``<image>`` token, image processor, patch size and feature strategy, from which transformers derives the
    image sequence length) and ``README.md``. It loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``
    and ``pipeline("image-text-to-text")`` without mmkd.

    Args:
        student_dir: Folder written by a student's ``save_pretrained`` (any image-text family).
        out_dir: Destination folder (created; existing files with the same names are replaced).
        recipe: The resolved recipe, named in the card (``name`` or ``run_dir``) and stored as ``mmkd_recipe.yaml``.
        metrics: Evaluation results to list in the card, ``{name: value}`` or ``{stage: {name: value}}``.
        teacher: Teacher id or path, named in the card.

    Returns:
        ``Path(out_dir)``.
    """
    check_folder(student_dir, key="student_dir", what="student")
    student = ImageTextModel.from_pretrained(student_dir)
    text_cfg = student.hf.config.text_config
    if getattr(text_cfg, "output_router_logits", False):
        text_cfg.output_router_logits = False  # Llava's output class cannot carry router logits
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    if recipe is not None:
        (out / "mmkd_recipe.yaml").write_text(yaml.safe_dump(_plain(recipe), sort_keys=False))
    (out / "README.md").write_text(model_card(student, recipe=recipe, metrics=metrics, teacher=teacher))
    return out


def export_adapter(student: Any, out_dir: str) -> Path:
    """Write a LoRA student's adapters alone to ``out_dir`` in peft's format (``adapter_config.json`` naming the base
    folder, ``adapter_model.safetensors``).

    Args:
        student: A :class:`mmkd.models.LoRAStudent` holding the trained adapters.
        out_dir: Destination folder (created).

    Returns:
        ``Path(out_dir)``.
    """
    save = getattr(student, "save_adapter", None)
    if not callable(save):
        raise ValueError(f"--adapter-only: a {type(student).__name__} has no adapters (use mmkd.models.LoRA as the "
                         "stage's student_transform)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save(out)
    return out


def _plain(obj: Any) -> Any:
    """Recipe values as YAML-safe builtins (paths and other objects become strings)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _metric_rows(metrics: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += [(str(key), str(k), _fmt(v)) for k, v in value.items() if not isinstance(v, dict)]
        else:
            rows.append(("", str(key), _fmt(value)))
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(
    student: ImageTextModel, *, recipe: dict | None = None, metrics: dict | None = None, teacher: str | None = None
) -> str:
    """Markdown model card with a Hugging Face metadata header."""
    cfg = student.hf.config
    text_cfg = cfg.text_config
    recipe_name = None
    if recipe:
        recipe_name = recipe.get("name") or recipe.get("recipe") or os.path.basename(str(recipe.get("run_dir", "")))
    moe = getattr(text_cfg, "num_experts", 0)
    experts = f", {moe} experts, top-{text_cfg.num_experts_per_tok}" if moe else ""
    sizes = sum(p.numel() for p in student.hf.parameters())
    meta = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": ["mmkd", "distillation"]}
    if teacher and not os.path.exists(teacher):
        meta["base_model"] = teacher
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", "# Distilled multimodal student", ""]
    lines += [
        "Distilled with mmkd from a larger vision-language teacher.",
        "",
        f"- Architecture: `{cfg.model_type}` (vision `{cfg.vision_config.model_type}`, "
        f"language model `{text_cfg.model_type}`{experts})",
        f"- Parameters: {sizes:,}",
        f"- Visual tokens per image: {student.num_image_tokens}",
        f"- Teacher: `{teacher}`" if teacher else "- Teacher: not recorded",
        f"- Recipe: `{recipe_name}`" + (" (full recipe in `mmkd_recipe.yaml`)" if recipe else "")
        if recipe_name
        else "- Recipe: not recorded",
    ]
    if recipe and isinstance(recipe.get("stages"), dict):
        lines.append(f"- Stages: {', '.join(map(str, recipe['stages']))}")
    lines += ["", "## Evaluation", ""]
    rows = _metric_rows(metrics or {})
    if rows:
        lines += ["| stage | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {s} | {m} | {v} |" for s, m, v in rows]
    else:
        lines.append("No evaluation results were found in the run.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'pipe = pipeline("image-text-to-text", model="PATH_TO_THIS_FOLDER")',
        f'pipe(images=image, text="{student.image_token}\\nDescribe the image.", max_new_tokens=32)',
        "```",
        "",
    ]
    if metrics:
        lines += ["<!-- mmkd-metrics", json.dumps(metrics, default=str), "-->", ""]
    return "\n".join(lines)
