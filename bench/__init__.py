"""Benchmarks behind `make bench`. Every figure is a ratio against a baseline measured in the same
run on the same machine, because absolute timings on a shared, noisy machine mean little."""
