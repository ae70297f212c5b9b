"""The pseudo_qa diagnostics: kept-pair precision on synthetic images, caption fidelity."""

import pyarrow as pa

from leaml_ray import diagnostics
from leaml_ray.data import synthetic, world3


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


def test_world_3_images_are_audited_from_their_scene_too():
    index = next(i for i in range(100) if len(world3.make_scene("scope", 0, i).items) == 1)
    scene, iid = world3.make_scene("scope", 0, index), world3.image_id("scope", 0, index)
    (item,) = scene.items
    empty = next(s for s in world3.SLOTS if s != item.slot)
    kept = pa.table(
        {
            "image_id": [iid] * 4,
            "question": [
                f"what shape is {world3.WHERE[item.slot]}?",
                "which findings are in the image?",
                f"what shape is {world3.WHERE[empty]}?",  # nothing there
                "what is in the fridge?",  # no template asks this: not judged
            ],
            "answer": [item.shape, world3.findings(scene), "circle", "milk"],
        }
    )
    found = diagnostics.pair_precision(kept, None)
    assert (found["audited"], found["audited_correct"], found["absent"]) == (3, 2, 1)
    truth = world3.caption(scene)
    assert diagnostics.caption_fidelity({iid: truth}, {iid: truth})["teacher_vs_truth"] == 1.0
