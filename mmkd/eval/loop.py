"""The evaluation loop: batched greedy generation (or option likelihood) over ScienceQA records, streamed.

Nothing is held per question beyond one batch: answers go to the answer file line by line and into the
``ScienceQAAccuracy`` sums as each batch finishes, so a 4,241-question split costs the memory of one batch.

The model is any :class:`~mmkd.contract.VisionLanguageModel` (``tokenizer``, ``image_token``,
``num_image_tokens``, ``image_inputs``, ``generate(inputs, max_new_tokens) -> (B, L_new)`` and
``forward(**inputs.kwargs()) -> ModelOutput``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, Subset

from mmkd.data.collate import MultimodalCollator
from mmkd.eval.answer_key import KeyedQuestion, key_from_record
from mmkd.eval.answers import AnswerWriter
from mmkd.eval.metric import ScienceQAAccuracy
from mmkd.eval.parsing import OPTION_LETTERS

Mode = Literal["generate", "likelihood"]
MODES = ("generate", "likelihood")


@dataclass
class LoopStats:
    """What the loop saw, besides the scores.

    Attributes:
        questions: Questions scored (answered, skipped or not).
        batches: Batches run.
        skipped_too_long: Questions whose prompt did not fit the model's context; no answer line is written
            and they count as missing.
        unreadable: Records the dataset could not build (e.g. an unreadable image with ``skip_bad``); they
            have no id, so they are not scored at all.
    """

    questions: int = 0
    batches: int = 0
    skipped_too_long: int = 0
    unreadable: int = 0


def letter_token_ids(model: Any, letters: str = OPTION_LETTERS) -> list[int]:
    """The token that starts each option letter when it is the assistant's answer after the prompt.

    Found by tokenizing, with the model's own chat template, a probe conversation once as a generation
    prompt and once with the letter as the answer: the first token past the prompt is the letter's.

    Args:
        model: A model with ``tokenizer``, ``preprocess_images``, ``num_image_tokens`` and ``image_token``.
        letters: The letters, in order.

    Returns:
        One token id per letter, all different.
    """
    prompt_side = MultimodalCollator.for_models(model, train=False)
    answer_side = MultimodalCollator.for_models(model, train=True)
    user = {"role": "user", "content": "Which one?\nA. one\nB. two"}
    probe = {"id": "letter-probe", "images": [], "messages": [user]}
    prompt_ids = prompt_side.encode(probe)["student"].input_ids
    ids = []
    for letter in letters:
        full = answer_side.encode(probe, [user, {"role": "assistant", "content": letter}])["student"].input_ids
        if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
            raise ValueError(
                f"tokenizer {getattr(model.tokenizer, 'name_or_path', '')!r}: the answer {letter!r} does not start "
                "on a token boundary after the generation prompt; --mode likelihood cannot score letters"
            )
        ids.append(full[len(prompt_ids)])
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"tokenizer: option letters {letters} share first tokens {ids}; --mode likelihood needs them distinct"
        )
    return ids


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _max_prompt_length(model: Any, max_new_tokens: int) -> int:
    hf = getattr(model, "hf", None)
    config = getattr(hf, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    positions = getattr(text_config, "max_position_embeddings", None) or 4096
    return max(1, int(positions) - max_new_tokens)


class _Batcher:
    """DataLoader ``collate_fn``: the keyed questions and prompts of a batch of records, and its tensors."""

    def __init__(self, collator: MultimodalCollator) -> None:
        self.collator = collator

    def __call__(self, records: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        present = [r for r in records if r is not None]
        keys = [key_from_record(r) for r in present]
        prompts = {str(r["id"]): _answer_file_prompt(r) for r in present}
        batch = self.collator(present) if present else None
        return {"keys": keys, "prompts": prompts, "unreadable": len(records) - len(present), "batch": batch}


def _answer_file_prompt(record: dict[str, Any]) -> str:
    # LLaVA writes the user turn with `<image>\n` in front (when there is an image) and the instruction last;
    # mmkd.data renders the user turn exactly so.
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


@torch.no_grad()
def run_evaluation(
    model: Any,
    dataset: Dataset,
    writer: AnswerWriter,
    metric: ScienceQAAccuracy,
    *,
    mode: Mode = "generate",
    batch_size: int = 16,
    max_new_tokens: int = 16,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> LoopStats:
    """Answer every question of ``dataset``, writing answer lines and updating ``metric`` batch by batch.

    ``generate``: greedy decoding of at most ``max_new_tokens`` tokens; the decoded text (special tokens
    skipped, surrounding whitespace stripped, as LLaVA's ``model_vqa_science.py`` does) is the answer.
    ``likelihood``: one forward pass over the prompt; the answer is the option letter whose first token has
    the highest log-probability at the next position, among the question's own options.

    Args:
        model: The model (see the module docstring), already on its device and in eval mode.
        dataset: ScienceQA records (``mmkd.data.ScienceQA`` or ``LlavaQuestionFile``), each with an answer.
        writer: An open answer-file writer.
        metric: Where scores accumulate.
        mode: ``generate`` or ``likelihood``.
        batch_size: Questions per batch.
        max_new_tokens: Generation budget per answer (``generate`` only).
        limit: Score only the first ``limit`` questions.
        num_workers: DataLoader workers that load images and tokenize.
        progress: Show a progress bar over batches.

    Returns:
        Counts of what was seen.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        raise ValueError(
            f"batch_size={batch_size}, max_new_tokens={max_new_tokens}, limit={limit}: expected positive numbers"
        )
    device = _device_of(model)
    collator = MultimodalCollator.for_models(
        model, train=False, max_length=_max_prompt_length(model, max_new_tokens if mode == "generate" else 0)
    )
    letter_ids = torch.tensor(letter_token_ids(model), device=device) if mode == "likelihood" else None
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_Batcher(collator),
                        num_workers=num_workers)
    stats = LoopStats()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"eval ({mode})", total=len(loader))
        for item in loader:
            keys: list[KeyedQuestion] = item["keys"]
            batch = item["batch"]
            kept = batch.ids if batch is not None else []
            texts: dict[str, str] = {}
            if kept:
                inputs = batch.inputs.to(device)
                if mode == "generate":
                    new_ids = model.generate(inputs, max_new_tokens=max_new_tokens)
                    decoded = model.tokenizer.batch_decode(new_ids, skip_special_tokens=True)
                    for qid, text in zip(kept, decoded):
                        texts[qid] = text.strip()
                        writer.write(qid, item["prompts"][qid], texts[qid])
                else:
                    by_id = {k.question_id: k for k in keys}
                    out = model(**inputs.kwargs())
                    # Prompts are left-padded: the last position predicts the first answer token in every row.
                    logprobs = torch.log_softmax(out.logits(out.last_hidden[:, -1]).float(), dim=-1)[:, letter_ids]
                    for row, qid in enumerate(kept):
                        n = by_id[qid].num_choices
                        scores = logprobs[row, :n].tolist()
                        texts[qid] = OPTION_LETTERS[max(range(n), key=scores.__getitem__)]
                        meta = {"mode": "likelihood", "logprobs": dict(zip(OPTION_LETTERS, scores))}
                        writer.write(qid, item["prompts"][qid], texts[qid], meta)
            # A question the collator left out (prompt too long) gets no answer line and counts as missing.
            metric.update([texts.get(k.question_id) for k in keys], keys)
            stats.questions += len(keys)
            stats.skipped_too_long += len(keys) - len(kept)
            stats.unreadable += item["unreadable"]
            stats.batches += 1
            bar.advance(task)
    return stats
