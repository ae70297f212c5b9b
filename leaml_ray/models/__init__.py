"""Everything that touches a model: the registry, chat formatting, the tiny offline zoo."""
