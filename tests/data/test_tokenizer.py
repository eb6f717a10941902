from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mmkd.data.tokenizer import build_tokenizer

TEXTS = ["How many red circles are there?", "Answer with the option's letter from the given choices directly."] * 20


def test_tokenizer_folder_loads_with_specials_and_template(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "tok", TEXTS, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|end|>" and tok.image_token == "<image>"
    assert tok.pad_token_id != tok.eos_token_id
    msgs = [{"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "B"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|user|>\n<image>\nHow many?<|end|><|assistant|>\nB<|end|>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\n<image>\nHow many?<|end|><|assistant|>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1  # never split
    assert tok.decode(ids) == text  # byte-level: lossless


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a", TEXTS, vocab_size=300)
    build_tokenizer(tmp_path / "b", TEXTS, vocab_size=300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tokenizer_rejects_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path / "t", TEXTS, vocab_size=100)
