"""`python jobs/serve_teacher.py ...`, the path `ray job submit --working-dir .` runs:
leaml_ray/cli/serve_teacher.py
(also installed as the `leaml-serve-teacher` command)."""

import sys

from leaml_ray.cli.serve_teacher import main

if __name__ == "__main__":
    sys.exit(main())
