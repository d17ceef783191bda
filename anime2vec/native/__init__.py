"""Compiled kernels (built by `pip install`, optional: without a C compiler the package installs
without them and their callers use their pure-Python/torch path)."""
