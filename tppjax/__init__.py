"""Tensor and pipeline parallelism for Transformers in JAX.

models: the Transformer (logical axis names, no mesh); spmd: meshes, sharding rules and the train
step; pipeline: schedules as data, the simulator and the executor (any stack of layers);
measure: what the compiled program runs (collectives, FLOPs, timings); cli: the command lines
that scripts/ runs."""
