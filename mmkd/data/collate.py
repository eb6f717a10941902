"""Collate records into the batch of docs/architecture.md: chat template, visual-token expansion, answer-only labels.

Labels come from the chat template itself: for every assistant turn ``i`` the template is rendered up to the
generation prompt (``messages[:i]`` + ``add_generation_prompt``) and through the turn (``messages[:i+1]``); the
characters between the two (without trailing whitespace) are the answer, end-of-turn token included. The whole
conversation is tokenized once, as the model's own processor would, and a token is labelled when its character
span overlaps an answer span. Every ``<image>`` token is then expanded to ``num_image_tokens`` copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mmkd.data.records import IMAGE_PLACEHOLDER, Record
from mmkd.data.tokenizer import CHAT_TEMPLATE

IGNORE_INDEX = -100
Overflow = Literal["truncate", "skip"]

# What a training batch holds when the collator dropped every sample of it (too long, unreadable): this one tiny
# text-only sample, flagged ``batch["standin"]``, whose loss the training step multiplies by 0. Every rank then
# still runs a forward and backward through the same modules (data-parallel strategies need that; a rank that
# skipped its step would leave the others waiting), and the gradient is what skipping would have given.
STANDIN_RECORD: dict[str, Any] = {
    "id": "mmkd-standin",
    "images": [],
    "messages": [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}],
    "chosen": ".",
    "rejected": ",",
}


@dataclass
class TeacherSide:
    """What the teacher's inputs are built from when they differ from the student's.

    Attributes:
        tokenizer: The teacher's tokenizer (same vocabulary as the student's for token-level distillation).
        image_processor: ``list[Image] -> (N, 3, H, W)`` pixel values, or a dict of image inputs
            (``pixel_values``, ``image_sizes``, ...), for the teacher.
        num_image_tokens: Visual tokens per image in the teacher's sequence (nominal, for any-resolution ones).
        image_token: The teacher's image placeholder token.
        max_length: The teacher's maximum length; default: the student's plus the sample's extra visual tokens.
        image_token_count: ``Image -> int``: visual tokens of that image, for teachers whose count depends on
            the image (any-resolution tiling); default: ``num_image_tokens`` for every image.
    """

    tokenizer: PreTrainedTokenizerBase
    image_processor: Callable[[list[Image.Image]], Tensor | dict[str, Tensor]]
    num_image_tokens: int
    image_token: str = IMAGE_PLACEHOLDER
    max_length: int | None = None
    image_token_count: Callable[[Image.Image], int] | None = None

    @classmethod
    def from_model(cls, model: Any) -> TeacherSide:
        """From a model exposing ``tokenizer``, ``image_inputs`` (or ``preprocess_images``), ``num_image_tokens``,
        ``image_token`` and optionally ``image_token_count`` (per-image counts of any-resolution families)."""
        return cls(model.tokenizer, _image_fn(model), model.num_image_tokens, model.image_token,
                   image_token_count=getattr(model, "image_token_count", None))


class _Side:
    """Tokenization of one side (student or teacher): template, image token, padding id, special prefix."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str,
        num_image_tokens: int,
        max_length: int | None,
        image_token_count: Callable[[Image.Image], int] | None = None,
    ):
        self.tok = tokenizer
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length  # None: the student's plus this sample's extra visual tokens (teacher only)
        self.image_token_count = image_token_count
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        ids = tokenizer(image_token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"tokenizer {name}: '{image_token}' is {len(ids)} tokens; expected one special token")
        self.image_token_id = ids[0]
        # Without a chat template of its own the tokenizer gets mmkd's default (docs/data.md).
        self.template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        # Tokens the tokenizer adds in front of a text (e.g. Llama's BOS) that a template may not write itself.
        with_sp = tokenizer("x", add_special_tokens=True).input_ids
        plain = tokenizer("x", add_special_tokens=False).input_ids
        self.prefix = with_sp[: len(with_sp) - len(plain)] if with_sp[-len(plain) :] == plain else []
        self.prefix_text = tokenizer.decode(self.prefix) if self.prefix else ""
        self.name = name

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _tokenize(self, text: str, with_offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=with_offsets)
        ids = list(enc.input_ids)
        offsets = [tuple(o) for o in enc["offset_mapping"]] if with_offsets else [(0, 0)] * len(ids)
        if self.prefix and not text.startswith(self.prefix_text):
            ids = self.prefix + ids
            offsets = [(0, 0)] * len(self.prefix) + offsets
        return ids, offsets

    def _messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        token = self.image_token
        if token == IMAGE_PLACEHOLDER:
            return messages
        return [
            m
            if m["role"] == "assistant"
            else {**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, self.image_token)}
            for m in messages
        ]

    def counts(self, images: Sequence[Image.Image]) -> list[int]:
        """Visual tokens per image on this side."""
        if self.image_token_count is None:
            return [self.num_image_tokens] * len(images)
        return [int(self.image_token_count(im)) for im in images]

    def _expand(self, ids: list[int], labels: list[int], counts: list[int], rid: str) -> tuple[list[int], list[int]]:
        found, n_images = ids.count(self.image_token_id), len(counts)
        if found != n_images:
            raise ValueError(
                f"record '{rid}': {found} '{self.image_token}' tokens after templating but {n_images} images"
            )
        if not n_images:
            return ids, labels
        out_ids: list[int] = []
        out_labels: list[int] = []
        image = 0
        for i, lab in zip(ids, labels):
            if i == self.image_token_id:
                out_ids.extend([i] * counts[image])
                out_labels.extend([IGNORE_INDEX] * counts[image])
                image += 1
            else:
                out_ids.append(i)
                out_labels.append(lab)
        return out_ids, out_labels

    def encode_train(self, messages: list[dict[str, str]], counts: list[int], rid: str) -> tuple[list[int], list[int]]:
        """Untruncated ``(input_ids, labels)`` of a whole conversation."""
        messages = self._messages(messages)
        full = self.render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], True)
            through = self.render(messages[: i + 1], False)
            if not (through.startswith(prompt) and full.startswith(through)):
                raise ValueError(
                    f"tokenizer {self.name}: its chat template does not render record '{rid}' turn by turn as a prefix"
                    " of the whole conversation; labels cannot be located"
                )
            spans.append((len(prompt), len(through.rstrip())))
        ids, offsets = self._tokenize(full, with_offsets=True)
        labels = [
            i if e > s and any(s < hi and e > lo for lo, hi in spans) else IGNORE_INDEX
            for i, (s, e) in zip(ids, offsets)
        ]
        return self._expand(ids, labels, counts, rid)

    def encode_prompt(self, messages: list[dict[str, str]], counts: list[int], rid: str) -> list[int]:
        """``input_ids`` of the generation prompt: every turn but a final assistant one, plus the assistant header."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._tokenize(self.render(self._messages(messages), True), with_offsets=False)
        return self._expand(ids, [IGNORE_INDEX] * len(ids), counts, rid)[0]


def _cut_after_answers(labels: list[int], keep: int) -> int:
    """Length that keeps exactly the first ``keep`` labelled tokens (and nothing after the last of them)."""
    seen = 0
    for pos, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            seen += 1
            if seen == keep:
                return pos + 1
    return len(labels)


def _pad(rows: Sequence[list[int]], value: int, left: bool) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            if left:
                out[b, width - len(r) :] = torch.tensor(r)
            else:
                out[b, : len(r)] = torch.tensor(r)
    return out


class MultimodalCollator:
    """Records -> batch dict (docs/architecture.md), for training (right padding, labels) or generation.

    Training batches: ``input_ids``, ``attention_mask``, ``labels`` (-100 except the answer tokens, end-of-turn
    token included) and ``pixel_values`` (absent without images); ``teacher_*`` copies of these when a
    ``teacher`` side is given; both sides label the same answer tokens. Generation batches (``train=False``): the
    prompt only (final assistant turn removed, generation header added), left padded, plus ``ids``
    (record ids). Every batch carries ``data_stats``: ``{"samples", "truncated", "skipped_overflow", "bad"}``
    for this batch (ints), so counts survive worker processes; ``stats`` accumulates the same in this process.

    A sample longer than ``max_length`` is, with ``on_overflow="truncate"``, cut on the answer side (it is skipped
    when no answer token would remain), or skipped with ``on_overflow="skip"``; a prompt that is too long for
    generation is skipped. ``None`` records (unreadable images under ``skip_bad``) are dropped and counted as bad.

    Args:
        tokenizer: Student tokenizer; its chat template is used, or mmkd's default when it has none.
        image_processor: ``list[Image] -> (N, 3, H, W)``.
        num_image_tokens: Visual tokens per image in the student's sequence.
        image_token: The student's image token (records use ``<image>``; other tokens are substituted).
        max_length: Maximum sequence length after visual-token expansion.
        train: Training batches (True) or generation prompts (False).
        teacher: The teacher's side, when its inputs differ from the student's.
        on_overflow: ``"truncate"`` or ``"skip"``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_processor: Callable[[list[Image.Image]], Tensor],
        num_image_tokens: int,
        image_token: str = IMAGE_PLACEHOLDER,
        max_length: int = 512,
        train: bool = True,
        teacher: TeacherSide | None = None,
        on_overflow: Overflow = "truncate",
    ) -> None:
        if on_overflow not in ("truncate", "skip"):
            raise ValueError(f"on_overflow={on_overflow!r}: expected 'truncate' or 'skip'")
        if num_image_tokens < 1 or max_length < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens}, max_length={max_length}: expected both >= 1")
        self.student = _Side(tokenizer, image_token, num_image_tokens, max_length)
        self.image_processor = image_processor
        self.teacher_side = None
        self.teacher_processor = None
        if teacher is not None:
            self.teacher_side = _Side(teacher.tokenizer, teacher.image_token, teacher.num_image_tokens,
                                      teacher.max_length, teacher.image_token_count)
            self.teacher_processor = teacher.image_processor
        self.train = train
        self.on_overflow = on_overflow
        self.stats = {"samples": 0, "truncated": 0, "skipped_overflow": 0, "bad": 0}

    @classmethod
    def for_models(cls, student: Any, teacher: Any | None = None, **kwargs: Any) -> MultimodalCollator:
        """A collator for a student (and teacher) exposing ``tokenizer``, ``preprocess_images``,
        ``num_image_tokens`` and ``image_token``. The teacher side is added only when the teacher's inputs would
        differ: another image token, visual-token count, vocabulary or preprocessing (checked on a probe image).
        """
        side = None
        if teacher is not None and not _same_inputs(student, teacher):
            side = TeacherSide.from_model(teacher)
        return cls(
            student.tokenizer,
            image_processor=_image_fn(student),
            num_image_tokens=student.num_image_tokens,
            image_token=student.image_token,
            teacher=side,
            **kwargs,
        )

    # -- per sample ---------------------------------------------------------------------------------------------

    def encode(self, record: Record, messages: list[dict[str, str]] | None = None) -> dict[str, list[int]] | None:
        """Token lists of one record: ``input_ids`` and ``labels`` (train) per side (``teacher_`` prefixed), or
        ``None`` when the sample is skipped for length. Counts truncation/skips in ``self._batch_stats``."""
        messages = record["messages"] if messages is None else messages
        rid, images = str(record.get("id", "?")), record.get("images", [])
        sides = [("", self.student)] + ([("teacher_", self.teacher_side)] if self.teacher_side else [])
        counts = {prefix: side.counts(images) for prefix, side in sides}
        # The teacher's limit, unless set: the student's plus the extra visual tokens of this very sample.
        limits = {prefix: side.max_length if side.max_length is not None
                  else self.student.max_length + max(0, sum(counts[prefix]) - sum(counts[""]))
                  for prefix, side in sides}
        if not self.train:
            out = {}
            for prefix, side in sides:
                ids = side.encode_prompt(messages, counts[prefix], rid)
                if len(ids) > limits[prefix]:
                    self._batch_stats["skipped_overflow"] += 1
                    return None
                out[prefix + "input_ids"] = ids
            return out
        encoded = {prefix: side.encode_train(messages, counts[prefix], rid) for prefix, side in sides}
        n_answer = [sum(lab != IGNORE_INDEX for lab in labels) for _, labels in encoded.values()]
        if not any(n_answer):
            raise ValueError(f"record '{rid}': no answer tokens; expected at least one assistant turn with text")
        if self.teacher_side is not None:
            answers = [[lab for lab in labels if lab != IGNORE_INDEX] for _, labels in encoded.values()]
            if answers[0] != answers[1]:
                raise ValueError(
                    f"record '{rid}': student and teacher tokenize the answer differently; token-level distillation"
                    " needs a shared vocabulary"
                )
        too_long = [len(ids) > limits[prefix] for prefix, (ids, _) in encoded.items()]
        if any(too_long):
            if self.on_overflow == "skip":
                self._batch_stats["skipped_overflow"] += 1
                return None
            # Keep the same first k answer tokens on both sides: k = what the tighter side can hold.
            keep = min(
                sum(lab != IGNORE_INDEX for lab in labels[: limits[prefix]]) for prefix, (_, labels) in encoded.items()
            )
            if keep == 0:
                self._batch_stats["skipped_overflow"] += 1
                return None
            for prefix, (ids, labels) in encoded.items():
                cut = _cut_after_answers(labels, keep)
                encoded[prefix] = (ids[:cut], labels[:cut])
            self._batch_stats["truncated"] += 1
        out = {}
        for prefix, (ids, labels) in encoded.items():
            out[prefix + "input_ids"], out[prefix + "labels"] = ids, labels
        return out

    # -- batch --------------------------------------------------------------------------------------------------

    def _tensors(self, rows: list[dict[str, list[int]]], prefix: str, side: _Side) -> dict[str, Tensor]:
        ids = [r[prefix + "input_ids"] for r in rows]
        left = not self.train
        out = {
            prefix + "input_ids": _pad(ids, side.pad_id, left),
            prefix + "attention_mask": _pad([[1] * len(r) for r in ids], 0, left),
        }
        if self.train:
            out[prefix + "labels"] = _pad([r[prefix + "labels"] for r in rows], IGNORE_INDEX, left)
        return out

    def _start(self) -> None:
        self._batch_stats = {"samples": 0, "truncated": 0, "skipped_overflow": 0, "bad": 0}

    def _finish_stats(self, batch: dict[str, Any]) -> None:
        for k, v in self._batch_stats.items():
            self.stats[k] += v
        batch["data_stats"] = dict(self._batch_stats)

    def __call__(self, records: Sequence[Record | None]) -> dict[str, Any]:
        self._start()
        kept, rows = [], []
        for record in records:
            if record is None:
                self._batch_stats["bad"] += 1
                continue
            row = self.encode(record)
            if row is not None:
                kept.append(record)
                rows.append(row)
        self._batch_stats["samples"] = len(rows)
        standin = self.train and not rows and bool(records)
        if standin:  # every sample was dropped: one tiny text-only sample that the training step weighs by 0
            row = self.encode(STANDIN_RECORD)
            standin = row is not None
            kept, rows = ([STANDIN_RECORD], [row]) if standin else ([], [])
        batch: dict[str, Any] = self._tensors(rows, "", self.student)
        if self.teacher_side is not None:
            batch.update(self._tensors(rows, "teacher_", self.teacher_side))
        images = [im for r in kept for im in r.get("images", [])]
        if images:
            batch.update(_image_batch(self.image_processor(images)))
            if self.teacher_processor is not None:
                batch.update(_image_batch(self.teacher_processor(images), "teacher_"))
        if not self.train:
            batch["ids"] = [str(r.get("id")) for r in kept]
        if standin:
            batch["standin"] = True
        self._finish_stats(batch)
        return batch


class PreferenceCollator(MultimodalCollator):
    """Preference records -> ``chosen_*`` and ``rejected_*`` batches (and ``teacher_chosen_*``, ...).

    Each side is the prompt turns plus an assistant turn with the chosen or rejected text, labelled as in
    ``MultimodalCollator``; ``chosen_pixel_values`` and ``rejected_pixel_values`` are the same tensor. A pair is
    skipped when either side is. Takes the arguments of ``MultimodalCollator`` (always in training mode).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> None:
        if not kwargs.pop("train", True):
            raise ValueError("PreferenceCollator: train=False is not supported; preference batches are for training")
        super().__init__(tokenizer, **kwargs)

    def __call__(self, records: Sequence[Record | None]) -> dict[str, Any]:
        self._start()
        kept, rows = [], {"chosen": [], "rejected": []}
        for record in records:
            if record is None:
                self._batch_stats["bad"] += 1
                continue
            pair = {}
            for name in ("chosen", "rejected"):
                messages = [*record["messages"], {"role": "assistant", "content": record[name]}]
                pair[name] = self.encode(record, messages)
                if pair[name] is None:
                    break
            if pair["chosen"] is None or pair.get("rejected") is None:  # counted once, by the side that overflowed
                continue
            kept.append(record)
            for name in rows:
                rows[name].append(pair[name])
        self._batch_stats["samples"] = len(kept)
        standin = not kept and bool(records)
        if standin:  # every pair was dropped: one tiny text-only pair that the training step weighs by 0
            pair = {name: self.encode(STANDIN_RECORD, [*STANDIN_RECORD["messages"][:-1],
                                                      {"role": "assistant", "content": STANDIN_RECORD[name]}])
                    for name in rows}
            standin = all(row is not None for row in pair.values())
            if standin:
                kept = [STANDIN_RECORD]
                for name in rows:
                    rows[name].append(pair[name])
        batch: dict[str, Any] = {}
        images = [im for r in kept for im in r.get("images", [])]
        pixels = _image_batch(self.image_processor(images)) if images else {}
        t_pixels = _image_batch(self.teacher_processor(images)) if images and self.teacher_processor else {}
        for name, side_rows in rows.items():
            for k, v in self._tensors(side_rows, "", self.student).items():
                batch[f"{name}_{k}"] = v
            for k, v in pixels.items():
                batch[f"{name}_{k}"] = v
            if self.teacher_side is not None:
                for k, v in self._tensors(side_rows, "teacher_", self.teacher_side).items():
                    batch[f"teacher_{name}_{k.removeprefix('teacher_')}"] = v
                for k, v in t_pixels.items():
                    batch[f"teacher_{name}_{k}"] = v
        if standin:
            batch["standin"] = True
        self._finish_stats(batch)
        return batch


def _same_inputs(student: Any, teacher: Any) -> bool:
    """Whether the teacher would get exactly the student's batch (then no ``teacher_*`` keys are needed)."""
    if student.num_image_tokens != teacher.num_image_tokens or student.image_token != teacher.image_token:
        return False
    s_tok, t_tok = student.tokenizer, teacher.tokenizer
    if s_tok is not t_tok and (s_tok.get_vocab() != t_tok.get_vocab() or s_tok.chat_template != t_tok.chat_template):
        return False
    probe = [Image.new("RGB", (17, 13), (90, 160, 30)), Image.new("RGB", (61, 29), (20, 40, 200))]
    counts = [getattr(m, "image_token_count", lambda im, m=m: m.num_image_tokens) for m in (student, teacher)]
    if any(counts[0](im) != counts[1](im) for im in probe):
        return False
    a, b = (_image_batch(_image_fn(m)(probe)) for m in (student, teacher))
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "batch_num_images")
"""Batch keys of image inputs a model's forward takes (``teacher_`` prefixed for the teacher's own)."""


def _image_fn(model: Any) -> Callable[[list[Image.Image]], Tensor | dict[str, Tensor]]:
    return getattr(model, "image_inputs", None) or model.preprocess_images


def _image_batch(out: Tensor | dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """An image processor's output as batch entries: a tensor is ``pixel_values``; a dict keeps its keys."""
    items = out.items() if isinstance(out, dict) else [("pixel_values", out)]
    return {prefix + k: v for k, v in items if k in IMAGE_INPUT_KEYS}
