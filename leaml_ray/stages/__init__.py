"""The pipeline's stages in run order (DESIGN.md section 2)."""

from leaml_ray.stages.caption import CAPTION
from leaml_ray.stages.evaluate import EVALUATE
from leaml_ray.stages.finetune import FINETUNE
from leaml_ray.stages.generator import GENERATOR
from leaml_ray.stages.prepare import PREPARE
from leaml_ray.stages.pseudo_qa import PSEUDO_QA

ALL_STAGES = [PREPARE, CAPTION, GENERATOR, PSEUDO_QA, FINETUNE, EVALUATE]
