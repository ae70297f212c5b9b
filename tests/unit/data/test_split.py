"""The label split (pure functions): by image, stratified, seeded, validation images apart."""

from collections import Counter

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


def test_validation_images_stay_out_of_train_and_test():
    imgs = {**images({"a": 100, "b": 100}), **{f"v-{k}": ImageInfo({"a"}, "val", True) for k in range(30)}}
    splits = assign_splits(imgs, label_ratio=0.1, test_ratio=0.2, seed=0)
    assert {i for i, s in splits.items() if s == "val"} == {f"v-{k}" for k in range(30)}
    counts = Counter(splits.values())
    # test and labeled shares are of the 200 non-validation images, exactly as without them
    assert counts["test"] == 40 and counts["labeled"] == 16
    without = assign_splits(images({"a": 100, "b": 100}), 0.1, 0.2, 0)
    assert splits == {**without, **{f"v-{k}": "val" for k in range(30)}}
