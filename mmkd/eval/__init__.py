"""ScienceQA-style evaluation: answer parsing as LLaVA's scorer, accuracy by category, the generation loop."""

from mmkd.eval.answer_key import (
    AnswerKey,
    KeyedQuestion,
    key_from_record,
    load_question_file_key,
    load_scienceqa_key,
)
from mmkd.eval.answers import AnswerWriter, read_answers
from mmkd.eval.categories import CATEGORIES, PROMPT_CATEGORIES, problem_categories, prompt_categories
from mmkd.eval.metric import ScienceQAAccuracy
from mmkd.eval.parsing import OPTION_LETTERS, Verdict, judge, parse_answer
from mmkd.eval.score import score_answer_file, score_answers

__all__ = [
    "CATEGORIES",
    "OPTION_LETTERS",
    "PROMPT_CATEGORIES",
    "AnswerKey",
    "AnswerWriter",
    "KeyedQuestion",
    "ScienceQAAccuracy",
    "Verdict",
    "judge",
    "key_from_record",
    "load_question_file_key",
    "load_scienceqa_key",
    "parse_answer",
    "problem_categories",
    "prompt_categories",
    "read_answers",
    "score_answer_file",
    "score_answers",
]
