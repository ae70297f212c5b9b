"""Generation requests: labeled questions drawn per image, replies joined to their prefixes."""

import pyarrow as pa

from leaml_ray.pseudo.filters import (
    parse_qa,
)
from leaml_ray.pseudo.replies import draw_questions, join_reply, question_bank, requests_for


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
    requests = requests_for(images, samples=2, seed=0, prompt="Ask about this scan.", questions=bank)
    assert set(requests["instruction"].to_pylist()) == {"Ask about this scan."}
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
