"""Data: readers (ScienceQA, LLaVA conversations, captions, preference pairs), collate, synthetic world, tokenizer."""

from mmkd.data.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "build_tokenizer"]
