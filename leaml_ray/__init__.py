"""leaml-ray: LEAML label-efficient adaptation of multimodal LLMs as a distributed Ray application."""

import os
from pathlib import Path

__version__ = "0.1.0"
# the project's local cache (zoo builds; model copies: storage): $LEAML_CACHE or ~/.cache/leaml-ray
CACHE = Path(os.environ.get("LEAML_CACHE", Path.home() / ".cache" / "leaml-ray"))
