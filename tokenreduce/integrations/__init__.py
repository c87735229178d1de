"""Plug-ins that let engines which serve models (vLLM) run tokenreduce's methods inside them."""
