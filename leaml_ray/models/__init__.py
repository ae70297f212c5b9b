"""Everything that touches a model: the registry, chat formatting, the tiny architecture (zoo.py trains it)."""
