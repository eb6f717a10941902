"""Readers for LLaVA's JSON layouts: conversations (SFT), caption pairs (pretraining), ScienceQA question files
(``llava_test_CQM-A.json``), and preference pairs (RLAIF-V style)."""

from __future__ import annotations

import os
from typing import Any

from mmkd.data.records import (
    IMAGE_PLACEHOLDER,
    BadRecord,
    Record,
    RecordDataset,
    image_list,
    load_json,
    parse_conversation,
)
from mmkd.data.scienceqa import SQA_INSTRUCTION

CAPTION_PROMPT = "<image>\nGive a brief description of the image."


def _records(json_path: str | os.PathLike[str]) -> list[Any]:
    data = load_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _record_id(raw: dict[str, Any], index: int, key_order: tuple[str, ...] = ("id",)) -> str:
    for key in key_order:
        if raw.get(key) is not None:
            return str(raw[key])
    return str(index)


class LlavaConversations(RecordDataset):
    """LLaVA conversation JSON (``llava_v1_5_mix665k.json`` style) plus an image folder.

    Each entry is ``{"id", "image"?: path | [paths], "conversations": [{"from": "human"|"gpt", "value"}, ...]}``;
    the human turns carry one ``<image>`` per image. Records are ``{"id", "images", "messages"}``.

    Args:
        json_path: The ``.json`` list (or ``.jsonl``, one record a line).
        image_folder: Folder that ``image`` paths are relative to.
        skip_bad: Skip and count bad records instead of raising (see ``RecordDataset``).
        check_images: Check at construction that every image file exists (a ``stat`` per image).
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] = ".",
        skip_bad: bool = False,
        check_images: bool = True,
    ) -> None:
        super().__init__(json_path, skip_bad)
        self.image_folder = str(image_folder)
        self._load(_records(json_path), self._parse, check_images)

    def _parse(self, raw: Any, index: int) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise BadRecord(f"{self.source}: record #{index} must be an object, got {type(raw).__name__}")
        rid = _record_id(raw, index)
        where = f"{self.source}: record '{rid}'"
        images = image_list(raw.get("image"), where)
        messages = parse_conversation(raw.get("conversations"), where, len(images))
        paths = [os.path.join(self.image_folder, p) for p in images]
        return {"id": rid, "where": where, "image_paths": paths, "messages": messages}


class CaptionPairs(LlavaConversations):
    """Caption pairs in LLaVA's pretraining layout (``blip_laion_cc_sbu_558k.json``): conversation-shaped
    records with one image, a short instruction and the caption as the answer.

    Plain ``{"id"?, "image", "caption"}`` records are accepted too; their prompt is ``prompt``.

    Args:
        json_path: The ``.json`` list (or ``.jsonl``).
        image_folder: Folder that ``image`` paths are relative to.
        skip_bad: Skip and count bad records instead of raising.
        check_images: Check at construction that every image file exists.
        prompt: User turn for plain caption records.
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] = ".",
        skip_bad: bool = False,
        check_images: bool = True,
        prompt: str = CAPTION_PROMPT,
    ) -> None:
        self.prompt = prompt
        super().__init__(json_path, image_folder, skip_bad, check_images)

    def _parse(self, raw: Any, index: int) -> dict[str, Any]:
        if isinstance(raw, dict) and "conversations" not in raw and "caption" in raw:
            caption = raw["caption"]
            rid = _record_id(raw, index)
            if not isinstance(caption, str) or not caption.strip():
                raise BadRecord(f"{self.source}: record '{rid}': 'caption' must be a non-empty string")
            raw = {
                "id": rid,
                "image": raw.get("image"),
                "conversations": [{"from": "human", "value": self.prompt}, {"from": "gpt", "value": caption}],
            }
        entry = super()._parse(raw, index)
        if len(entry["image_paths"]) != 1:
            raise BadRecord(
                f"{entry['where']}: a caption pair needs exactly one image, got {len(entry['image_paths'])}"
            )
        return entry


def parse_options(prompt: str) -> list[str]:
    """The options of a ScienceQA-style prompt: the last block ``A. ...\nB. ...`` (an option may span lines,
    e.g. a letter closing ``See you soon,\nJanet``), without a trailing instruction line."""
    prompt = prompt.removesuffix("\n" + SQA_INSTRUCTION)
    text = "\n" + prompt
    start = text.rfind("\nA. ")
    if start < 0:
        return []
    block = text[start + len("\nA. ") :]
    options = []
    for k in range(1, 26):
        marker = f"\n{chr(ord('A') + k)}. "
        cut = block.find(marker)
        if cut < 0:
            break
        options.append(block[:cut])
        block = block[cut + len(marker) :]
    options.append(block)
    return options


class LlavaQuestionFile(RecordDataset):
    """LLaVA's ScienceQA question file (``llava_test_CQM-A.json``): ``{"id", "image"?, "conversations"}`` with the
    rendered question in the human turn and the answer letter in the gpt turn.

    The file's human turn stops after the options; LLaVA's ``model_vqa_science --single-pred-prompt`` appends
    ``"\\nAnswer with the option's letter from the given choices directly."`` at evaluation time, and so does this
    reader (``instruction``), so prompts equal ``render_sqa_prompt`` of the same problem. Records add ``answer``
    (letter, when the gpt turn is present), ``choices`` (parsed from the option lines) and ``meta``.

    Args:
        json_path: The question file.
        image_folder: Folder that ``image`` paths (``"<pid>/image.png"``) are relative to, e.g. ``images/test``.
        skip_bad: Skip and count bad records instead of raising.
        instruction: Line appended to the prompt when not already there; ``None`` leaves prompts as they are.
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] = ".",
        skip_bad: bool = False,
        instruction: str | None = SQA_INSTRUCTION,
    ) -> None:
        super().__init__(json_path, skip_bad)
        self.image_folder = str(image_folder)
        self._load(_records(json_path), lambda raw, index: self._parse(raw, index, instruction))

    def _parse(self, raw: Any, index: int, instruction: str | None) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise BadRecord(f"{self.source}: record #{index} must be an object, got {type(raw).__name__}")
        rid = _record_id(raw, index)
        where = f"{self.source}: record '{rid}'"
        images = image_list(raw.get("image"), where)
        messages = parse_conversation(raw.get("conversations"), where, len(images), need_answer=False)
        if (
            messages[0]["role"] != "user"
            or len(messages) > 2
            or (len(messages) == 2 and messages[1]["role"] != "assistant")
        ):
            raise BadRecord(f"{where}: expected one human turn, optionally followed by one gpt turn with the letter")
        prompt = messages[0]["content"]
        choices = parse_options(prompt)
        if len(choices) < 2:
            raise BadRecord(f"{where}: expected at least two 'A. ...' option lines in the human turn")
        if instruction and not prompt.endswith(instruction):
            messages[0]["content"] = prompt + "\n" + instruction
        answer = None
        if len(messages) == 2:
            answer = messages[1]["content"].strip()
            if len(answer) != 1 or not "A" <= answer < chr(ord("A") + len(choices)):
                raise BadRecord(f"{where}: answer {answer!r} is not one of the letters A-{chr(64 + len(choices))}")
        meta = {"has_image": bool(images), "has_context": "\nContext: " in "\n" + prompt}
        paths = [os.path.join(self.image_folder, p) for p in images]
        return {
            "id": rid,
            "where": where,
            "image_paths": paths,
            "messages": messages,
            "answer": answer,
            "choices": choices,
            "meta": meta,
        }

    def _make(self, entry: dict[str, Any]) -> Record:
        record = super()._make(entry)
        record.update(answer=entry["answer"], choices=list(entry["choices"]), meta=dict(entry["meta"]))
        return record


class PreferencePairs(RecordDataset):
    """Preference pairs, RLAIF-V style: ``{"id"|"idx"?, "image"?, "question", "chosen", "rejected"}``.

    Records are ``{"id", "images", "messages" (the prompt: one user turn), "chosen", "rejected"}``; an
    ``<image>`` line is prepended to the question when the record has an image and the question has none.

    Args:
        json_path: The ``.json`` list (or ``.jsonl``).
        image_folder: Folder that ``image`` paths are relative to.
        skip_bad: Skip and count bad records instead of raising.
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] = ".",
        skip_bad: bool = False,
    ) -> None:
        super().__init__(json_path, skip_bad)
        self.image_folder = str(image_folder)
        self._load(_records(json_path), self._parse)

    def _parse(self, raw: Any, index: int) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise BadRecord(f"{self.source}: record #{index} must be an object, got {type(raw).__name__}")
        rid = _record_id(raw, index, ("id", "idx"))
        where = f"{self.source}: record '{rid}'"
        for key in ("question", "chosen", "rejected"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise BadRecord(f"{where}: '{key}' must be a non-empty string")
        if raw["chosen"] == raw["rejected"]:
            raise BadRecord(f"{where}: 'chosen' and 'rejected' are identical")
        images = image_list(raw.get("image"), where)
        question = raw["question"]
        n_placeholders = question.count(IMAGE_PLACEHOLDER)
        if images and n_placeholders == 0:
            question = "\n".join([IMAGE_PLACEHOLDER] * len(images) + [question])
        elif n_placeholders != len(images):
            raise BadRecord(f"{where}: {n_placeholders} '<image>' placeholders in 'question' but {len(images)} images")
        paths = [os.path.join(self.image_folder, p) for p in images]
        return {
            "id": rid,
            "where": where,
            "image_paths": paths,
            "messages": [{"role": "user", "content": question}],
            "chosen": raw["chosen"],
            "rejected": raw["rejected"],
        }

    def _make(self, entry: dict[str, Any]) -> Record:
        record = super()._make(entry)
        record.update(chosen=entry["chosen"], rejected=entry["rejected"])
        return record
