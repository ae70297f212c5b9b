"""The model registry: one spec per role, resolved to a local folder and loaded with transformers classes only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from leaml_ray.config import Config, ModelSection
from leaml_ray.formats import CAPTION_PROMPT

# Qwen2.5-VL layout: the language model's attention/MLP projections (the vision tower is left alone)
LM_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class ModelSpec:
    """How to load and prompt the model of one role."""

    role: str
    name_or_path: str
    trust_remote_code: bool = False
    dtype: str = "auto"
    max_pixels: int = 256 * 28 * 28
    caption_prompt: str = CAPTION_PROMPT

    @property
    def is_zoo(self) -> bool:
        return self.name_or_path.startswith("zoo:")


def spec_for(cfg: Config, role: str) -> ModelSpec:
    """The spec of a role from the run config."""
    section: ModelSection = getattr(cfg, role)
    return ModelSpec(role, section.model, section.trust_remote_code, section.dtype, section.max_pixels)


def torch_dtype(name: str) -> torch.dtype | str:
    """The torch dtype a config names ("auto" stays a string for from_pretrained)."""
    return "auto" if name == "auto" else getattr(torch, name)


def local_folder(path: str, weights: bool = True) -> str:
    """A model folder on an object store (s3:// / gs://), copied once to this node's disk before transformers or vLLM
    read it (without the weights when only the processor is needed); local paths and hub ids as they are."""
    if "://" not in path:
        return path
    from leaml_ray import storage  # pyarrow: only when a URI needs it

    return storage.local_model_dir(path, weights=weights)


def load_model(spec: ModelSpec, path: str, attn_implementation: str | None = None) -> torch.nn.Module:
    """The model of a spec from a local folder or URI (or a hub id, only when the user's config names one)."""
    path = local_folder(path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch_dtype(spec.dtype), trust_remote_code=spec.trust_remote_code, **extra
    )


def load_processor(spec: ModelSpec, path: str):
    """The processor (tokenizer + image processor + chat template) of a spec."""
    path = local_folder(path, weights=False)
    return AutoProcessor.from_pretrained(
        path, trust_remote_code=spec.trust_remote_code, max_pixels=spec.max_pixels, use_fast=False
    )
