"""Data: readers (ScienceQA, LLaVA conversations, captions, preference pairs), collate, synthetic world, tokenizer.

Nothing here imports Lightning except ``mmkd.data.datamodule`` (import it from there).
"""

from mmkd.data.collate import IGNORE_INDEX, MultimodalCollator, PreferenceCollator, TeacherSide
from mmkd.data.llava import CaptionPairs, LlavaConversations, LlavaQuestionFile, PreferencePairs
from mmkd.data.records import IMAGE_PLACEHOLDER, RecordDataset, load_image
from mmkd.data.scienceqa import SQA_INSTRUCTION, ScienceQA, render_sqa_prompt
from mmkd.data.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN",
    "SQA_INSTRUCTION",
    "CaptionPairs",
    "LlavaConversations",
    "LlavaQuestionFile",
    "MultimodalCollator",
    "PreferenceCollator",
    "PreferencePairs",
    "RecordDataset",
    "ScienceQA",
    "TeacherSide",
    "build_tokenizer",
    "load_image",
    "render_sqa_prompt",
]
