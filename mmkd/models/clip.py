"""CLIP teachers and students through open_clip (``create_model`` with its tokenizer and preprocessing)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmkd.contract import CLIPOutput
from mmkd.models.errors import ModelNotFoundError, load_or_explain
from mmkd.models.loading import resolve_dtype

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def _resolve_arch(arch: str) -> tuple[str, dict[str, Any] | None]:
    """Map ``arch`` to an open_clip model name; returns ``(name, model_cfg or None)``.

    A folder becomes ``local-dir:``; a ``.json`` model config file is registered with ``add_model_config``
    (open_clip's own mechanism for custom architectures) under its file stem.
    """
    import open_clip

    path = Path(os.path.expanduser(arch))
    if arch.startswith(("local-dir:", "hf-hub:")):
        name = arch
    elif path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ModelNotFoundError(
                f"arch={arch!r}: folder lacks {CONFIG_NAME} (expected a folder written by CLIPModel.save_pretrained)",
                path=arch,
                key="arch",
            )
        name = f"local-dir:{path}"
    elif arch.endswith(".json"):
        if not path.is_file():
            raise ModelNotFoundError(f"arch={arch!r}: model config file not found", path=arch, key="arch")
        open_clip.add_model_config(str(path))
        return path.stem, json.loads(path.read_text())
    else:
        name = arch
    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:") :]) / CONFIG_NAME).read_text())
        return name, cfg.get("model_cfg", cfg)
    return name, open_clip.get_model_config(name)


class CLIPModel(nn.Module):
    """An open_clip CLIP model (teacher or student) returning :class:`CLIPOutput`.

    Args:
        arch: open_clip architecture (``ViT-B-32``), a folder written by :meth:`save_pretrained`,
            ``local-dir:DIR``, ``hf-hub:ORG/NAME``, or a ``.json`` open_clip model config (custom/tiny models).
        pretrained: open_clip pretrained tag (``laion2b_s34b_b79k``) or checkpoint file; None: random init.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
    """

    def __init__(self, arch: str, pretrained: str | None = None, *, dtype: str = "float32") -> None:
        super().__init__()
        import open_clip

        name, model_cfg = _resolve_arch(arch)
        if model_cfg is None and not name.startswith("hf-hub:"):
            raise ModelNotFoundError(
                f"arch={arch!r}: unknown open_clip architecture (see open_clip.list_models(), or pass a folder or "
                ".json config)",
                path=arch,
                key="arch",
            )
        if (
            pretrained
            and not os.path.isfile(os.path.expanduser(pretrained))
            and (pretrained.startswith((".", "/", "~")) or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")))
        ):
            raise ModelNotFoundError(f"pretrained={pretrained!r}: checkpoint file not found", path=pretrained)
        self.arch = arch
        self.model_cfg = model_cfg
        self.model = load_or_explain(
            lambda: open_clip.create_model(name, pretrained=pretrained),
            pretrained or arch,
            key="pretrained" if pretrained else "arch",
            what="open_clip model",
            check=False,  # folders and files were checked above, in open_clip's own layout
        )
        self.model.to(resolve_dtype(dtype))
        self.compute_dtype = resolve_dtype(dtype)
        self.preprocess = open_clip.image_transform(
            self.model.visual.image_size,
            is_train=False,
            mean=getattr(self.model.visual, "image_mean", None),
            std=getattr(self.model.visual, "image_std", None),
        )
        self.tokenizer = open_clip.get_tokenizer(name)
        self._frozen = False

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: str = "float32") -> CLIPModel:
        """Reload a model written by :meth:`save_pretrained`."""
        return cls(str(folder), dtype=dtype)

    @property
    def embed_dim(self) -> int:
        """Width of the image and text embeddings."""
        visual = self.model.visual
        for attr in ("embed_dim", "output_dim"):
            value = getattr(visual, attr, None)
            if isinstance(value, int):
                return value
        proj = self.model.text_projection
        return int(proj.shape[-1] if isinstance(proj, Tensor) else proj.out_features)

    def forward(self, images: Tensor, text_tokens: Tensor) -> CLIPOutput:
        """Embed a batch.

        Args:
            images: ``(B, 3, H, W)`` preprocessed images.
            text_tokens: ``(B, L)`` token ids from :meth:`tokenize`.

        Returns:
            Unnormalised ``image_embeds (B, D)``, ``text_embeds (B, D)`` and the exponentiated logit scale.
        """
        image = self.model.encode_image(images.to(self.compute_dtype), normalize=False)
        text = self.model.encode_text(text_tokens, normalize=False)
        return CLIPOutput(image_embeds=image, text_embeds=text, logit_scale=self.model.logit_scale.exp())

    def tokenize(self, texts: list[str]) -> Tensor:
        """``(B, context_length)`` token ids with open_clip's tokenizer for this model."""
        return self.tokenizer(texts)

    def preprocess_images(self, images: list[Image.Image]) -> Tensor:
        """PIL images to ``(N, 3, H, W)`` with open_clip's eval transform."""
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """``vision_tower`` (``visual.*``), ``text_tower`` (the rest) and ``logit_scale``."""
        out: dict[str, list[nn.Parameter]] = {"vision_tower": [], "text_tower": [], "logit_scale": []}
        for name, p in self.model.named_parameters():
            key = (
                "vision_tower"
                if name.startswith("visual.")
                else "logit_scale"
                if name.startswith("logit_")
                else ("text_tower")
            )
            out[key].append(p)
        return {k: v for k, v in out.items() if v}

    def freeze(self) -> CLIPModel:
        """Eval mode and no gradients, kept even if ``train()`` is called later."""
        self._frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> CLIPModel:
        return super().train(mode and not self._frozen)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` (open_clip's ``local-dir:`` layout)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        visual = self.model.visual
        preprocess = {
            "mean": list(getattr(visual, "image_mean", None) or ()),
            "std": list(getattr(visual, "image_std", None) or ()),
        }
        preprocess = {k: v for k, v in preprocess.items() if v}
        (out / CONFIG_NAME).write_text(
            json.dumps({"model_cfg": self.model_cfg, "preprocess_cfg": preprocess}, indent=2)
        )
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME))


def load_clip_state(folder: str) -> dict[str, Tensor]:
    """The raw open_clip state dict of a saved folder."""
    return load_file(os.path.join(folder, WEIGHTS_NAME))
