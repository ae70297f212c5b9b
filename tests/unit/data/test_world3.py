"""World 3 (docs/world3.md): deterministic scenes, the domain labels' rules, nine categories with three paraphrases,
captions without a domain word, even yes/no, and every category answerable zero-shot in principle."""

from collections import Counter

from leaml_ray.data import world3
from leaml_ray.data.world3 import Item, Scene

DOMAIN_WORDS = ("polyp", "ulcer", "erosion", "normal", "finding", "none", "grade")


def _scenes(domain: str, n: int = 1500) -> list[tuple[int, Scene]]:
    return [(i, world3.make_scene(domain, 0, i)) for i in range(n)]


def test_scenes_and_images_are_deterministic_and_depend_on_seed_and_domain():
    a, b = world3.make_scene("scope", 0, 5), world3.make_scene("scope", 0, 5)
    assert a == b and world3.render(a, 84, 5).tobytes() == world3.render(b, 84, 5).tobytes()
    assert world3.render(a, 84, 5).size == (84, 84)
    others = [world3.make_scene("scope", 1, 5), world3.make_scene("general", 0, 5)]
    assert all(o != a for o in others)


def test_findings_follow_from_combinations_of_visual_properties():
    def item(shape: str, color: str, size: str, surface: str = "plain") -> Item:
        return Item("left", shape, color, size, surface)

    assert world3.finding(item("circle", "red", "large")) == "polyp"
    assert world3.finding(item("circle", "red", "small")) == "normal"
    assert world3.finding(item("triangle", "black", "small", "ringed")) == "ulcer"  # the first rule that holds
    assert world3.finding(item("square", "orange", "small", "ringed")) == "erosion"
    assert world3.finding(item("triangle", "red", "large", "ringed")) == "normal"
    scene = Scene(
        "scope", "dotted", (item("circle", "blue", "large"), Item("right", "square", "red", "small", "ringed"))
    )
    assert world3.findings(scene) == "erosion; polyp"  # sorted, "; "-joined (Kvasir-VQA's form)
    assert world3.findings(Scene("scope", "dotted", (item("square", "red", "large"),))) == "none"


def test_the_scope_domain_asks_nine_categories_in_three_paraphrases_each():
    scenes = _scenes("scope", 600)
    asked: dict[str, set[str]] = {}
    for i, scene in scenes:
        qas = world3.questions(scene, 0, i)
        assert [c for c, _, _ in qas] == list(world3.DOMAINS["scope"].categories)  # one per category: 9 per image
        for category, question, _ in qas:
            for slot, where in world3.WHERE.items():  # the template, whichever slot it names
                question = question.replace(where, "{where}").replace(slot, "{slot}")
            asked.setdefault(category, set()).add(question)
    assert asked == {c: set(t) for c, t in world3.TEMPLATES.items()}  # every paraphrase used, nothing else
    answers = world3.answer_sets("scope")
    assert {len(answers[c]) for c in ("finding", "findings", "colors")} == {4, 8, 25}  # not mostly binary
    assert "{" not in " ".join(q for _, s in scenes[:50] for _, q, _ in world3.questions(s, 0, 0))


def test_yes_and_no_come_out_even_and_no_category_is_one_answer():
    counts: dict[str, Counter] = {}
    for i, scene in _scenes("scope"):
        for category, _, answer in world3.questions(scene, 0, i):
            counts.setdefault(category, Counter())[answer] += 1
    yes = counts["presence"]["yes"] / sum(counts["presence"].values())
    assert 0.45 < yes < 0.55
    for category, c in counts.items():
        assert max(c.values()) / sum(c.values()) < 0.55, (category, c.most_common(2))


def test_captions_describe_in_general_words_and_the_teacher_never_learns_a_domain_label():
    for _, scene in _scenes("scope", 300):
        text = world3.caption(scene)
        assert not any(w in text.split() for w in DOMAIN_WORDS), text
        assert all(item.color in text and item.shape in text for item in scene.items)
    assert set(world3.DOMAINS["wide"].categories).isdisjoint(world3.DOMAIN_LABELS)  # the teacher's pretraining


def test_the_general_domain_knows_the_questions_not_the_look():
    general, scope = world3.answer_sets("general"), world3.answer_sets("scope")
    # every scope category has answers the bases give in the general domain: zero-shot can be above 0% on each
    assert all(scope[c] & general[c] for c in scope), {c: scope[c] & general[c] for c in scope}
    assert general["finding"] == {"normal"} and general["findings"] == {"none"}
    scenes = [s for _, s in _scenes("general", 300)]
    assert {i.surface for s in scenes for i in s.items} == {"plain"}  # rings are the scope's look
    assert {s.background for s in scenes} == {"plain", "striped"}
    assert {"orange", "purple", "black"}.isdisjoint({i.color for s in scenes for i in s.items})


def test_the_bases_read_every_domain_word_without_its_look():
    """The text-only sentences name the findings and the scope's colours and textures, and never put a finding in
    the same sentence as a shape, colour, size or surface (that would teach the look from text)."""
    sentences = [world3.vocabulary_sentence(1000, i) for i in range(400)]
    words = {w.strip(".;") for s in sentences for w in s.split()}
    assert {"polyp", "ulcer", "erosion", "normal", "orange", "purple", "black", "ringed", "dotted"} <= words
    looks = set(world3.SHAPES) | set(world3.COLORS) | set(world3.SIZES) | {"ringed"}
    for s in sentences:
        if any(f in s for f in world3.FINDINGS):
            assert looks.isdisjoint(w.strip(".;") for w in s.split()), s
    assert world3.sample("scope", 0, 5)[0] == world3.make_scene("scope", 0, 5)
    assert world3.sample("scope", 0, 5)[1].size == (84, 84)


def test_every_question_asked_is_a_fact_of_its_image_and_ids_round_trip():
    for i, scene in _scenes("scope", 200):
        iid = world3.image_id("scope", 0, i)
        assert world3.parse_image_id(iid) == ("scope", 0, i)
        found, facts = world3.facts(iid)
        assert found == scene
        for category, question, answer in world3.questions(scene, 0, i):
            assert facts[question] == (category, answer)
            assert world3.askable("scope")[question] == category
        empty = [s for s in world3.SLOTS if s not in {item.slot for item in scene.items}]
        for slot in empty:  # asking the colour of nothing is askable, but no fact of this image
            assert f"what color is the object {world3.WHERE[slot]}?" not in facts
    assert world3.parse_image_id("syn-target-0-0000001") is None and world3.facts("img-7") is None
