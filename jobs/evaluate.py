"""`python jobs/evaluate.py ...`, the path `ray job submit --working-dir .` runs:
leaml_ray/cli/evaluate.py
(also installed as the `leaml-evaluate` command)."""

import sys

from leaml_ray.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
