"""`python jobs/serve.py ...`, the path `ray job submit --working-dir .` runs:
leaml_ray/cli/serve.py
(also installed as the `leaml-serve` command)."""

import sys

from leaml_ray.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
