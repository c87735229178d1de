"""Plug-ins for the engines tokenreduce runs inside (lmms-eval, Ray Data). Each module imports its engine,
so nothing here is imported by ``import tokenreduce``."""
