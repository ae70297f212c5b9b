"""Loading a model: its reference resolved to a folder on this node (`model_folder`, the one place that knows `zoo:`,
object-store and hub references) and loaded with transformers classes only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leaml_ray.models.spec import ModelSpec

if TYPE_CHECKING:  # torch and transformers load where a model does, not where a plan is made
    import torch

# Qwen2.5-VL layout: the language model's attention/MLP projections (the vision tower is left alone)
LM_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def torch_dtype(name: str) -> torch.dtype | str:
    """The torch dtype a config names ("auto" stays a string for from_pretrained)."""
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def model_source(reference: str) -> str:
    """What a model loader takes for a reference: `zoo:<role>` looked up in the tiny zoo (never trained here), a local
    folder expanded, an object-store folder (s3:// / gs://) or hub id as it is (ray.data.llm and Serve download
    those on the node that loads them; a hub id only when the user's config names one)."""
    import os

    if reference.startswith("zoo:"):
        from leaml_ray.models.zoo import zoo_folder

        return zoo_folder(reference)
    return reference if "://" in reference else os.path.expanduser(reference)


def model_folder(reference: str, weights: bool = True) -> str:
    """A model reference as a folder on this node: `model_source`, with an object-store folder copied once to this
    node's disk (without the weights when only the processor is needed)."""
    source = model_source(reference)
    if "://" not in source:
        return source
    from leaml_ray import storage  # pyarrow: only when a URI needs it

    return storage.local_model_dir(source, weights=weights)


def load_model(spec: ModelSpec, attn_implementation: str | None = None) -> torch.nn.Module:
    """The model of a spec, from wherever its reference points."""
    from transformers import AutoModelForImageTextToText

    path = model_folder(spec.model)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch_dtype(spec.dtype), trust_remote_code=spec.trust_remote_code, **extra
    )


def load_processor(spec: ModelSpec) -> Any:
    """The processor (tokenizer + image processor + chat template) of a spec."""
    from transformers import AutoProcessor

    path = model_folder(spec.model, weights=False)
    return AutoProcessor.from_pretrained(
        path, trust_remote_code=spec.trust_remote_code, max_pixels=spec.max_pixels, use_fast=False
    )
