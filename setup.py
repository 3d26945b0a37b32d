# All metadata lives in pyproject.toml; cffi modules cannot be declared there.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
