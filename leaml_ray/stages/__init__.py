"""The pipeline's stages in run order (docs/design.md#the-stage-line)."""

from leaml_ray.config import Config
from leaml_ray.pipeline import Stage
from leaml_ray.stages.caption import CAPTION
from leaml_ray.stages.evaluate import EVALUATE
from leaml_ray.stages.finetune import finetune_stages
from leaml_ray.stages.generator import GENERATOR
from leaml_ray.stages.prepare import PREPARE
from leaml_ray.stages.pseudo_qa import PSEUDO_QA


def pipeline_stages(cfg: Config) -> list[Stage]:
    """The stages of a run in order; finetune is one stage per trained method of `eval.methods`."""
    return [PREPARE, CAPTION, GENERATOR, PSEUDO_QA, *finetune_stages(cfg), EVALUATE]
