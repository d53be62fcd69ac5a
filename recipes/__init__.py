"""The shipped recipes, installed as package data (``dparallel.core.paths.recipes_dir``)."""
