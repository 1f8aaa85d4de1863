"""Benchmarks and the one-call device check (gpu_check.sh); run them from the repository root as modules,
e.g. `python -m benchmarks.train_step`, so that `resnet_repro` is imported from this checkout."""
