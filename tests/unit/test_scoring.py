"""Answer scoring: normalisation edge cases, option letters, multi-label sets, macro accuracy."""

import pytest

from leaml_ray.scoring import accuracy, is_correct, normalize, option_letter


@pytest.mark.parametrize(
    ("prediction", "answer", "correct"),
    [
        ("Red", "red", True),
        ("  red. ", "red", True),
        ("the red one", "red one", True),  # articles
        ("A", "a", True),  # a lone letter is not an article
        ("ＲＥＤ", "red", True),  # NFKC
        ("reddish", "red", False),
        ("polyp; ulcer", "ulcer; polyp", True),  # "; "-joined answers as sets
        ("polyp", "ulcer; polyp", False),
        ("polyp;ulcer;", "polyp; ulcer", True),
        ("", "red", False),
        ("", "", False),  # an empty gold answer never counts as matched
        # VQAv2's evaluation steps: number words, contractions, a digit's comma and decimal point
        ("two", "2", True),
        ("Two polyps.", "2 polyps", True),
        ("none", "0", True),
        ("dont know", "don't know", True),
        ("it\u2019s red", "its red", True),
        ("1,000", "1000", True),
        ("2.5 mm", "2.5 mm", True),
        ("2.5", "25", False),  # a decimal point is not punctuation
        ("2.5", "2 5", False),
        ("1,000", "1 000", False),
        ("3, 4", "3 4", True),  # a comma that is not inside a number is
        ("7.", "7", True),
    ],
)
def test_is_correct_open(prediction, answer, correct):
    assert is_correct(prediction, answer) is correct


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [("B", "B"), ("(b)", "B"), ("B. tennis", "B"), ("b) tennis", "B"), ("tennis", "B"), ("E", None), ("", None)],
)
def test_option_letter(prediction, letter):
    assert option_letter(prediction, ["golf", "tennis", "rugby", "polo"]) == letter


def test_multiple_choice_is_scored_by_letter():
    assert is_correct("B. tennis", "B", ["golf", "tennis"])
    assert not is_correct("golf", "B", ["golf", "tennis"])


def test_accuracy_is_macro_over_categories():
    rows = [{"category": "a", "correct": True}] * 9 + [{"category": "a", "correct": False}]
    rows += [{"category": "b", "correct": False}]
    result = accuracy(rows)
    assert result["per_category"] == {"a": 0.9, "b": 0.0}
    assert result["accuracy"] == pytest.approx(0.45)
    assert result["micro"] == pytest.approx(9 / 11)
    assert result["n"] == 11
    assert normalize(None) == ""


def test_prior_baselines_guess_from_the_labeled_answers_alone():
    from leaml_ray.scoring import prior_baselines

    labeled = [
        {"category": "color", "question": "what color?", "answer": "red"},
        {"category": "color", "question": "What color", "answer": "Red."},  # the same question and answer, normalised
        {"category": "color", "question": "what color?", "answer": "blue"},
        {"category": "count", "question": "how many?", "answer": "2"},
        {"category": "colors", "question": "which colors?", "answer": "red; blue"},
    ]
    test = [
        {"category": "color", "question": "what color?", "answer": "red"},  # chance 1/2, blind right
        {"category": "color", "question": "which color is it?", "answer": "blue"},  # unseen text: the category's red
        {"category": "count", "question": "how many?", "answer": "3"},  # never a labeled answer: 0 for both
        {"category": "colors", "question": "which colors?", "answer": "blue; red"},  # sets: chance 1/1, blind right
    ]
    got = prior_baselines(labeled, test)
    assert got["chance"]["per_category"] == {"color": 0.5, "colors": 1.0, "count": 0.0}
    assert got["blind"]["per_category"] == {"color": 0.5, "colors": 1.0, "count": 0.0}
    assert got["chance"]["accuracy"] == pytest.approx(0.5) and got["blind"]["n"] == 4
    assert prior_baselines([], test)["chance"]["accuracy"] == 0.0  # no labels: nothing to guess from
