import os

from setuptools import setup

# The xen platform's bindings need Debian libxen-dev's headers; the sim platform does not.
XEN_HEADERS = os.path.exists("/usr/include/xengnttab.h") and os.path.exists("/usr/include/xenevtchn.h")

setup(cffi_modules=["hypervisor/_build.py:ffibuilder"]
      + (["hypervisor/_build_xen.py:ffibuilder"] if XEN_HEADERS else []))
