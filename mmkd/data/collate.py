"""Collate records into the typed batches of :mod:`mmkd.contract`: chat template, visual tokens, answer-only labels.

Labels come from the chat template itself: for every assistant turn ``i`` the template is rendered up to the
generation prompt (``messages[:i]`` + ``add_generation_prompt``) and through the turn (``messages[:i+1]``); the
characters between the two (without trailing whitespace) are the answer, end-of-turn token included. The whole
conversation is tokenized once, as the model's own processor would, and a token is labelled when its character
span overlaps an answer span. Every ``<image>`` placeholder of a record becomes the model's image prompt (its
``image_prompt``, usually the image token itself), whose image token is then expanded to that image's visual-token
count. Each model's image processor output travels whole (``ModelInputs.images``), whatever keys its family uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mmkd.contract import DistillBatch, ModelInputs, PreferenceBatch, PromptBatch
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


class Encoded(NamedTuple):
    """One side's token lists of one record: the sequence, its labels (training) and its generation prompt."""

    input_ids: list[int]
    labels: list[int] | None = None
    prompt: list[int] | None = None


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
        image_prompt: The text that stands for one image in the teacher's prompt; default: ``image_token``.
    """

    tokenizer: PreTrainedTokenizerBase
    image_processor: Callable[[list[Image.Image]], Tensor | dict[str, Tensor]]
    num_image_tokens: int
    image_token: str = IMAGE_PLACEHOLDER
    max_length: int | None = None
    image_token_count: Callable[[Image.Image], int] | None = None
    image_prompt: str | None = None

    @classmethod
    def from_model(cls, model: Any) -> TeacherSide:
        """From a model exposing ``tokenizer``, ``image_inputs`` (or ``preprocess_images``), ``num_image_tokens``,
        ``image_token`` and optionally ``image_token_count`` (per-image counts of any-resolution families) and
        ``image_prompt``."""
        return cls(model.tokenizer, _image_fn(model), model.num_image_tokens, model.image_token,
                   image_token_count=getattr(model, "image_token_count", None),
                   image_prompt=getattr(model, "image_prompt", None))


class _Side:
    """Tokenization of one side (student or teacher): template, image token, padding id, special prefix."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str,
        num_image_tokens: int,
        max_length: int | None,
        image_token_count: Callable[[Image.Image], int] | None = None,
        image_prompt: str | None = None,
    ):
        self.tok = tokenizer
        self.image_token = image_token
        self.image_prompt = image_prompt or image_token
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
        if self.image_prompt == IMAGE_PLACEHOLDER:
            return messages
        return [
            m
            if m["role"] == "assistant"
            else {**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, self.image_prompt)}
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
    """Records -> :class:`~mmkd.contract.DistillBatch` for training, or :class:`~mmkd.contract.PromptBatch` for
    generation.

    Training batches (right padding): the student's ``inputs`` and ``labels`` (-100 except the answer tokens,
    end-of-turn token included), and the teacher's own ``teacher_inputs`` and ``teacher_labels`` when a ``teacher``
    side is given (both sides label the same answer tokens); with ``prompts=True`` also each side's generation
    prompt for the same samples. Generation batches (``train=False``): the prompt only (final assistant turn
    removed, generation header added), left padded, with the record ids. Every batch carries ``data_stats``:
    ``{"samples", "truncated", "skipped_overflow", "bad"}`` for this batch (ints), so counts survive worker
    processes; ``stats`` accumulates the same in this process.

    A sample longer than ``max_length`` is, with ``on_overflow="truncate"``, cut on the answer side (it is skipped
    when no answer token would remain), or skipped with ``on_overflow="skip"``; a prompt that is too long for
    generation is skipped. ``None`` records (unreadable images under ``skip_bad``) are dropped and counted as bad.

    Args:
        tokenizer: Student tokenizer; its chat template is used, or mmkd's default when it has none.
        image_processor: ``list[Image] -> (N, 3, H, W)`` pixel values, or a dict of image inputs.
        num_image_tokens: Visual tokens per image in the student's sequence.
        image_token: The student's image token (records use ``<image>``; other tokens are substituted).
        max_length: Maximum sequence length after visual-token expansion.
        train: Training batches (True) or generation prompts (False).
        teacher: The teacher's side, when its inputs differ from the student's.
        on_overflow: ``"truncate"`` or ``"skip"``.
        image_token_count: ``Image -> int`` for a student whose visual-token count depends on the image.
        image_prompt: The text standing for one image in the student's prompt (default: ``image_token``).
        prompts: Also attach the generation prompts of the training samples (tasks that generate answers).
        keys: Also attach each training sample's teacher-cache key (``DistillBatch.keys``, see :meth:`cache_key`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_processor: Callable[[list[Image.Image]], Tensor | dict[str, Tensor]],
        num_image_tokens: int,
        image_token: str = IMAGE_PLACEHOLDER,
        max_length: int = 512,
        train: bool = True,
        teacher: TeacherSide | None = None,
        on_overflow: Overflow = "truncate",
        image_token_count: Callable[[Image.Image], int] | None = None,
        image_prompt: str | None = None,
        prompts: bool = False,
        keys: bool = False,
    ) -> None:
        if on_overflow not in ("truncate", "skip"):
            raise ValueError(f"on_overflow={on_overflow!r}: expected 'truncate' or 'skip'")
        if num_image_tokens < 1 or max_length < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens}, max_length={max_length}: expected both >= 1")
        self.sides: dict[str, _Side] = {
            "student": _Side(tokenizer, image_token, num_image_tokens, max_length, image_token_count, image_prompt)
        }
        self.processors: dict[str, Callable[[list[Image.Image]], Tensor | dict[str, Tensor]]] = {
            "student": image_processor
        }
        if teacher is not None:
            self.sides["teacher"] = _Side(teacher.tokenizer, teacher.image_token, teacher.num_image_tokens,
                                          teacher.max_length, teacher.image_token_count, teacher.image_prompt)
            self.processors["teacher"] = teacher.image_processor
        self.train = train
        self.prompts = prompts and train
        self.keys = keys and train
        self.on_overflow = on_overflow
        self.stats = {"samples": 0, "truncated": 0, "skipped_overflow": 0, "bad": 0}

    @property
    def student(self) -> _Side:
        return self.sides["student"]

    @classmethod
    def for_models(cls, student: Any, teacher: Any | None = None, **kwargs: Any) -> MultimodalCollator:
        """A collator for a student (and teacher) with the :class:`~mmkd.contract.VisionLanguageModel` interface
        (``tokenizer``, ``image_inputs`` or ``preprocess_images``, ``num_image_tokens``, ``image_token``). The
        teacher side is added only when the teacher's inputs would differ: another image token or prompt,
        visual-token count, vocabulary or preprocessing (checked on probe images).
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
            image_token_count=getattr(student, "image_token_count", None),
            image_prompt=getattr(student, "image_prompt", None),
            **kwargs,
        )

    # -- per sample ---------------------------------------------------------------------------------------------

    def encode(self, record: Record, messages: list[dict[str, str]] | None = None) -> dict[str, Encoded] | None:
        """Token lists of one record per side (``"student"``, ``"teacher"``): ``input_ids`` and, for training,
        ``labels`` (and the ``prompt`` ids with ``prompts``), or ``None`` when the sample is skipped for length.
        Counts truncation and skips in this batch's stats."""
        messages = record["messages"] if messages is None else messages
        rid, images = str(record.get("id", "?")), record.get("images", [])
        counts = {name: side.counts(images) for name, side in self.sides.items()}
        # The teacher's limit, unless set: the student's plus the extra visual tokens of this very sample.
        limits = {name: side.max_length if side.max_length is not None
                  else self.student.max_length + max(0, sum(counts[name]) - sum(counts["student"]))
                  for name, side in self.sides.items()}
        if not self.train:
            out = {}
            for name, side in self.sides.items():
                ids = side.encode_prompt(messages, counts[name], rid)
                if len(ids) > limits[name]:
                    self._batch_stats["skipped_overflow"] += 1
                    return None
                out[name] = Encoded(ids)
            return out
        encoded = {name: side.encode_train(messages, counts[name], rid) for name, side in self.sides.items()}
        n_answer = [sum(lab != IGNORE_INDEX for lab in labels) for _, labels in encoded.values()]
        if not any(n_answer):
            raise ValueError(f"record '{rid}': no answer tokens; expected at least one assistant turn with text")
        if "teacher" in self.sides:
            answers = [[lab for lab in labels if lab != IGNORE_INDEX] for _, labels in encoded.values()]
            if answers[0] != answers[1]:
                raise ValueError(
                    f"record '{rid}': student and teacher tokenize the answer differently; token-level distillation"
                    " needs a shared vocabulary"
                )
        too_long = [len(ids) > limits[name] for name, (ids, _) in encoded.items()]
        if any(too_long):
            if self.on_overflow == "skip":
                self._batch_stats["skipped_overflow"] += 1
                return None
            # Keep the same first k answer tokens on both sides: k = what the tighter side can hold.
            keep = min(
                sum(lab != IGNORE_INDEX for lab in labels[: limits[name]]) for name, (_, labels) in encoded.items()
            )
            if keep == 0:
                self._batch_stats["skipped_overflow"] += 1
                return None
            for name, (ids, labels) in encoded.items():
                cut = _cut_after_answers(labels, keep)
                encoded[name] = (ids[:cut], labels[:cut])
            self._batch_stats["truncated"] += 1
        out = {}
        for name, (ids, labels) in encoded.items():
            prompt = self.sides[name].encode_prompt(messages, counts[name], rid) if self.prompts else None
            out[name] = Encoded(ids, labels, prompt)
        return out

    # -- teacher-cache keys ---------------------------------------------------------------------------------------

    @property
    def teacher_side_name(self) -> str:
        """The side the teacher reads: its own when its inputs differ, else the student's."""
        return "teacher" if "teacher" in self.sides else "student"

    def _key(self, record: Record, row: dict[str, Encoded]) -> str:
        """The cache key of an encoded training sample: the teacher's token ids, the rows of its logits that predict
        answer tokens, and the record's images (:func:`mmkd.cache.record_key`)."""
        from mmkd.cache.keys import record_key

        side = row[self.teacher_side_name]
        labels = side.labels
        positions = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
        return record_key(side.input_ids, record.get("images", []), positions)

    def cache_key(self, record: Record | None) -> str | None:
        """The teacher-cache key of one record as a training batch would carry it, or None when the record is dropped
        (unreadable, or skipped for length). Tokenizes and hashes; no image processing."""
        if record is None:
            return None
        self._start()
        row = self.encode(record)
        return None if row is None else self._key(record, row)

    # -- batch --------------------------------------------------------------------------------------------------

    def _inputs(self, rows: list[list[int]], side: _Side, images: dict[str, Tensor], left: bool) -> ModelInputs:
        return ModelInputs(_pad(rows, side.pad_id, left), _pad([[1] * len(r) for r in rows], 0, left), images)

    def _start(self) -> None:
        self._batch_stats = {"samples": 0, "truncated": 0, "skipped_overflow": 0, "bad": 0}

    def _finish_stats(self) -> dict[str, int]:
        for k, v in self._batch_stats.items():
            self.stats[k] += v
        return dict(self._batch_stats)

    def _images(self, kept: Sequence[Record]) -> dict[str, dict[str, Tensor]]:
        """Each side's image inputs for the kept records' images (in sample order); empty without images."""
        images = [im for r in kept for im in r.get("images", [])]
        if not images:
            return {name: {} for name in self.sides}
        return {name: _image_batch(self.processors[name](images)) for name in self.sides}

    def _labelled(self, rows: list[dict[str, Encoded]], images: dict[str, dict[str, Tensor]], standin: bool,
                  stats: dict[str, int], ids: list[str], keys: list[str] | None = None) -> DistillBatch:
        sides = {}
        for name, side in self.sides.items():
            sides[name] = (self._inputs([r[name].input_ids for r in rows], side, images[name], left=False),
                           _pad([r[name].labels for r in rows], IGNORE_INDEX, left=False))
        prompts = {name: self._inputs([r[name].prompt for r in rows], side, images[name], left=True)
                   for name, side in self.sides.items()} if self.prompts else {}
        teacher = sides.get("teacher", (None, None))
        return DistillBatch(sides["student"][0], sides["student"][1], teacher[0], teacher[1], standin=standin,
                            data_stats=stats, ids=ids, prompt=prompts.get("student"),
                            teacher_prompt=prompts.get("teacher"), keys=keys or [])

    def __call__(self, records: Sequence[Record | None]) -> DistillBatch | PromptBatch:
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
        images = self._images(kept)
        ids = [str(r.get("id")) for r in kept]
        if not self.train:
            teacher = None
            if "teacher" in self.sides:
                teacher = self._inputs([r["teacher"].input_ids for r in rows], self.sides["teacher"],
                                       images["teacher"], left=True)
            inputs = self._inputs([r["student"].input_ids for r in rows], self.student, images["student"], left=True)
            return PromptBatch(inputs, ids, self._finish_stats(), teacher)
        keys = [self._key(r, row) for r, row in zip(kept, rows)] if self.keys and not standin else []
        return self._labelled(rows, images, standin, self._finish_stats(), ids, keys)


class PreferenceCollator(MultimodalCollator):
    """Preference records -> :class:`~mmkd.contract.PreferenceBatch`: a labelled batch per answer (chosen, rejected).

    Each side is the prompt turns plus an assistant turn with the chosen or rejected text, labelled as in
    ``MultimodalCollator`` (teacher inputs included when they differ); both sides share one image-input dict. A pair
    is skipped when either side is. Takes the arguments of ``MultimodalCollator`` (always in training mode).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> None:
        if not kwargs.pop("train", True):
            raise ValueError("PreferenceCollator: train=False is not supported; preference batches are for training")
        super().__init__(tokenizer, **kwargs)

    def _pair(self, record: Record) -> dict[str, dict[str, Encoded] | None]:
        pair: dict[str, dict[str, Encoded] | None] = {}
        for name in ("chosen", "rejected"):
            messages = [*record["messages"], {"role": "assistant", "content": record[name]}]
            pair[name] = self.encode(record, messages)
            if pair[name] is None:
                break
        return pair

    def _pair_key(self, record: Record, pair: Mapping[str, dict[str, Encoded]]) -> str:
        """A pair's cache key: the teacher's chosen and rejected sequences (in that order) and the images."""
        from mmkd.cache.keys import record_key

        side = self.teacher_side_name
        return record_key([pair["chosen"][side].input_ids, pair["rejected"][side].input_ids], record.get("images", []))

    def cache_key(self, record: Record | None) -> str | None:
        if record is None:
            return None
        self._start()
        pair = self._pair(record)
        if pair["chosen"] is None or pair.get("rejected") is None:
            return None
        return self._pair_key(record, pair)

    def __call__(self, records: Sequence[Record | None]) -> PreferenceBatch:
        self._start()
        kept, rows, keys = [], {"chosen": [], "rejected": []}, []
        for record in records:
            if record is None:
                self._batch_stats["bad"] += 1
                continue
            pair = self._pair(record)
            if pair["chosen"] is None or pair.get("rejected") is None:  # counted once, by the side that overflowed
                continue
            if self.keys:
                keys.append(self._pair_key(record, pair))
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
                kept, keys = [STANDIN_RECORD], []
                for name in rows:
                    rows[name].append(pair[name])
        images = self._images(kept)  # one dict per model, shared by both answers
        stats = self._finish_stats()
        ids = [str(r.get("id")) for r in kept]
        sides = {name: self._labelled(side_rows, images, standin, stats, ids) for name, side_rows in rows.items()}
        return PreferenceBatch(sides["chosen"], sides["rejected"], standin=standin, data_stats=stats, keys=keys)


def _same_inputs(student: Any, teacher: Any) -> bool:
    """Whether the teacher would get exactly the student's batch (then the batch carries no teacher inputs)."""
    if student.num_image_tokens != teacher.num_image_tokens or student.image_token != teacher.image_token:
        return False
    if getattr(student, "image_prompt", None) != getattr(teacher, "image_prompt", None):
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


def _image_fn(model: Any) -> Callable[[list[Image.Image]], Tensor | dict[str, Tensor]]:
    return getattr(model, "image_inputs", None) or model.preprocess_images


def _image_batch(out: Tensor | Mapping[str, Any]) -> dict[str, Tensor]:
    """An image processor's output, whole: a tensor is ``pixel_values``; a mapping keeps every tensor it holds."""
    if isinstance(out, Tensor):
        return {"pixel_values": out}
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}
