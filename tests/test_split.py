"""The label split (pure functions) and the synthetic world."""

from collections import Counter

from leaml_ray.data import synthetic
from leaml_ray.data.split import ImageInfo, assign_splits


def images(per_category: dict[str, int], hint=None) -> dict[str, ImageInfo]:
    return {
        f"{cat}-{k}": ImageInfo(categories={cat}, hint=hint, has_qa=True)
        for cat, n in per_category.items()
        for k in range(n)
    }


def test_label_ratio_is_by_image_and_stratified():
    imgs = images({"a": 100, "b": 300, "c": 600})
    splits = assign_splits(imgs, label_ratio=0.1, test_ratio=0.2, seed=0)
    counts = Counter(splits.values())
    assert counts["test"] == 200
    assert counts["labeled"] == 80  # 10% of the 800 train images
    labeled = Counter(i.split("-")[0] for i, s in splits.items() if s == "labeled")
    test = Counter(i.split("-")[0] for i, s in splits.items() if s == "test")
    assert labeled == {"a": 8, "b": 24, "c": 48}
    assert test == {"a": 20, "b": 60, "c": 120}


def test_split_is_deterministic_per_seed():
    imgs = images({"a": 50, "b": 50})
    assert assign_splits(imgs, 0.2, 0.2, seed=1) == assign_splits(imgs, 0.2, 0.2, seed=1)
    assert assign_splits(imgs, 0.2, 0.2, seed=1) != assign_splits(imgs, 0.2, 0.2, seed=2)


def test_every_category_gets_a_labeled_image():
    imgs = images({"big": 1000, "rare": 3})
    splits = assign_splits(imgs, label_ratio=0.01, test_ratio=0.0, seed=0)
    labeled = Counter(i.split("-")[0] for i, s in splits.items() if s == "labeled")
    assert labeled["rare"] >= 1 and labeled["big"] == 10


def test_multi_category_images_and_coverage():
    imgs = {f"i{k}": ImageInfo(categories={"x", "y"}, has_qa=True) for k in range(30)}
    imgs["odd"] = ImageInfo(categories={"z"}, has_qa=True)
    splits = assign_splits(imgs, label_ratio=0.05, test_ratio=0.0, seed=3)
    labeled = [i for i, s in splits.items() if s == "labeled"]
    assert "odd" in labeled and 2 <= len(labeled) <= 3


def test_source_test_split_wins_and_image_only_rows_stay_unlabeled():
    imgs = images({"a": 20})
    imgs.update({f"t{k}": ImageInfo(categories={"a"}, hint="test", has_qa=True) for k in range(5)})
    imgs.update({f"u{k}": ImageInfo(hint="unlabeled") for k in range(7)})
    splits = assign_splits(imgs, label_ratio=0.5, test_ratio=0.3, seed=0)
    assert {i for i, s in splits.items() if s == "test"} == {f"t{k}" for k in range(5)}
    assert all(splits[f"u{k}"] == "unlabeled" for k in range(7))
    assert Counter(splits.values())["labeled"] == 10


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


def test_validation_images_stay_out_of_train_and_test():
    imgs = {**images({"a": 100, "b": 100}), **{f"v-{k}": ImageInfo({"a"}, "val", True) for k in range(30)}}
    splits = assign_splits(imgs, label_ratio=0.1, test_ratio=0.2, seed=0)
    assert {i for i, s in splits.items() if s == "val"} == {f"v-{k}" for k in range(30)}
    counts = Counter(splits.values())
    # test and labeled shares are of the 200 non-validation images, exactly as without them
    assert counts["test"] == 40 and counts["labeled"] == 16
    without = assign_splits(images({"a": 100, "b": 100}), 0.1, 0.2, 0)
    assert splits == {**without, **{f"v-{k}": "val" for k in range(30)}}
