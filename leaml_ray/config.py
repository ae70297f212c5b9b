"""The one typed configuration of a leaml-ray run: presets (YAML) + dotted command-line overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from leaml_ray.errors import UserError, did_you_mean
from leaml_ray.formats import CAPTION_PROMPT, QA_GEN_PROMPT

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "tiny-cpu"


class ConfigError(UserError, ValueError):
    """A configuration problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    dir: str = Field("runs/tiny-cpu", description="run directory: local path or s3:// / gs:// URI")
    seed: int = Field(0, ge=0, description="seed of the split, the synthetic world and training")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shared_fs: bool = Field(
        False, description="a local run.dir that every node of the cluster mounts (NFS, EFS, Filestore)"
    )


SYNTHETIC_LABEL_RATIO = 0.05  # a synthetic world knows every answer: hiding most of them is the experiment


class DataSection(Section):
    source: Literal["synthetic", "kvasir_vqa", "sportu", "jsonl", "parquet", "imagefolder", "csv"] = "synthetic"
    path: str | None = Field(None, description="file, folder or URI of the source (not used by synthetic)")
    frames_dir: str | None = Field(None, description="sportu: folder of frame folders, one per clip id")
    frames_per_clip: int = Field(1, ge=1, le=16, description="sportu: frames tiled into one image")
    label_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="fraction of train images whose labels are used; the rest's answers are hidden, as in the"
        " paper's label-efficiency protocol. Unset: every label of your own data; 0.05 of a synthetic world's",
    )
    test_ratio: float = Field(0.2, ge=0.0, lt=1.0, description="held-out images when the source has no test split")
    max_pixels: int = Field(1024 * 1024, ge=28 * 28, description="larger images are resized down (recorded)")
    world: Literal[2, 3] = Field(
        2, description="synthetic: which world (2: shapes, 4 categories; 3: domain labels, 9 categories)"
    )
    domain: Literal["general", "wide", "target", "scope"] = Field(
        "target", description="synthetic: which domain (world 2: general, wide, target; world 3: general, wide, scope)"
    )
    num_images: int = Field(400, ge=1, description="synthetic: number of images")
    test_images: int = Field(
        0, ge=0, description="synthetic world 3: test images of their own (world 2 holds out test_ratio of num_images)"
    )
    val_images: int = Field(
        0, ge=0, description="synthetic: extra images with labels (split val) for choosing settings, never trained on"
    )
    image_size: int = Field(56, ge=28, le=448, multiple_of=28, description="synthetic: image side in pixels")

    @model_validator(mode="after")
    def _resolve_and_check(self) -> DataSection:
        if self.label_ratio is None:  # written into the resolved config: what a run used is on record
            self.label_ratio = SYNTHETIC_LABEL_RATIO if self.source == "synthetic" else 1.0
        domains = ("general", "wide", "scope") if self.world == 3 else ("general", "wide", "target")
        if self.domain not in domains:
            raise ValueError(f"domain {self.domain} is not in world {self.world}; its domains: {', '.join(domains)}")
        if self.test_images and self.world != 3:
            raise ValueError("test_images is world 3's; world 2 holds out test_ratio of num_images")
        return self


Device = Literal["cpu", "gpu"]


class ModelSection(Section):
    model: str = Field(description="HF id, local folder, s3:// / gs:// folder, or zoo:<role> for the tiny offline zoo")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_pixels: int = Field(256 * 28 * 28, ge=28 * 28, description="processor max_pixels (training and every engine)")
    # where and how this role's inference engine runs: placement is configuration, never detection (the driver
    # that builds the engine runs on a GPU-less head under `ray job submit`)
    device: Device = Field("cpu", description="device of this role's inference engine replicas")
    engine: Literal["ray_data_llm", "actor_pool"] = Field(
        "ray_data_llm",
        description="inference engine: the ray.data.llm processor, or Ray Data actors owning an in-process vllm.LLM"
        " (one device per replica; see bench/caption_throughput.py)",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine replica (x pipeline_parallel_size)")
    pipeline_parallel_size: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1, description="engine replicas")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved per engine replica")
    engine_batch_size: int = Field(16, ge=1, description="rows per engine batch")
    max_num_seqs: int = Field(
        64, ge=1, description="sequences a replica decodes at once (vLLM's batch; its KV cache must hold them)"
    )
    max_model_len: int = Field(512, ge=64, description="engine context length")
    # Ray asks for it as the custom resource `accelerator_type:<name>` (0.001 per actor / bundle), which only node
    # types that declare it (or nodes where Ray detects it) have; Ray's names: ray/util/accelerators/accelerators.py
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type of the GPUs this role's engine replicas need (H100, A100-80G, A100-40G,"
        " L4...); asked as the resource accelerator_type:NAME, which the cluster's GPU node types declare (gpu only)",
    )

    @model_validator(mode="after")
    def _placement_is_possible(self) -> ModelSection:
        gpus = self.tensor_parallel_size * self.pipeline_parallel_size
        if gpus > 1 and self.device != "gpu":
            raise ValueError(f"tensor x pipeline parallel {gpus} needs device: gpu")
        if self.accelerator_type and self.device != "gpu":
            raise ValueError(f"accelerator_type {self.accelerator_type} needs device: gpu")
        if gpus > 1 and self.engine == "actor_pool":
            raise ValueError("engine actor_pool runs one device per replica; use ray_data_llm for parallelism")
        return self


class TeacherSection(ModelSection):
    model: str = "zoo:teacher"
    mode: Literal["offline", "serve"] = Field(
        "offline",
        description="offline: ray.data.llm engine replicas in the job; serve: the shared teacher at `endpoint`"
        " (jobs/serve_teacher.py)",
    )
    endpoint: str = Field(
        "http://127.0.0.1:8000", description="base URL of the served teacher (mode serve): http(s)://host[:port]"
    )
    max_new_tokens: int = Field(48, ge=1)
    caption_labeled: bool = Field(True, description="also caption labeled images")
    caption_prompt: str = Field(
        CAPTION_PROMPT,
        min_length=1,
        description="the instruction the teacher captions with (the QA generator learns to caption from the same"
        " words); say what your domain's images show, e.g. 'Describe this endoscopy image.'",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_base_url(cls, endpoint: str) -> str:
        # checked here, not when the first caption request fails minutes into a run
        if not re.fullmatch(r"https?://[^/\s:]+(:\d+)?/?", endpoint):
            raise ValueError("not a base URL http(s)://host[:port]")
        return endpoint


class TrainableModelSection(ModelSection):
    finetune: Literal["lora", "full"] = "full"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-3, gt=0, description="learning rate of full finetuning")
    lora_lr: float = Field(5e-3, gt=0, description="learning rate when the model is trained with LoRA")


class GeneratorSection(TrainableModelSection):
    model: str = "zoo:generator"
    # the QA budget follows the labeled pairs, the caption budget the captioned images: steps cover both
    epochs: float = Field(1.0, gt=0, description="passes over the labeled QA pairs (each pair seen equally often)")
    caption_epochs: float = Field(1.0, gt=0, description="passes over the captioned unlabeled images (at least)")
    heldout_captions: int = Field(
        32, ge=0, description="captioned images kept out of training to measure the generator's own captions"
    )
    caption_distill: bool = True
    caption_weight: float = Field(1.0, ge=0, description="lambda of L_cap")
    # full: chosen on the validation split (bench/results/design_choices.md)
    distill_scope: Literal["lm_mlp", "all_mlp", "full"] = Field(
        "full",
        description="where the caption gradient may go: selected neurons of the language model's MLP blocks, of"
        " every MLP block (vision tower included), or every trainable parameter (full: no selection)",
    )
    score: Literal["gradient", "taylor", "random", "all"] = Field(
        "gradient", description="how neurons in scope are chosen (random / all: ablations)"
    )
    neuron_ratio: float = Field(0.1, gt=0.0, le=1.0, description="top fraction of MLP neurons per layer")
    score_batches: int = Field(4, ge=1)


class PseudoQASection(Section):
    qa_prompt: str = Field(
        QA_GEN_PROMPT,
        min_length=1,
        description="the instruction the QA generator writes a question and its answer with (it is trained on the"
        " labeled pairs with the same words)",
    )
    samples_per_image: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    # labeled + greedy: ahead of the paper's mode at 1% labels (bench/results/design_choices.md)
    questions: Literal["generated", "labeled"] = Field(
        "labeled",
        description="labeled: each sample asks one of the labeled questions (distinct per image, drawn as often as"
        " the labeled data asks them) and the generator writes the answer; generated: the generator writes question"
        " and answer (the paper's mode; for tasks whose questions are specific to each image)",
    )
    answer_decoding: Literal["greedy", "sampled"] = Field(
        "greedy",
        description="greedy: the answer is the generator's most likely one; sampled: sampled like the question",
    )
    consistency_filter: Literal["off", "teacher", "target", "caption"] = Field(
        "off",
        description="teacher / target: that model answers the pseudo question and must agree; caption: an answer"
        " that the teacher's captions use as a word must be named in this image's caption",
    )
    closed_vocabulary: Literal["auto", "on", "off"] = "auto"
    # pseudo-pair precision (questions=labeled): both measured per pair and kept in pseudo_qa.parquet either way
    min_question_pmi: float | None = Field(
        None,
        description="drop a pair whose question is this much less likely (nats) given its image than given the average"
        " image (pointwise mutual information; asks about something the image lacks); null: off",
    )
    min_answer_confidence: float = Field(
        0.0, ge=0.0, le=1.0, description="drop a pair whose answer the generator gives with a lower probability"
    )


DEFAULT_UPSAMPLE = 4


class TargetSection(TrainableModelSection):
    model: str = "zoo:target"
    labeled_upsample: PositiveInt | dict[Literal["leaml", "lora", "full"], PositiveInt] = Field(
        DEFAULT_UPSAMPLE,
        description="labeled pairs repeated this often next to pseudo QA (the baselines: their rows are leaml's formula"
        " at this factor, all labeled); one factor for every method, or one per method: {leaml: 16, lora: 16, full: 4}",
    )

    def upsample(self, method: str) -> int:
        """The mixing factor of one trained method (a method missing from a per-method mapping: the default)."""
        factor = self.labeled_upsample
        return factor if isinstance(factor, int) else factor.get(method, DEFAULT_UPSAMPLE)


class TrainSection(Section):
    num_workers: int = Field(2, ge=1)
    device: Device = Field("cpu", description="gpu: one GPU per worker, nccl, bf16; cpu: gloo, fp32")
    zero_stage: Literal[2, 3] = 2
    batch_size: int = Field(16, ge=1, description="per worker")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_failures: int = Field(2, ge=-1, description="-1: retry forever")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    cpus_per_worker: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (memory for time)")
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="attention kernel")
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type of the GPUs the training workers need (as for an engine: H100, A100-40G...;"
        " device gpu only)",
    )

    @model_validator(mode="after")
    def _attention_is_installed(self) -> TrainSection:
        # transformers would fail in every training worker, after the models load, minutes into the run
        if self.attention == "flash_attention_2":
            import importlib.util

            if self.device != "gpu":
                raise ValueError("attention flash_attention_2 needs device: gpu")
            if importlib.util.find_spec("flash_attn") is None:
                raise ValueError(
                    "attention flash_attention_2 needs the flash-attn package, which this environment lacks (the"
                    " image does not install it); use sdpa"
                )
        return self

    @model_validator(mode="after")
    def _accelerator_needs_a_gpu(self) -> TrainSection:
        if self.accelerator_type and self.device != "gpu":
            raise ValueError(f"accelerator_type {self.accelerator_type} needs device: gpu")
        return self


# the ablations (no caption, full distillation, random neurons...) are leaml with generator settings changed, each
# in its own run dir: bench/label_efficiency.py --variants
EvalMethod = Literal["zero_shot", "lora", "full", "leaml"]


class EvalSection(Section):
    methods: list[EvalMethod] = ["leaml", "lora", "full", "zero_shot"]
    split: Literal["test", "val"] = Field("test", description="val: the validation split (choosing settings)")
    max_new_tokens: int = Field(16, ge=1)


class ClusterSection(Section):
    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS or a new local instance")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local instance")
    temp_dir: str | None = Field(None, description="Ray temp dir of a local instance")
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"


class TrackingSection(Section):
    backend: Literal["none", "mlflow", "tensorboard", "wandb"] = Field(
        "none",
        description="experiment tracking: each invocation that runs a stage is one MLflow run / TensorBoard log /"
        " W&B run",
    )
    uri: str | None = Field(
        None,
        description="mlflow: tracking URI (default MLFLOW_TRACKING_URI, else sqlite:///<run.dir>/mlflow.db);"
        " tensorboard: a local log folder (default <run.dir>/tensorboard); wandb: the local folder its wandb/ goes"
        " in (default <run.dir>; offline unless WANDB_MODE says otherwise)",
    )
    experiment: str = Field("leaml-ray", description="MLflow experiment / W&B project")


class Config(Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    generator: GeneratorSection = GeneratorSection()
    pseudo_qa: PseudoQASection = PseudoQASection()
    target: TargetSection = TargetSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    cluster: ClusterSection = ClusterSection()
    tracking: TrackingSection = TrackingSection()

    def unused_learning_rates(self) -> list[tuple[str, str, str]]:
        """(section, field, finetuning mode) of each learning rate that no run of this config trains with."""
        target_modes = {self.target.finetune} | ({"lora", "full"} & set(self.eval.methods))
        unused = []
        for name, modes in (("generator", {self.generator.finetune}), ("target", target_modes)):
            unused += [(name, f, mode) for f, mode in (("lr", "full"), ("lora_lr", "lora")) if mode not in modes]
        return unused

    @model_validator(mode="after")
    def _every_learning_rate_set_is_used(self) -> Config:
        # `lr` trains full finetuning and `lora_lr` LoRA: a preset that sets the one its runs never use would
        # silently train at the other's default (e.g. lr: 1e-4 with finetune: lora ran at 5e-3)
        for name, field, mode in self.unused_learning_rates():
            section = getattr(self, name)
            if field in section.model_fields_set:
                used = "lora_lr" if field == "lr" else "lr"
                raise ValueError(
                    f"{name}.{field} is the learning rate of {mode} finetuning, which this config never runs "
                    f"({name}.finetune={section.finetune}); set {name}.{used}"
                )
        return self

    def resolved(self) -> dict[str, Any]:
        """Every field except learning rates never used: what `load_config` reads back (the manifest's config, and
        config.yaml through `to_yaml`); with an unused rate in it the config would refuse itself."""
        data = self.model_dump(mode="json")
        for name, field, _ in self.unused_learning_rates():
            del data[name][field]
        return data

    def to_yaml(self) -> str:
        """The resolved config as YAML that `--config` reads back."""
        return yaml.safe_dump(self.resolved(), sort_keys=False)


def _read_yaml(source: str) -> dict:
    path = Path(source)
    if not path.exists():
        preset = PRESET_DIR / f"{source}.yaml"
        if not preset.exists():
            names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            hint = did_you_mean(source, names)
            raise ConfigError(f"config {source!r} is neither a file nor a preset{hint} (presets: {', '.join(names)})")
        path = preset
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections")
    return data


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            model: Any = Config
            for part in e["loc"][:-1]:
                model = model.model_fields[str(part)].annotation
            allowed = ", ".join(model.model_fields)
            hint = did_you_mean(str(e["loc"][-1]), tuple(model.model_fields))
            lines.append(f"{key}: unknown key{hint} (allowed: {allowed})")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "config error: " + "; ".join(lines)


def load_config(
    config: str | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> Config:
    """Build the run config: built-in defaults < preset or YAML file (or `base`) < key=value overrides."""
    data = base if base is not None else _read_yaml(config or DEFAULT_PRESET)
    for item in overrides:
        _apply_override(data, item)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def reference() -> str:
    """The config reference as a Markdown table (README's "Configuration" section is this output)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, f in Config.model_fields.items():
        for name, field in f.annotation.model_fields.items():
            kind = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            kind = re.sub(r"Annotated\[(\w+), Gt\(gt=0\)\]", r"\1 >0", kind)  # PositiveInt inside a union
            kind = re.sub(r"^Union\[(.*), (dict\[.*\])\]$", r"\1 | \2", kind)
            bounds = " ".join(
                str(m)
                .replace("Ge(ge=", ">=")
                .replace("Gt(gt=", ">")
                .replace("Le(le=", "<=")
                .replace("Lt(lt=", "<")
                .replace("MultipleOf(multiple_of=", "multiple of ")
                .replace("MinLen(min_length=1", "non-empty")
                .rstrip(")")
                for m in field.metadata
            )
            kind = f"{kind} {bounds}".strip().replace("|", "\\|")
            rows.append(f"| `{section}.{name}` | {kind} | `{field.default}` | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference())
