"""Compute kernels over the GGUF's quantized blocks, each with a pure-torch twin the tests compare it to."""
