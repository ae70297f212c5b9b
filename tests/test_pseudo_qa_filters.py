"""Parsing and filtering generator output (DESIGN.md section 4) on adversarial text."""

import pyarrow as pa
import pytest

from leaml_ray.models import chat
from leaml_ray.stages.pseudo_qa import AnswerRules, answer_rules, check_pair, parse_qa

RULES = AnswerRules(max_answer_words=2, max_question_words=12, vocabulary=frozenset({"red", "blue", "circle", "2"}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Question: what color is the circle?\nAnswer: red", ("what color is the circle?", "red")),
        ("  Question:   what   color?\n  Answer:  blue  \nQuestion: more", ("what color?", "blue")),
        ("Question: which?\nA. red\nB. blue\nAnswer: B", ("which?\nA. red\nB. blue", "B")),
        ("garbage @@@ ###", "unparsable"),
        ("", "unparsable"),
        ("Question: what color is it? red", "unparsable"),  # no "Answer:"
        ("Answer: red\nQuestion: what?", "unparsable"),  # wrong order
        ("Question: \nAnswer: red", "empty_question"),
        ("Question: what color?\nAnswer:   ", "empty_answer"),
        ("Question: what color?\nAnswer: \x7f\x00", "empty_answer"),  # control characters only
        ("Question: what color?\nAnswer:\ufffd", "bad_unicode"),  # undecodable bytes from the tokenizer
        ("Question: welche Farbe hat der Kreis?\nAnswer: röt", ("welche Farbe hat der Kreis?", "röt")),
        ("Question: cafe\u0301?\nAnswer: x", ("café?", "x")),  # NFC
    ],
)
def test_parse_qa(text, expected):
    assert parse_qa(text) == expected


def test_check_pair_reasons_and_duplicates():
    seen: set[str] = set()
    assert check_pair("what color is the circle?", "Red", RULES, seen) is None
    assert check_pair("What color is the circle", "blue", RULES, seen) == "duplicate_question"  # normalised
    assert check_pair("Ask a question about this image and answer it.", "red", RULES, seen) == "prompt_echo"
    assert check_pair("what shape?", "a very long answer here", RULES, seen) == "answer_too_long"
    assert check_pair("what shape?", "square", RULES, seen) == "outside_vocabulary"
    assert check_pair(" ".join(["word"] * 13) + "?", "red", RULES, seen) == "question_too_long"
    open_rules = AnswerRules(max_answer_words=2, max_question_words=12, vocabulary=None)
    assert check_pair("what shape?", "square", open_rules, set()) is None


def test_answer_rules_from_labeled_examples():
    closed = pa.table({"response": [chat.qa_target(f"q{i}?", ["red", "blue"][i % 2]) for i in range(40)]})
    rules = answer_rules(closed, "auto")
    assert rules.vocabulary == {"red", "blue"}
    assert rules.max_answer_words == 1
    open_ended = pa.table({"response": [chat.qa_target(f"q{i}?", f"answer number {i}") for i in range(40)]})
    assert answer_rules(open_ended, "auto").vocabulary is None
    assert answer_rules(open_ended, "on").vocabulary is not None
    assert answer_rules(closed, "off").vocabulary is None
