"""The model layer on a random-init tiny model: registry, save/load, chat formatting and label masking."""

import torch

from leaml_ray.data import synthetic
from leaml_ray.formats import qa_target, question_text
from leaml_ray.models import chat
from leaml_ray.models.registry import ModelSpec, load_model, load_processor, spec_for
from leaml_ray.models.tiny import SPECIAL_TOKENS, build_tokenizer
from tests.conftest import make_config


def test_registry_specs_follow_the_config(tmp_path):
    cfg = make_config(tmp_path, "target.model=/models/x", "target.trust_remote_code=true", "teacher.dtype=bfloat16")
    target, teacher = spec_for(cfg, "target"), spec_for(cfg, "teacher")
    assert target.name_or_path == "/models/x" and target.trust_remote_code and not target.is_zoo
    assert teacher.is_zoo and teacher.dtype == "bfloat16" and not teacher.trust_remote_code
    assert spec_for(cfg, "generator").max_pixels == cfg.generator.max_pixels


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
    spec = ModelSpec("target", tiny_model_dir, dtype="float32")
    model, processor = load_model(spec, tiny_model_dir), load_processor(spec, tiny_model_dir)
    _, image = synthetic.sample("general", 0, 3, 56)
    batch = chat.collate(
        [chat.encode(processor, image, "what shape is on the left?", "circle")], processor.tokenizer.pad_token_id
    )
    batch.pop("labels")
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again = load_model(spec, str(tmp_path / "copy"))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_labels_cover_exactly_the_assistant_reply(tiny_model_dir):
    spec = ModelSpec("target", tiny_model_dir, dtype="float32")
    processor = load_processor(spec, tiny_model_dir)
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
    spec = ModelSpec("target", tiny_model_dir, dtype="float32")
    processor = load_processor(spec, tiny_model_dir)
    model = load_model(spec, tiny_model_dir)
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
