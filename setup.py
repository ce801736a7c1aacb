"""The one C extension of hhtld (the vector table sums of hhtld.kernels); everything
else is in pyproject.toml. ``optional``: without a C compiler hhtld still installs and
says at run time that the slower float32 tables run instead."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("hhtld.kernels._lut", ["src/hhtld/kernels/_lut.c"], optional=True,
                             extra_compile_args=["-O3"])])
