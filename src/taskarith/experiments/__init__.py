"""Experiments: each a function that takes a model and tasks and returns plain data (never prints)."""
