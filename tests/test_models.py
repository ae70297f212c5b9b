"""The model layer on a random-init tiny model: specs and references, save/load, chat formatting and label masking."""

from pathlib import Path

import torch

from leaml_ray.data import synthetic
from leaml_ray.formats import qa_target, question_text
from leaml_ray.models import chat
from leaml_ray.models.registry import load_model, load_processor, model_folder, model_source
from leaml_ray.models.spec import model_spec
from leaml_ray.models.tiny import SPECIAL_TOKENS, build_tokenizer
from leaml_ray.models.zoo import recipe_key, zoo_folder
from tests.conftest import make_config
from tests.helpers import local_spec


def test_specs_follow_the_config_and_name_zoo_models_by_their_recipe(tmp_path):
    cfg = make_config(tmp_path, "target.model=/models/x", "target.trust_remote_code=true", "teacher.dtype=bfloat16")
    target, teacher = model_spec(cfg, "target"), model_spec(cfg, "teacher")
    assert target.model == "/models/x" and target.trust_remote_code and target.zoo_recipe is None
    assert teacher.model == "zoo:teacher" and teacher.zoo_recipe == recipe_key()  # a rebuilt zoo is another model
    assert teacher.dtype == "bfloat16" and not teacher.trust_remote_code
    assert model_spec(cfg, "generator").max_pixels == cfg.generator.max_pixels
    trained = teacher.at("/run/generator")  # a trained model of the role: its folder, no zoo recipe
    assert trained.model == "/run/generator" and trained.zoo_recipe is None and trained.dtype == "bfloat16"


def test_model_references_resolve_in_one_place():
    assert model_source("zoo:target") == zoo_folder("zoo:target")  # the tiny zoo, looked up
    assert model_source("~/m") == str(Path.home() / "m")
    assert model_source("s3://bucket/m") == "s3://bucket/m"  # ray.data.llm and Serve download it where it loads
    assert model_source("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"  # a hub id, as named
    assert model_folder("zoo:generator") == zoo_folder("zoo:target")  # generator and target start from one base


def test_tokenizer_is_small_and_keeps_special_tokens():
    tok = build_tokenizer()
    assert len(tok) <= 512
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.tokenize(t)) == 1
    text = "a large purple circle on the left on a striped background."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(text)["input_ids"]) <= 14  # whole words are single tokens
    assert tok.decode(tok("naïve ☃ text")["input_ids"]) == "naïve ☃ text"  # byte-level: nothing is unknown


def test_save_load_round_trip_gives_identical_logits(tiny_model_dir, tmp_path):
    spec = local_spec(tiny_model_dir)
    model, processor = load_model(spec), load_processor(spec)
    _, image = synthetic.sample("general", 0, 3, 56)
    batch = chat.collate(
        [chat.encode(processor, image, "what shape is on the left?", "circle")], processor.tokenizer.pad_token_id
    )
    batch.pop("labels")
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again = load_model(spec.at(str(tmp_path / "copy")))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_labels_cover_exactly_the_assistant_reply(tiny_model_dir):
    processor = load_processor(local_spec(tiny_model_dir))
    tok = processor.tokenizer
    _, image = synthetic.sample("general", 0, 1, 56)
    reply = qa_target("what color is the shape on the left?", "blue")
    ex = chat.encode(processor, image, "Ask a question about this image and answer it.", reply)
    labeled = (ex["labels"] != chat.IGNORE).nonzero().flatten()
    n_reply = len(tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"])
    # the labeled positions are exactly the last n_reply tokens, and they are the reply + end of turn
    assert labeled.tolist() == list(range(len(ex["input_ids"]) - n_reply, len(ex["input_ids"])))
    assert tok.decode(ex["labels"][labeled]) == reply + "<|im_end|>"
    prompt_text = tok.decode(ex["input_ids"][: labeled[0]])
    assert prompt_text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    image_tokens = (ex["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum().item()
    assert image_tokens == ex["image_grid_thw"].prod().item() // 4  # 56x56 -> 4x4 patches -> 2x2 merged


def test_collate_pads_right_and_masks_padding(tiny_model_dir):
    spec = local_spec(tiny_model_dir)
    processor, model = load_processor(spec), load_model(spec)
    images = [synthetic.sample("general", 0, i, 56)[1] for i in range(2)]
    examples = [
        chat.encode(processor, images[0], "Describe this image.", "a red circle on the left."),
        chat.encode(processor, images[1], "q?", "no"),
    ]
    batch = chat.collate(examples, processor.tokenizer.pad_token_id)
    short = len(examples[1]["input_ids"])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1, short:].sum() == 0
    assert (batch["labels"][1, short:] == chat.IGNORE).all()
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 1.0  # random init: near log(vocab)


def test_multiple_choice_prompt_letters_options():
    text = question_text("Which sport?", ["Floorball", "Basketball"])
    assert text == "Which sport?\nA. Floorball\nB. Basketball\nAnswer with the option's letter."
