"""Tensor and pipeline parallelism for Transformers in JAX.

models: the Transformer (logical axis names, no mesh); pipeline: schedules as data, the
simulator and the executor (any stack of layers); spmd: meshes, sharding rules, the train step
and what a run reads and writes; measure: what the compiled program runs (collectives, FLOPs,
timings); cli: the command lines that scripts/ runs; errors: the one error of a bad setting.

Layers (tests/test_layers.py): errors <- models <- spmd <- measure <- cli and
errors <- pipeline <- spmd; a package imports only those to its left, lazily or not."""
