"""Parsing and filtering generator output (DESIGN.md section 4) on adversarial text."""

import pyarrow as pa
import pytest

from leaml_ray.models import chat
from leaml_ray.stages.pseudo_qa import (
    AnswerRules,
    _join_reply,
    _requests,
    answer_rules,
    caption_filter,
    check_pair,
    draw_questions,
    parse_qa,
    pseudo_qa_inputs,
    question_bank,
)

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


def test_caption_filter_keeps_answers_the_caption_names_and_those_it_cannot_check():
    captions = pa.table(
        {
            "image_id": ["a", "b"],
            "caption": ["A small red circle on the left, on a striped background.", "A large blue square."],
        }
    )
    pairs = [
        ("a", "what color is the shape?", "Red"),  # named in a's caption (case and punctuation folded)
        ("a", "what color is the shape?", "blue"),  # a caption word, but not in a's caption: rejected
        ("a", "what pattern is the background?", "striped"),
        ("b", "what pattern is the background?", "striped"),  # b's caption names no pattern: rejected
        ("b", "is there a shape?", "yes"),  # no caption uses "yes": cannot be checked, kept
        ("b", "what size?", "large blue"),  # a phrase of b's caption
        ("c", "what color?", "red"),  # an image without a caption cannot ground a caption word
    ]
    kept = pa.table(
        {
            "pseudo_id": [f"{i}#{k}" for k, (i, _, _) in enumerate(pairs)],
            "image_id": [i for i, _, _ in pairs],
            "question": [q for _, q, _ in pairs],
            "answer": [a for _, _, a in pairs],
        }
    )
    out, rejects = caption_filter(kept, captions)
    assert out["pseudo_id"].to_pylist() == ["a#0", "a#2", "b#4", "b#5"]
    assert rejects["pseudo_id"].to_pylist() == ["a#1", "b#3", "c#6"]
    assert set(rejects["reason"].to_pylist()) == {"not_in_caption"}
    assert rejects["text"][0].as_py() == "Question: what color is the shape?\nAnswer: blue"


def test_the_caption_filter_makes_captions_an_input_of_the_stage(tmp_path):
    from tests.conftest import make_config

    assert "captions.parquet" not in pseudo_qa_inputs(make_config(tmp_path))
    assert "captions.parquet" in pseudo_qa_inputs(make_config(tmp_path, "pseudo_qa.consistency_filter=caption"))


def test_labeled_questions_are_distinct_per_image_and_drawn_as_often_as_labeled():
    questions = ["what shape?", "what color?", "what color?", "what size?"]
    qa = pa.table({"image_id": ["l1", "l1", "l2", "l2"], "question": questions, "answer": ["a", "b", "c", "d"]})
    bank = question_bank(qa)
    assert sorted(bank.items()) == [("what color?", 2), ("what shape?", 1), ("what size?", 1)]
    assert draw_questions(bank, 5, seed=3) == draw_questions(bank, 5, seed=3)  # seeded
    assert sorted(draw_questions(bank, 5, seed=3)) == sorted(bank)  # all of them when asked for more
    firsts = [draw_questions(bank, 1, seed=s)[0] for s in range(3000)]
    assert 0.42 < firsts.count("what color?") / 3000 < 0.58  # asked twice as often as each of the others: 1/2
    pairs = [draw_questions(bank, 2, seed=s) for s in range(200)]
    assert all(len(set(p)) == 2 for p in pairs)

    images = pa.table({"image_id": ["i1", "i2"], "image": [b"x", b"y"]})
    requests = _requests(images, samples=2, seed=0, questions=bank)
    assert requests["key"].to_pylist() == ["i1#0", "i1#1", "i2#0", "i2#1"]
    prefixes = requests["response_prefix"].to_pylist()
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in prefixes)
    # the generator's continuation after the prefix parses back into the drawn question and its answer
    replies = pa.table(
        {"image_id": requests["image_id"], "key": requests["key"], "response_prefix": prefixes, "text": [" blue"] * 4}
    )
    parsed = [parse_qa(t) for t in _join_reply(replies)["text"].to_pylist()]
    assert [q for q, _ in parsed] == [p[len("Question: ") : -len("\nAnswer:")] for p in prefixes]
    assert {a for _, a in parsed} == {"blue"}
