"""LoRA and QLoRA students through peft: low-rank adapters on chosen parts, merged when the student is saved.

``LoRA`` is a ``student_transform``: it puts peft's LoRA layers on the linear layers of the named parts of an image-text
student and returns a :class:`LoRAStudent`, the same model behind the same protocol (``parts()``, ``freeze()``,
``generate``, ``forward`` returning ``ModelOutput``). A part with adapters trains through them when a stage lists it
in ``train``; a listed part without adapters trains in full; an unlisted part is frozen, adapters included.

Saving writes the merged model (``merge_and_unload``): a plain transformers folder, so the next stage, ``mmkd export``
and transformers read it as any other student. ``save_adapter`` writes peft's adapter folder alone. A stage checkpoint
holds only the student's trainable tensors (the adapters and any part trained in full): the base is the stage's
``init_from``, rebuilt before a resume.

QLoRA (``quantize: 4bit``) stores the linear layers of the adapted parts in 4-bit NF4 through bitsandbytes, with the
adapters, the other parts and the LM head in the compute dtype. Merging adds the adapters to the full-precision weights
the 4-bit layers were quantized from (peft would quantize the sum again and round small updates away), so the saved
student is a plain floating-point folder again.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmkd.contract import VIEW_PARTS
from mmkd.models.mllm import ImageTextModel

__all__ = ["LORA_PARTS", "AdaptersOff", "LoRA", "LoRAStudent", "linear_layers"]

LORA_PARTS = ("vision_tower", "projector", "language_model")
ALL_LINEAR = "all-linear"


def linear_layers(student: ImageTextModel) -> dict[str, str]:
    """The linear layers LoRA can adapt: module name -> part (``vision_tower``, ``projector``, ``language_model``).

    A layer that already carries adapters is listed by its own name (not its ``base_layer``); the LM head is left out
    (mmkd computes logits from the head's weight, which an adapter would bypass), as are empty layers (the zero-width
    shared expert of an upcycled MoE).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    home = {id(p): part for part, params in ImageTextModel.parts(student).items() if part not in VIEW_PARTS
            for p in params}
    head = student.hf.get_output_embeddings()
    out: dict[str, str] = {}
    tuned: list[str] = []
    for name, module in student.hf.named_modules():
        if any(name.startswith(t + ".") for t in tuned) or module is head:
            continue
        if isinstance(module, BaseTunerLayer):
            tuned.append(name)
            module = module.get_base_layer()
        elif not isinstance(module, nn.Linear):
            continue
        if module.weight.numel() == 0:
            continue
        part = home.get(id(module.weight))
        if part in LORA_PARTS:
            out[name] = part
    return out


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every peft adapter tensor in ``model`` (``lora_A``, ``lora_B``, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for layer in module.adapter_layer_names:
                out += [(f"{name}.{layer}.{n}", p) for n, p in getattr(module, layer).named_parameters()]
    return out


class LoRA:
    """``student_transform``: LoRA adapters (peft) on the linear layers of the named parts of the student.

    Args:
        r: Rank of each adapter (>= 1).
        alpha: LoRA's scaling numerator: the update is ``alpha / r * B @ A``.
        dropout: Dropout on the adapters' input, in [0, 1).
        target_modules: ``all-linear`` (every linear layer of ``parts`` but the LM head), a list of module names (a
            name matches every module whose path ends with it, as in peft: ``q_proj`` matches
            ``model.language_model.layers.0.self_attn.q_proj``), or one regular expression matched against the whole
            module path. Only layers inside ``parts`` are adapted; a name that matches none of them is an error.
        parts: The student parts that get adapters: ``language_model``, ``projector``, ``vision_tower``.
        quantize: ``4bit`` for QLoRA: the adapted parts' linear layers are stored in NF4 with double quantisation
            (bitsandbytes), computed in the student's dtype; None keeps them as they are.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = ALL_LINEAR,
        parts: list[str] | tuple[str, ...] = ("language_model",),
        quantize: str | None = None,
    ) -> None:
        if r < 1:
            raise ValueError(f"r={r}: expected a rank >= 1")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha}: expected a scaling > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: expected a probability in [0, 1)")
        if not parts:
            raise ValueError(f"parts: expected at least one of {', '.join(LORA_PARTS)}")
        for part in parts:
            if part not in LORA_PARTS:
                raise ValueError(f"parts: cannot put adapters on {part!r} (expected {', '.join(LORA_PARTS)})")
        if isinstance(target_modules, str):
            if target_modules != ALL_LINEAR:
                try:
                    re.compile(target_modules)
                except re.error as err:
                    raise ValueError(f"target_modules={target_modules!r}: not a regular expression ({err})") from None
        elif not target_modules:
            raise ValueError(f"target_modules: expected {ALL_LINEAR}, module names or a regular expression, got []")
        if quantize not in (None, "4bit"):
            raise ValueError(f"quantize={quantize!r}: expected 4bit or null")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.parts = tuple(parts)
        self.quantize = quantize

    def targets(self, student: ImageTextModel) -> list[str]:
        """The full module names this transform adapts in ``student``.

        Raises:
            ValueError: A module name (or the expression) that matches no linear layer of ``parts``.
        """
        layers = {n: p for n, p in linear_layers(student).items() if p in self.parts}
        where = "/".join(self.parts)
        if self.target_modules == ALL_LINEAR:
            if not layers:
                raise ValueError(f"target_modules: {where} has no linear layer to adapt")
            return sorted(layers)
        if isinstance(self.target_modules, str):
            chosen = [n for n in layers if re.fullmatch(self.target_modules, n)]
            if not chosen:
                raise ValueError(f"target_modules={self.target_modules!r}: the expression matches no linear layer of "
                                 f"{where} (their names end in {_short_names(layers)})")
            return sorted(chosen)
        chosen = set()
        for target in self.target_modules:
            found = [n for n in layers if n == target or n.endswith("." + target)]
            if not found:
                raise ValueError(f"target_modules: {target!r} matches no linear layer of {where} (expected one of "
                                 f"{_short_names(layers)})")
            chosen.update(found)
        return sorted(chosen)

    def check(self, student: ImageTextModel) -> None:
        """Raise the one-line ``ValueError`` of :meth:`targets` without changing ``student`` (the runner's pre-flight
        check of a later stage against the first stage's student, which has the same layers)."""
        if not isinstance(student, ImageTextModel):
            raise ValueError(f"LoRA applies to image-text students (mmkd.models.ImageTextModel), not "
                             f"{type(student).__name__}")
        self.targets(student)

    def config(self, targets: Sequence[str]) -> Any:
        """peft's ``LoraConfig`` for these targets."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(targets),
                          bias="none")

    def __call__(self, student: ImageTextModel) -> LoRAStudent:
        self.check(student)
        targets = self.targets(student)
        base = None
        if self.quantize is not None:
            student, base = _quantized(student, [n for n, p in linear_layers(student).items() if p in self.parts])
        return LoRAStudent(student, self.config(targets), full_precision_base=base)


def _checkpointing(hf: nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers >= 5 renamed the flag)."""
    flag = "is_activation_checkpointing" if hasattr(type(hf), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(hf, flag, False))


def _short_names(layers: dict[str, str]) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n in layers})
    return ", ".join(names) if names else "none"


def _quantized(student: ImageTextModel, layers: list[str]) -> tuple[ImageTextModel, str]:
    """``student`` reloaded with ``layers`` in 4-bit NF4 (bitsandbytes) and everything else as it was, and the folder
    holding its full-precision weights (the base its adapters are merged into)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    # transformers reads these as patterns anchored at a module boundary: the escaped full names keep exactly the
    # layers outside the adapted parts (and the LM head) in the compute dtype.
    keep = [re.escape(n) for n, m in student.hf.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=student.compute_dtype, llm_int8_skip_modules=keep)
    checkpointing = _checkpointing(student.hf)
    folder = tempfile.mkdtemp(prefix="mmkd-qlora-base-")
    student.hf.save_pretrained(folder)
    try:
        hf = AutoModelForImageTextToText.from_pretrained(
            folder, quantization_config=qcfg, dtype=student.compute_dtype,
            device_map="auto" if torch.cuda.is_available() else "cpu")
    except Exception as err:  # bitsandbytes reports a missing backend in many types
        shutil.rmtree(folder, ignore_errors=True)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"quantize=4bit: bitsandbytes cannot load 4-bit layers on this machine ({first}); "
                         "set quantize: null for LoRA without quantisation") from None
    out = ImageTextModel(hf, student.processor, dtype=student.compute_dtype, gradient_checkpointing=checkpointing)
    out.vocab_limit, out.path, out.quantize = student.vocab_limit, student.path, "4bit"
    return out, folder


# ---- checkpoints hold only what trains ---------------------------------------------------------------------------
def _stored(module: LoRAStudent) -> set[str]:
    """Names (relative to the student) of the tensors a checkpoint holds: trainable parameters and adapters."""
    keep = {f"hf.{n}" for n, _ in adapter_parameters(module.hf)}
    keep |= {n for n, p in module.named_parameters() if p.requires_grad}
    return keep


def _drop_frozen(module: LoRAStudent, state: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    keep = _stored(module)
    for key in [k for k in state if k.startswith(prefix)]:
        if key[len(prefix):] not in keep:
            del state[key]


def _note_prefix(module: LoRAStudent, state: Any, prefix: str, *args: Any) -> None:
    module._load_prefix = prefix


def _allow_frozen(module: LoRAStudent, incompatible: Any) -> None:
    # The base is the stage's init_from, rebuilt before loading: only the stored tensors must be in the state.
    prefix = getattr(module, "_load_prefix", "")
    keep = _stored(module)
    names = {prefix + n for n, _ in module.named_parameters()} | {prefix + n for n, _ in module.named_buffers()}
    stored = {prefix + n for n in keep}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in names or k in stored]


class LoRAStudent(ImageTextModel):
    """An image-text student whose chosen linear layers carry peft LoRA adapters (built by :class:`LoRA`).

    The transformers model (``.hf``) holds peft's LoRA layers in place; the peft model around it is kept for merging,
    saving the adapter and switching the adapters off. Everything else is the student's own behaviour.

    Args:
        student: The student to adapt (its modules are changed in place).
        config: peft's ``LoraConfig`` (full module names as targets).
        full_precision_base: QLoRA: a folder with the student's weights before quantisation, which :meth:`merged`
            merges the adapters into (removed with this object).
    """

    def __init__(self, student: ImageTextModel, config: Any, *, full_precision_base: str | None = None) -> None:
        from peft import get_peft_model

        if student._routers is not None:
            student._routers.remove()  # this model attaches its own router-loss hooks to the same gates
        peft_model = get_peft_model(student.hf, config)
        checkpointing = _checkpointing(student.hf)
        super().__init__(student.hf, student.processor, dtype=student.compute_dtype,
                         gradient_checkpointing=checkpointing)
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: its parameters are self.hf's
        self.vocab_limit, self.path, self.quantize = student.vocab_limit, student.path, student.quantize
        self.lora_config = config
        self.full_precision_base = full_precision_base
        if full_precision_base is not None:
            weakref.finalize(self, shutil.rmtree, full_precision_base, True)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_note_prefix)
        self.register_load_state_dict_post_hook(_allow_frozen)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **options: Any) -> ImageTextModel:
        """A saved LoRA student is a merged, plain folder: it loads as an :class:`ImageTextModel`."""
        return ImageTextModel.from_pretrained(folder, **options)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """As :meth:`ImageTextModel.parts`, except that a part with adapters is its adapters: training it trains them
        and leaves its base weights frozen."""
        base = super().parts()
        adapters = {id(p) for _, p in adapter_parameters(self.hf)}
        home = {id(p): part for part, params in base.items() if part not in VIEW_PARTS for p in params}
        adapted = {home[i] for i in adapters if i in home}
        out = {}
        for part, params in base.items():
            kept = [p for p in params if id(p) in adapters or home.get(id(p)) not in adapted]
            if kept:
                out[part] = kept
        return out

    def adapter_parts(self) -> list[str]:
        """The parts that carry adapters."""
        home = {id(p): part for part, params in super().parts().items() if part not in VIEW_PARTS for p in params}
        return sorted({home[id(p)] for _, p in adapter_parameters(self.hf) if id(p) in home})

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Inside, the student computes with its base weights alone (peft's ``disable_adapter``)."""
        with self.peft_model.disable_adapter():
            yield

    def merged(self) -> ImageTextModel:
        """A merged copy of the student: base weights plus adapters, plain transformers modules (4-bit layers
        dequantized to the compute dtype). The student itself is left as it is."""
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        if self.full_precision_base is not None:
            # QLoRA: peft merges into 4-bit layers by quantizing the sum again, which rounds small updates away; the
            # adapters go into the full-precision base instead (what the 4-bit layers were quantized from).
            from transformers import AutoModelForImageTextToText

            plain = AutoModelForImageTextToText.from_pretrained(self.full_precision_base, dtype=self.compute_dtype)
            target = get_peft_model(plain, copy.deepcopy(self.lora_config))
            set_peft_model_state_dict(target, get_peft_model_state_dict(self.peft_model))
            hf = target.merge_and_unload()
            hf.generation_config = copy.deepcopy(self.hf.generation_config)
        else:
            hf = copy.deepcopy(self.peft_model).merge_and_unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in hf.__dict__:
                delattr(hf, attr)
        out = ImageTextModel(hf, self.processor, dtype=self.compute_dtype)
        out.vocab_limit, out.path = self.vocab_limit, self.path
        return out

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the merged student as a plain transformers folder (weights, config, processor)."""
        self.merged().save_pretrained(out_dir)

    def save_adapter(self, out_dir: str | os.PathLike) -> None:
        """Write the adapters alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``);
        ``PeftModel.from_pretrained(base, out_dir)`` puts them back on the base (the stage's ``init_from``)."""
        self.peft_model.save_pretrained(str(out_dir))


class AdaptersOff(nn.Module):
    """A LoRA student's base (its adapters switched off) as a frozen model that shares the student's weights.

    A preference stage's reference equal to the stage's starting student without a second copy: the base weights are
    frozen and the adapters start at zero, so the base is the starting student at every step. It has no parameters of
    its own; ``freeze()`` and ``train()`` leave the student alone, and each forward runs it in eval mode, without
    gradients.

    Args:
        student: The LoRA student.
    """

    def __init__(self, student: LoRAStudent) -> None:
        super().__init__()
        if not isinstance(student, LoRAStudent):
            raise ValueError("a reference with the adapters off needs a LoRA student (student_transform: "
                             f"mmkd.models.LoRA), got {type(student).__name__}")
        object.__setattr__(self, "student", student)  # not a submodule: nothing here to train, save or move

    def freeze(self) -> AdaptersOff:
        return self

    def train(self, mode: bool = True) -> AdaptersOff:
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        student = self.student
        trained = [n for n, p in student.named_parameters() if p.requires_grad and "lora_" not in n]
        if trained:  # the base would move with the training: it would not stay the starting student
            raise ValueError(f"reference: base_adapters_off needs every trained part adapted (LoRA parts), but "
                             f"{trained[0]} trains in full; adapt that part or use reference: initial_student")
        training = student.training
        student.train(False)
        try:
            with torch.no_grad(), student.adapters_disabled():
                return student(*args, **kwargs)
        finally:
            student.train(training)
