"""Which original patches each final token covers, drawn on the input image."""

from tokenreduce.viz.sources import patch_assignment, render_merges

__all__ = ["patch_assignment", "render_merges"]
