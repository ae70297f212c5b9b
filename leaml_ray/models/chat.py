"""Chat formatting and collation: image + instruction -> assistant text, loss only on the assistant tokens."""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

IGNORE = -100


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def prompt(processor: Any, instruction: str) -> str:
    """The model's own chat template around one image and an instruction, ready for the assistant."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(processor: Any, image: Image.Image, instruction: str, response: str) -> dict[str, torch.Tensor]:
    """One training example; labels are IGNORE everywhere except the response and its end-of-turn token."""
    enc = processor(text=[prompt(processor, instruction)], images=[image], return_tensors="pt")
    tokenizer = processor.tokenizer
    reply = tokenizer(response + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    prompt_ids = enc["input_ids"][0]
    example = {
        "input_ids": torch.cat([prompt_ids, reply]),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE), reply]),
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
    }
    if "mm_token_type_ids" in enc:
        example["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(reply)])
    return example


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token tensors; concatenate the images' patches."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(e[key], (0, width - len(e[key])), value=value) for e in examples])

    input_ids = pad("input_ids", pad_id)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    batch = {
        "input_ids": input_ids,
        "labels": pad("labels", IGNORE),
        "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in examples]),
    }
    if "mm_token_type_ids" in examples[0]:
        batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
    return batch
