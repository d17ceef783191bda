"""The one compiled part of the package; everything else is configured in pyproject.toml.

The ranker's int8 scan kernel (anime2vec/native/scan.c), loaded with ctypes and imported for its one
Python entry point (the search per request). Optional: where no C compiler (or no Python headers) is
found the package installs without it and the scan uses torch's int8 product.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "anime2vec._scan",
            ["anime2vec/native/scan.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],  # sums rounded in the source's order
            libraries=["m"],
            optional=True,
        )
    ]
)
