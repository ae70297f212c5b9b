"""Plans: what a stage's work needs, read from the config once (each stage's `plan(cfg)`; docs/design.md).

A plan is a frozen dataclass (nested ones allowed, and a config section a stage uses whole). A field made with
`placement()` says only where or how the work runs (devices, replicas, CPUs, engine batch sizes, endpoints, retries):
it is left out of the stage's cache key, so moving a run to other hardware keeps its outputs. Every other field is
hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pydantic import BaseModel

PLACEMENT = "placement"


def placement(**kwargs: Any) -> Any:
    """A plan field that places the work and cannot change its outputs (not in the cache key)."""
    return dataclasses.field(metadata={PLACEMENT: True}, **kwargs)


def is_placement(f: dataclasses.Field) -> bool:
    """Whether a dataclass field was made with `placement()`."""
    return bool(f.metadata.get(PLACEMENT))


def values(plan: Any, placement: bool = True) -> Any:
    """The plan as JSON-able values: whole, the manifest's record of what ran, or without its placement fields
    (`placement=False`), what the stage's cache key hashes."""
    if dataclasses.is_dataclass(plan) and not isinstance(plan, type):
        fields = [f for f in dataclasses.fields(plan) if placement or not is_placement(f)]
        return {f.name: values(getattr(plan, f.name), placement) for f in fields}
    if isinstance(plan, BaseModel):
        return plan.model_dump(mode="json")
    if isinstance(plan, (list, tuple)):
        return [values(v, placement) for v in plan]
    if isinstance(plan, dict):
        return {str(k): values(v, placement) for k, v in plan.items()}
    return plan


def hashed_fields(plan: Any) -> Any:
    """The plan without its placement fields (what the stage's cache key hashes)."""
    return values(plan, placement=False)


def stable_hash(obj: Any) -> str:
    """A short content hash of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
