"""Parsing and filtering generator output (docs/design.md#pseudo-qa-generation-and-filters) on adversarial text."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaml_ray.formats import qa_target
from leaml_ray.pseudo.filters import (
    AnswerRules,
    answer_rules,
    caption_filter,
    check_pair,
    filter_replies,
    parse_qa,
)

PROMPT = "Ask a question about this image and answer it."
RULES = AnswerRules(2, 12, frozenset({"red", "blue", "circle", "2"}), PROMPT)


def _part(tmp_path, rows: list[dict]) -> str:
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), parts / "part-0.parquet")
    return str(parts)


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
    # a domain's own prompt (pseudo_qa.qa_prompt), echoed back as the question
    endoscopy = AnswerRules(2, 12, None, "Ask one question about this endoscopy image and answer it.")
    assert check_pair("ask one question about this endoscopy image and answer it", "red", endoscopy, set()) == (
        "prompt_echo"
    )
    open_rules = AnswerRules(2, 12, None, PROMPT)
    assert check_pair("what shape?", "square", open_rules, set()) is None


def test_answer_rules_from_labeled_examples():
    closed = pa.table({"response": [qa_target(f"q{i}?", ["red", "blue"][i % 2]) for i in range(40)]})
    rules = answer_rules(closed, "auto", PROMPT)
    assert rules.vocabulary == {"red", "blue"}
    assert rules.max_answer_words == 1
    open_ended = pa.table({"response": [qa_target(f"q{i}?", f"answer number {i}") for i in range(40)]})
    assert answer_rules(open_ended, "auto", PROMPT).vocabulary is None
    assert answer_rules(open_ended, "on", PROMPT).vocabulary is not None
    assert answer_rules(closed, "off", PROMPT).vocabulary is None


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


def test_question_pmi_and_answer_confidence_filter_pairs_and_say_why(tmp_path):
    # "on the right?" is likely given 5 images (log p = -1) and unlikely given a sixth (-6): that one lacks it
    rows = []
    for k in range(6):
        q = "what shape is on the right?"
        rows.append(
            {
                "image_id": f"img{k}",
                "key": f"img{k}#0",
                "text": f"Question: {q}\nAnswer: circle",
                "response_prefix": f"Question: {q}\nAnswer:",
                "logprob": math.log(0.9 if k else 0.2),
                "prefix_logprob": -6.0 if k == 5 else -1.0,
            }
        )
    rows.append(
        {
            **rows[1],
            "key": "img1#1",
            "text": "Question: how many?\nAnswer: 2",
            "logprob": math.log(0.3),
            "response_prefix": "Question: how many?\nAnswer:",
            "prefix_logprob": -2.0,
        }
    )
    rows.append({"image_id": "img0", "key": "diagnostic:caption:img0", "text": "a red circle.", "response_prefix": ""})
    parts = _part(tmp_path, rows)
    rules = AnswerRules(3, 20, None, PROMPT)
    skip = {"diagnostic:caption:img0"}
    kept, rejects = filter_replies(parts, rules, skip)
    assert kept.num_rows == 7 and rejects.num_rows == 0  # measured, nothing filtered by default
    pmi = dict(zip(kept["pseudo_id"].to_pylist(), kept["question_pmi"].to_pylist(), strict=True))
    assert pmi["img5#0"] < -4 < 0 < pmi["img1#0"] and pmi["img1#1"] is None  # one image: no average to compare
    assert kept["answer_confidence"][0].as_py() == pytest.approx(0.2)
    kept, rejects = filter_replies(parts, rules, skip, min_question_pmi=-1.0, min_answer_confidence=0.5)
    reasons = dict(zip(rejects["pseudo_id"].to_pylist(), rejects["reason"].to_pylist(), strict=True))
    assert reasons == {"img5#0": "implausible_question", "img0#0": "low_confidence", "img1#1": "low_confidence"}
    assert sorted(kept["pseudo_id"].to_pylist()) == ["img1#0", "img2#0", "img3#0", "img4#0"]
