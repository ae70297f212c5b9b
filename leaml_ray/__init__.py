"""leaml-ray: LEAML label-efficient adaptation of multimodal LLMs as a distributed Ray application."""

__version__ = "0.1.0"
