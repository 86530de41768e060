# cffi_modules cannot be declared in pyproject.toml; everything else is there.
from setuptools import setup

setup(cffi_modules=["csrc/build_sshrpc.py:ffi"])
