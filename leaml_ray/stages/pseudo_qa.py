"""pseudo_qa: the trained QA generator writes `samples_per_image` question/answer pairs per unlabeled image.

Top to bottom: requests for the unlabeled images (pseudo/replies.py), the generator's replies streamed into
resumable parts, parsed and filtered (pseudo/filters.py; docs/design.md#pseudo-qa-generation-and-filters) into kept
pairs and rejects with their reasons, written as the exports trainers read (pseudo/export.py). The same engine pass
answers diagnostic requests (diagnostics.py): captions of the images the generator held out and the unlabeled
images' hidden questions -> pseudo_qa_diagnostics.json.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from leaml_ray import dashboard, diagnostics, storage
from leaml_ray.config import Config
from leaml_ray.data import examples
from leaml_ray.data.parts import done_keys, read_parts, skip_done
from leaml_ray.models.spec import Engine
from leaml_ray.pipeline import Stage, StageContext, StageError
from leaml_ray.pseudo.export import write_exports
from leaml_ray.pseudo.filters import answer_rules, caption_filter, consistency_filter, filter_replies, parse_qa
from leaml_ray.pseudo.replies import Decoding, generate_replies, question_bank, requests_for
from leaml_ray.stages.common import engine, heldout_caption_ids, unlabeled_captions

log = logging.getLogger("leaml_ray")
DIAGNOSTIC = "diagnostic:"  # key prefix of the diagnostic requests riding along in the same engine pass


@dataclass(frozen=True)
class PseudoQAPlan:
    """What pseudo_qa needs: the generator's engine (its trained folder is this stage's input), how it decodes, the
    filters and the model that judges consistency."""

    generator: Engine
    decoding: Decoding
    caption_prompt: str  # the teacher's: the diagnostic captions are asked with it
    closed_vocabulary: str
    min_question_pmi: float | None
    min_answer_confidence: float
    consistency_filter: str  # "off" | "teacher" | "target" | "caption"
    judge: Engine | None  # the model that answers the pseudo questions (consistency_filter teacher / target)
    judge_max_new_tokens: int | None
    heldout_captions: int  # which held-out images the diagnostics caption (as the generator stage chose them)
    seed: int


def plan(cfg: Config) -> PseudoQAPlan:
    """The pseudo_qa stage's plan."""
    p = cfg.pseudo_qa
    judged = p.consistency_filter in ("teacher", "target")
    decoding = Decoding(
        prompt=p.qa_prompt,
        questions=p.questions,
        answer_decoding=p.answer_decoding,
        samples_per_image=p.samples_per_image,
        temperature=p.temperature,
        top_p=p.top_p,
        max_new_tokens=p.max_new_tokens,
        caption_tokens=cfg.teacher.max_new_tokens,
    )
    return PseudoQAPlan(
        generator=engine(cfg, "generator"),
        decoding=decoding,
        caption_prompt=cfg.teacher.caption_prompt,
        closed_vocabulary=p.closed_vocabulary,
        min_question_pmi=p.min_question_pmi,
        min_answer_confidence=p.min_answer_confidence,
        consistency_filter=p.consistency_filter,
        judge=engine(cfg, p.consistency_filter) if judged else None,
        judge_max_new_tokens=cfg.eval.max_new_tokens if judged else None,
        heldout_captions=cfg.generator.heldout_captions,
        seed=cfg.run.seed,
    )


def run(plan: PseudoQAPlan, ctx: StageContext) -> dict[str, Any]:
    """Run the pseudo_qa stage (see the module docstring)."""
    images_path = ctx.input("prepared/images.parquet")
    labeled_qa = examples.read_table(ctx.input("prepared/qa.parquet"), split="labeled")
    prompt = plan.decoding.prompt
    rules = answer_rules(examples.generator_examples(labeled_qa, prompt), plan.closed_vocabulary, prompt)
    bank = question_bank(labeled_qa) if plan.decoding.questions == "labeled" else None
    if bank is not None and not bank:
        raise StageError("pseudo_qa: questions=labeled needs labeled QA pairs to draw the questions from")
    samples = plan.decoding.samples_per_image
    samples = min(samples, len(bank)) if bank else samples
    parts = storage.join(ctx.resume_dir, "parts")
    done = done_keys(parts, "key")
    requests = examples.images_of(images_path, ["unlabeled"]).map_batches(
        requests_for,
        batch_format="pyarrow",
        fn_kwargs={"samples": samples, "seed": plan.seed, "prompt": plan.decoding.prompt, "questions": bank},
        num_cpus=0.25,
    )
    diagnostic = diagnostic_requests(ctx, images_path, plan)
    generator = plan.generator.at(ctx.input("generator"))
    todo = skip_done(requests, "key", done)
    generate_replies(generator, plan.decoding, images_path, todo, diagnostic, done, parts)

    diagnostic_keys = set(diagnostic["key"].to_pylist()) if diagnostic is not None else set()
    kept, rejects = filter_replies(parts, rules, diagnostic_keys, plan.min_question_pmi, plan.min_answer_confidence)
    if plan.consistency_filter == "caption" and kept.num_rows:
        kept, ungrounded = caption_filter(kept, examples.read_table(ctx.input("captions.parquet")))
        rejects = pa.concat_tables([rejects, ungrounded])
    elif plan.judge is not None and plan.judge_max_new_tokens and kept.num_rows:
        kept, inconsistent = consistency_filter(kept, images_path, plan.judge, plan.judge_max_new_tokens)
        rejects = pa.concat_tables([rejects, inconsistent])
    write_exports(ctx.work_dir, kept, rejects, images_path)

    report = generator_diagnostics(ctx, parts, diagnostic_keys, kept, plan.seed)
    storage.write_json_atomic(ctx.output("pseudo_qa_diagnostics.json"), report)
    audit = {k: report["pairs"][k] for k in ("audited", "audited_correct", "absent")}
    by_reason = dict(Counter(rejects["reason"].to_pylist()))
    for reason, n in by_reason.items():
        dashboard.count("pseudo_qa_rejected", n, ctx.run_dir, "pseudo_qa", reason)
    dashboard.count("pseudo_qa_kept", kept.num_rows, ctx.run_dir, "pseudo_qa")
    return {
        "generated": kept.num_rows + rejects.num_rows,
        "kept": kept.num_rows,
        "rejected": rejects.num_rows,
        "rejected_by_reason": by_reason,
        "images_with_pairs": len(set(kept["image_id"].to_pylist())),
        "closed_vocabulary": rules.vocabulary is not None,
        "resumed": len(done),
        **audit,
        "generator_hidden_accuracy": report["precondition"].get("generator"),
        "caption_fidelity": report["caption_fidelity"].get("share_of_teacher"),
    }


def diagnostic_requests(ctx: StageContext, images_path: str, plan: PseudoQAPlan) -> pa.Table | None:
    """Requests the generator answers for the diagnostics only: captions of the images its training held out and
    (a sample of) the unlabeled images' hidden questions; None when there are neither."""
    captions = unlabeled_captions(images_path, ctx.input("captions.parquet"))
    seed = plan.seed
    heldout = sorted(heldout_caption_ids(captions["image_id"].to_pylist(), plan.heldout_captions, seed))
    rows = [
        {"image_id": i, "key": f"{DIAGNOSTIC}caption:{i}", "instruction": plan.caption_prompt, "response_prefix": ""}
        for i in heldout
    ]
    hidden_path = ctx.input("prepared/hidden/unlabeled_qa.parquet")
    if storage.exists(hidden_path):
        hidden = diagnostics.hidden_sample(examples.read_table(hidden_path), seed)
        for r in hidden.select(["image_id", "qa_id", "question", "choices"]).to_pylist():
            rows.append(
                {
                    "image_id": r["image_id"],
                    "key": f"{DIAGNOSTIC}qa:{r['qa_id']}",
                    "instruction": plan.decoding.prompt,
                    "response_prefix": diagnostics.hidden_prefix(r["question"], r["choices"]),
                }
            )
    if not rows:
        return None
    return pa.Table.from_pylist(rows).append_column("sampling_seed", pa.array([0] * len(rows), pa.int64()))


def generator_diagnostics(ctx: StageContext, parts: str, keys: set[str], kept: pa.Table, seed: int) -> dict[str, Any]:
    """pseudo_qa_diagnostics.json: caption fidelity, the generator's precondition accuracy, pair precision."""
    replies: dict[str, str] = {}
    for table in read_parts(parts, ["key", "text"]):
        for key, text in zip(table["key"].to_pylist(), table["text"].to_pylist(), strict=True):
            if key in keys:
                replies[key[len(DIAGNOSTIC) :]] = text
    captions = examples.read_table(ctx.input("captions.parquet"), ["image_id", "caption"])
    teacher = dict(zip(captions["image_id"].to_pylist(), captions["caption"].to_pylist(), strict=True))
    own = {k.split(":", 1)[1]: v.strip() for k, v in replies.items() if k.startswith("caption:")}
    fidelity = diagnostics.caption_fidelity(own, teacher)
    hidden_path = ctx.input("prepared/hidden/unlabeled_qa.parquet")
    hidden = examples.read_table(hidden_path) if storage.exists(hidden_path) else None
    precondition: dict[str, Any] = {}
    if hidden is not None:
        sample = diagnostics.hidden_sample(hidden, seed)
        answers = {}
        for k, text in replies.items():
            if k.startswith("qa:"):
                parsed = parse_qa(text)
                answers[k[3:]] = parsed[1] if isinstance(parsed, tuple) else ""
        result = diagnostics.hidden_accuracy(sample, answers)
        precondition = {"generator": result["accuracy"], "generator_per_category": result["per_category"]}
    pairs = diagnostics.pair_precision(kept, hidden)
    log.info(
        "pseudo_qa diagnostics: caption fidelity %s, generator on hidden questions %s, kept-pair precision %s "
        "(%s asking about something absent)",
        _pct(fidelity.get("share_of_teacher", fidelity.get("generator_vs_teacher"))),
        _pct(precondition.get("generator")),
        _pct(pairs["precision"]),
        _pct(pairs["absent_share"]),
    )
    return {"caption_fidelity": fidelity, "precondition": precondition, "pairs": pairs}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


PSEUDO_QA = Stage(
    name="pseudo_qa",
    plan=plan,
    run=run,
    inputs=("prepared", "generator", "captions.parquet"),  # captions: the caption filter and the diagnostics
    outputs=(
        "pseudo_qa.parquet",
        "pseudo_qa.jsonl",
        "pseudo_qa_trl.jsonl",
        "dataset_info.json",
        "pseudo_qa_rejects.parquet",
        "pseudo_qa_images",
        "pseudo_qa_diagnostics.json",
    ),
)
