"""Quality on real weights: loaders for real models that install offline, and the eval runners."""
