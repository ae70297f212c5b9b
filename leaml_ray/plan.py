"""Plans: what a stage's work needs, read from the config once (each stage's `plan(cfg)`; docs/design.md).

A plan is a frozen dataclass (nested ones allowed, and a config section a stage uses whole). A field made with
`placement()` says only where or how the work runs (devices, replicas, CPUs, engine batch sizes, endpoints, retries):
it is left out of the stage's cache key, so moving a run to other hardware keeps its outputs. Every other field is
hashed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel

PLACEMENT = "placement"


def placement(**kwargs: Any) -> Any:
    """A plan field that places the work and cannot change its outputs (not in the cache key)."""
    return dataclasses.field(metadata={PLACEMENT: True}, **kwargs)


def is_placement(f: dataclasses.Field) -> bool:
    """Whether a dataclass field was made with `placement()`."""
    return bool(f.metadata.get(PLACEMENT))


def hashed_fields(plan: Any) -> Any:
    """The plan as JSON-able values without its placement fields (what the stage's cache key hashes)."""
    if dataclasses.is_dataclass(plan) and not isinstance(plan, type):
        return {f.name: hashed_fields(getattr(plan, f.name)) for f in dataclasses.fields(plan) if not is_placement(f)}
    if isinstance(plan, BaseModel):
        return plan.model_dump(mode="json")
    if isinstance(plan, (list, tuple)):
        return [hashed_fields(v) for v in plan]
    if isinstance(plan, dict):
        return {str(k): hashed_fields(v) for k, v in plan.items()}
    return plan


def record(plan: Any) -> Any:
    """The whole plan as JSON-able values, placement included: the manifest's record of what ran."""
    if dataclasses.is_dataclass(plan) and not isinstance(plan, type):
        return {f.name: record(getattr(plan, f.name)) for f in dataclasses.fields(plan)}
    if isinstance(plan, BaseModel):
        return plan.model_dump(mode="json")
    if isinstance(plan, (list, tuple)):
        return [record(v) for v in plan]
    if isinstance(plan, dict):
        return {str(k): record(v) for k, v in plan.items()}
    return plan
