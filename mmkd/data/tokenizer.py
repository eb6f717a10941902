"""An offline byte-level BPE tokenizer for the tiny presets, trained with the `tokenizers` library.

Nothing is downloaded: the tokenizer is trained on a corpus (the built-in one below unless given; the synthetic
ScienceQA world trains it on the built-in corpus plus its own text, see ``mmkd.data.synth.tokenizer_corpus``), saved
as a plain transformers tokenizer folder, and loaded back with ``AutoTokenizer.from_pretrained(folder)`` like any hub
tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS)

# One turn is `<|role|>\n{content}<|end|>`; nothing follows `<|end|>`, so an assistant turn is exactly its content
# plus the end-of-turn token, which is what the collator labels. The generation prompt is `<|assistant|>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Words and phrasings the prompts use, so that the tokenizer has merges for them even when trained on little text.
BUILTIN_CORPUS = [
    "Answer with the option's letter from the given choices directly.",
    "Context: Look at the picture. Then answer the question below.",
    "Question: Which of the following is true? Options: A. yes B. no C. maybe D. none of these",
    "Give a brief description of the image.",
    "Describe the image concisely. Render a clear and concise summary of the photo.",
    "The answer is A. The answer is B. The answer is C. The answer is D. The answer is E.",
    "Lecture: Solution: Look at the image. Read the text. Think about the question.",
    "How many shapes are there? What colour is the shape? Which shape is shown? Where is the shape?",
    "red green blue yellow purple orange black white gray brown pink cyan circle square triangle star",
    "left right top bottom north south east west farthest closest tallest shortest largest smallest",
    "Which city is farthest north? Which bar is the tallest? Which word would you find on a dictionary page?",
    "natural science social science language science physics biology geography economics grammar",
    "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 11 12",
]


def build_tokenizer(
    out_dir: str | os.PathLike[str],
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline and save it as a transformers tokenizer folder.

    The result has a chat template (``<|user|>\\n...<|end|><|assistant|>\\n...<|end|>``), ``<|pad|>`` as pad token,
    ``<|end|>`` as eos (end of turn) token and ``<image>`` as a single special token (``tokenizer.image_token``).
    Training is deterministic: the same texts and vocabulary size give byte-identical files.

    Args:
        out_dir: Folder to write (created if missing); load it back with ``AutoTokenizer.from_pretrained``.
        texts: Training corpus; default: the built-in corpus (:data:`BUILTIN_CORPUS`).
        vocab_size: Total vocabulary size including the 256 byte symbols and the special tokens.

    Returns:
        The tokenizer, as loaded back from ``out_dir``.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: expected at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    corpus = list(BUILTIN_CORPUS if texts is None else texts)
    if not corpus:
        raise ValueError("build_tokenizer: the training corpus is empty; expected at least one text")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0.. in this order: pad=0, eos=1, image=2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))
