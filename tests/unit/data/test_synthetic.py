"""The synthetic world: deterministic, a target domain out of the general one's distribution, balanced answers."""

from collections import Counter

from leaml_ray.data import synthetic


def test_synthetic_world_is_deterministic():
    a = synthetic.sample("target", 0, 5, 56)
    b = synthetic.sample("target", 0, 5, 56)
    assert a[0] == b[0] and synthetic.png_bytes(a[1]) == synthetic.png_bytes(b[1])
    assert synthetic.sample("target", 1, 5, 56)[0] != a[0] or synthetic.sample("target", 0, 6, 56)[0] != a[0]


def test_target_domain_is_out_of_distribution():
    general = [synthetic.make_scene("general", 0, i) for i in range(300)]
    target = [synthetic.make_scene("target", 0, i) for i in range(300)]
    general_colors = {it.color for s in general for it in s.items}
    target_colors = {it.color for s in target for it in s.items}
    assert general_colors == set(synthetic.BASE_COLORS)
    assert target_colors - general_colors == {"purple", "orange", "black"}
    assert {s.pattern for s in general} == {"plain"} and "plain" not in {s.pattern for s in target}
    general_cats = {c for i, s in enumerate(general) for c, _, _ in synthetic.questions(s, 0, i)}
    target_cats = {c for i, s in enumerate(target) for c, _, _ in synthetic.questions(s, 0, i)}
    assert target_cats - general_cats == {"size", "background"}
    # captions name what varies in a domain: sizes and backgrounds only outside the general domain
    assert "background" not in synthetic.caption(general[0]) and "background" in synthetic.caption(target[0])


def test_synthetic_answers_are_balanced():
    scenes = [(i, synthetic.make_scene("target", 0, i)) for i in range(2000)]
    for category in ("size", "background", "shape"):
        answers = Counter(a for i, s in scenes for c, _, a in synthetic.questions(s, 0, i) if c == category)
        assert max(answers.values()) / sum(answers.values()) < 1 / len(answers) + 0.05, (category, answers)


def test_caption_matches_the_questions():
    for i in range(50):
        scene = synthetic.make_scene("target", 0, i)
        text = synthetic.caption(scene)
        for category, _, answer in synthetic.questions(scene, 0, i):
            if category in ("shape", "color", "size", "background"):
                assert answer in text
