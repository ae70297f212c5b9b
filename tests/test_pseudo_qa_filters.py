"""Parsing and filtering generator output (docs/design.md#pseudo-qa-generation-and-filters) on adversarial text."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaml_ray import diagnostics
from leaml_ray.data import synthetic
from leaml_ray.formats import qa_target
from leaml_ray.pseudo.filters import (
    AnswerRules,
    answer_rules,
    caption_filter,
    check_pair,
    filter_replies,
    parse_qa,
)
from leaml_ray.pseudo.replies import draw_questions, join_reply, question_bank, requests_for

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
    closed = pa.table({"response": [qa_target(f"q{i}?", ["red", "blue"][i % 2]) for i in range(40)]})
    rules = answer_rules(closed, "auto")
    assert rules.vocabulary == {"red", "blue"}
    assert rules.max_answer_words == 1
    open_ended = pa.table({"response": [qa_target(f"q{i}?", f"answer number {i}") for i in range(40)]})
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


def _part(tmp_path, rows: list[dict]) -> str:
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), parts / "part-0.parquet")
    return str(parts)


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
    rules = AnswerRules(max_answer_words=3, max_question_words=20, vocabulary=None)
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


def test_pair_precision_knows_what_a_synthetic_image_lacks():
    scene = synthetic.make_scene("target", 0, 5)  # one small blue triangle on the left, checkered background
    iid = synthetic.image_id("target", 0, 5)
    kept = pa.table(
        {
            "image_id": [iid] * 4,
            "question": [
                "what shape is on the left?",
                "what color is the shape on the left?",
                "what shape is on the right?",  # there is nothing on the right
                "what pattern is the background?",
            ],
            "answer": [scene.items[0].shape, "red", "circle", scene.pattern],
        }
    )
    found = diagnostics.pair_precision(kept, None)
    assert (found["audited"], found["audited_correct"], found["absent"]) == (4, 2, 1)
    assert found["precision_by_category"]["shape"] == {"n": 2, "precision": 0.5}
    assert found["precision_by_category"]["color"]["precision"] == 0.0


def test_caption_fidelity_compares_the_generator_with_the_teacher_and_the_truth():
    ids = [synthetic.image_id("target", 0, k) for k in range(4)]
    truth = {i: synthetic.caption(synthetic.make_scene("target", 0, k)) for k, i in enumerate(ids)}
    half = {i: " ".join(t.split()[:3]) for i, t in truth.items()}
    found = diagnostics.caption_fidelity(half, truth)
    assert found["n"] == 4 and found["teacher_vs_truth"] == 1.0
    assert 0 < found["generator_vs_truth"] == found["share_of_teacher"] < 1
    assert diagnostics.word_f1("a red circle", "the red circle.") == 1.0
    assert diagnostics.word_f1("blue", "red") == 0.0


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
    requests = requests_for(images, samples=2, seed=0, questions=bank)
    assert requests["key"].to_pylist() == ["i1#0", "i1#1", "i2#0", "i2#1"]
    prefixes = requests["response_prefix"].to_pylist()
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in prefixes)
    # the generator's continuation after the prefix parses back into the drawn question and its answer
    replies = pa.table(
        {"image_id": requests["image_id"], "key": requests["key"], "response_prefix": prefixes, "text": [" blue"] * 4}
    )
    parsed = [parse_qa(t) for t in join_reply(replies)["text"].to_pylist()]
    assert [q for q, _ in parsed] == [p[len("Question: ") : -len("\nAnswer:")] for p in prefixes]
    assert {a for _, a in parsed} == {"blue"}
