"""caption: the teacher describes every unlabeled image (and the labeled ones) -> captions.parquet.

Images stream from prepared/images.parquet through Ray Data into the generation engine; only the caption text
reaches the driver, which appends it to part files as it arrives. A rerun after a crash skips the images those
parts already hold, so no image is captioned twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leaml_ray import dashboard, storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.data.parts import done_keys, read_parts, skip_done, stream_to_parts
from leaml_ray.inference.client import check_served
from leaml_ray.inference.generate import generate
from leaml_ray.inference.requests import prompt_template
from leaml_ray.models.registry import load_processor
from leaml_ray.models.spec import Engine, ModelSpec
from leaml_ray.pipeline import Stage, StageContext
from leaml_ray.plan import stable_hash
from leaml_ray.stages.common import engine

log = logging.getLogger("leaml_ray")
CAPTIONS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("caption", pa.string()), ("teacher", pa.string()), ("prompt_version", pa.string())]
)


@dataclass(frozen=True)
class CaptionPlan:
    """What the caption stage needs: the teacher's engine (or its endpoint) and what to ask it."""

    teacher: Engine
    instruction: str
    max_new_tokens: int
    splits: tuple[str, ...]  # which images are captioned


def plan(cfg: Config) -> CaptionPlan:
    """The caption stage's plan; a run that switches to a served teacher keeps its captions (placement only)."""
    splits = ("unlabeled", "labeled") if cfg.teacher.caption_labeled else ("unlabeled",)
    return CaptionPlan(engine(cfg, "teacher"), cfg.teacher.caption_prompt, cfg.teacher.max_new_tokens, splits)


def prompt_version(spec: ModelSpec, instruction: str) -> str:
    """Identifies the exact prompt the teacher saw (chat template + instruction)."""
    return stable_hash({"template": prompt_template(load_processor(spec)), "instruction": instruction})[:8]


def run(plan: CaptionPlan, ctx: StageContext) -> dict[str, Any]:
    """Run the caption stage (see the module docstring)."""
    teacher = plan.teacher
    check_served(teacher)  # a shared teacher (jobs/serve_teacher.py) in teacher.mode=serve
    version = prompt_version(teacher.spec, plan.instruction)
    parts = storage.join(ctx.resume_dir, "parts")
    done = done_keys(parts, "image_id")
    if done:
        log.info("caption: %d images captioned by an interrupted attempt are kept", len(done))

    todo = skip_done(examples.images_of(ctx.input("prepared/images.parquet"), list(plan.splits)), "image_id", done)
    todo = todo.map_batches(
        lambda b: b.append_column("instruction", pa.array([plan.instruction] * b.num_rows)),
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    out = generate(todo, teacher, {"temperature": 0.0, "max_tokens": plan.max_new_tokens})
    out = out.map_batches(
        lambda b: pa.table(
            {
                "image_id": b["image_id"],
                "caption": pc.utf8_trim_whitespace(b["text"]),
                "teacher": pa.array([teacher.spec.model] * b.num_rows, pa.string()),
                "prompt_version": pa.array([version] * b.num_rows, pa.string()),
            }
        ),
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    on_part = lambda t: dashboard.count("images_captioned", t.num_rows, ctx.run_dir, "caption")  # noqa: E731
    stream_to_parts(out, parts, teacher.rows_per_part, on_part)

    # one table, streamed part by part; a key seen twice (never expected) is dropped and counted
    seen: set[str] = set()
    duplicates = empty = 0
    fs, target = storage.filesystem(ctx.output("captions.parquet"))
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    with pq.ParquetWriter(target, CAPTIONS_SCHEMA, filesystem=fs) as writer:
        for table in read_parts(parts):
            ids = table["image_id"].to_pylist()
            keep = [i not in seen for i in ids]
            duplicates += keep.count(False)
            seen.update(ids)
            table = table.filter(pa.array(keep)).cast(CAPTIONS_SCHEMA)
            empty += pc.sum(pc.equal(pc.utf8_length(table["caption"]), 0)).as_py() or 0
            writer.write_table(table)
    if empty:
        log.warning("caption: the teacher returned %d empty captions (kept; they teach nothing)", empty)
    return {"captioned": len(seen), "resumed": len(done), "empty": empty, "duplicates_dropped": duplicates}


CAPTION = Stage(name="caption", plan=plan, run=run, inputs=("prepared",), outputs=("captions.parquet",))
