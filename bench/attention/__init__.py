"""bench.attention: decode attention with a memory versus the prefix-cached full prefix, one
layer and one whole decode step, on a GPU (`python -m bench.attention`; `__main__` says what
it measures). `cases` holds the shapes, inputs and timed functions, `step` the step scope,
`tune` the launch-shape sweeps."""

from bench.attention.cases import copy_bandwidth, gpu_tag, parse_format

__all__ = ["copy_bandwidth", "gpu_tag", "parse_format"]
