"""The command lines: `jobs/<name>.py` and the `leaml-<name>` console scripts both call these `main`s."""
