"""The text layouts every layer shares."""

from leaml_ray.formats import question_text


def test_multiple_choice_prompt_letters_options():
    text = question_text("Which sport?", ["Floorball", "Basketball"])
    assert text == "Which sport?\nA. Floorball\nB. Basketball\nAnswer with the option's letter."
