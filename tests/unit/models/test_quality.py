"""The world-3 caption scoring the zoo's measurements rest on (generation itself: transformers' greedy search)."""

from leaml_ray.data import world3
from leaml_ray.models import quality
from leaml_ray.models.quality import world3_caption_right


def test_a_true_caption_is_right_on_every_attribute_and_each_mistake_costs_its_own():
    for i in range(200):
        scene = world3.make_scene("scope", 0, i)
        right = world3_caption_right(world3.caption(scene), scene)
        assert all(all(marks) for marks in right.values()) and len(right["shape"]) == len(scene.items)
    scene = world3.Scene(
        "scope",
        "dotted",
        (
            world3.Item("left", "circle", "red", "large", "ringed"),
            world3.Item("right", "square", "blue", "small", "plain"),
        ),
    )
    wrong_colour = (
        "a large ringed black circle on the left and a small blue square on the right on a dotted background."
    )
    right = world3_caption_right(wrong_colour, scene)
    assert right["color"] == [False, True] and all(right["shape"] + right["size"] + right["surface"])
    missing = "a small plain blue square on the right on a striped background."  # "plain" is never said
    right = world3_caption_right(missing, scene)
    assert right["shape"] == [False, False] and right["count"] == [False] and right["background"] == [False]
    missing = "a small blue square on the right on a dotted background."
    right = world3_caption_right(missing, scene)
    assert right["shape"] == [False, True] and right["surface"] == [False, True] and right["background"] == [True]


def test_generate_answers_each_image_and_instruction_once(tiny_model_dir):
    items = [(world3.sample("scope", 0, i)[1], "Describe this image.") for i in range(3)]
    got = quality.generate(tiny_model_dir, items, max_new_tokens=3, batch_size=2)
    assert len(got) == 3 and all(isinstance(g, str) for g in got)
    assert set(quality.world3_qa_accuracy(tiny_model_dir, "scope", 1, 0)) == set(world3.DOMAINS["scope"].categories)
