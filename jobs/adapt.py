"""`python jobs/adapt.py ...`, the path `ray job submit --working-dir .` runs:
leaml_ray/cli/adapt.py
(also installed as the `leaml-adapt` command)."""

import sys

from leaml_ray.cli.adapt import main

if __name__ == "__main__":
    sys.exit(main())
