from setuptools import setup

setup(cffi_modules=["hypervisor/_build.py:ffibuilder"])
