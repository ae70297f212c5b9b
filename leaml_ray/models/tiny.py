"""Tiny Qwen2.5-VL models built offline: a BPE tokenizer trained on the synthetic world, the real HF classes.

The same classes as the production models (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor), a few
hundred thousand parameters, saved as ordinary HF folders that transformers and vLLM both load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from leaml_ray.data import synthetic, world3
from leaml_ray.formats import CAPTION_PROMPT, QA_GEN_PROMPT

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen's chat format without the default system prompt (short sequences for tiny models).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (text hidden, layers, heads, kv heads, ffn, vision hidden, vision depth); head dim 32 (vLLM CPU supports it)
SIZES = {
    "base": (128, 2, 4, 2, 256, 64, 2),
    "teacher": (128, 3, 4, 2, 320, 64, 2),
    # ~1.3 B parameters with Qwen's 151,936-word vocabulary: Qwen2.5-1.5B's text widths, 20 layers, an 8-block
    # vision tower (bench/gpu_smoke.py on a GPU)
    "smoke-1b": (1536, 20, 12, 2, 8960, 1280, 8),
    # ~29 M parameters: big enough that the engines' per-step overheads stop dominating (bench/caption_throughput.py)
    "bench-29m": (512, 8, 16, 4, 1536, 256, 4),
    # world 3's zoo (docs/world3.md): a teacher of ~3.5 M and a QA generator of ~2 M parameters, 4x the target
    # (the `base` size, ~0.6 M), as a 7B generator is to a 2B target
    "w3-teacher": (256, 4, 8, 2, 640, 128, 2),
    "w3-generator": (192, 4, 6, 2, 512, 96, 2),
}
VOCAB = {"smoke-1b": 151936}  # embedding rows beyond the tiny tokenizer's ids: the production logits' size
MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224


def corpus(world: int = 2) -> list[str]:
    """Every word a synthetic world (2: `synthetic.py`, 3: `world3.py`) and the prompts use, in the sentences they
    appear in."""
    texts = [CAPTION_PROMPT, QA_GEN_PROMPT, "user\n", "assistant\n", "system\n", "Answer with the option's letter."]
    source = synthetic if world == 2 else world3
    for domain in source.DOMAINS:
        for i in range(200):
            scene = source.make_scene(domain, 0, i)
            texts.append(source.caption(scene))
            texts += [f"Question: {q}\nAnswer: {a}" for _, q, a in source.questions(scene, 0, i)]
    if world == 3:
        texts += [world3.vocabulary_sentence(0, i) for i in range(200)]
    texts += [f"{n}" for n in range(10)] + ["A. B. C. D. yes no"]
    return texts


def build_tokenizer(vocab_size: int = 512, world: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the Qwen special tokens and chat template (any text stays encodable), trained on a
    world's text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(world), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=1024
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLProcessor:
    """The Qwen2.5-VL processor with PIL image processing and tiny pixel limits."""
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast, size: str) -> Qwen2_5_VLConfig:
    hidden, layers, heads, kv_heads, ffn, v_hidden, v_depth = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB.get(size, len(tokenizer)),
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 1024,
            # mrope sections (temporal, height, width) must sum to head_dim / 2
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": v_depth,
            "hidden_size": v_hidden,
            "intermediate_size": 2 * v_hidden,
            "num_heads": v_hidden // 32,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [v_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_random(folder: str | Path, size: str = "base", seed: int = 0, init_std: float = 0.02, world: int = 2) -> Path:
    """A random-init tiny model + processor saved as an HF folder (seconds; for unit tests and as init), its
    tokenizer trained on `world`'s text.

    A large `init_std` gives peaked, input-dependent outputs: tests use it to see images change what is generated.
    """
    folder = Path(folder)
    tokenizer = build_tokenizer(world=world)
    torch.manual_seed(seed)
    config = tiny_config(tokenizer, size)
    config.text_config.initializer_range = config.vision_config.initializer_range = init_std
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return folder
