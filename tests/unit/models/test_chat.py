"""Chat formatting on a random-init tiny model: the prompt, label masking, collation."""

import torch

from leaml_ray.data import synthetic
from leaml_ray.formats import qa_target
from leaml_ray.models import chat
from leaml_ray.models.registry import load_model, load_processor
from tests.helpers import local_spec


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
