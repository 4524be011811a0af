# Set-up and entry points on a fresh Debian machine (run as root, or with sudo).
#   make demo   install everything, then run the demo on the embedded default
#   make test   install everything, then run the test suite
PYTHON ?= python3
APT_PACKAGES = build-essential libxen-dev xenstore-utils xen-utils-4.17 qemu-utils \
               libnbd-bin iperf3 fio iproute2 procps iputils-ping util-linux

.PHONY: deps install demo test bench clean

deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q $(APT_PACKAGES); \
	fi

install: deps
	$(PYTHON) -m pip install -q ".[test]"

demo: install
	ringfence demo

test: install
	$(PYTHON) -P -m pytest -q tests

bench: install
	ringfence bench ring --quick

clean:
	rm -rf build dist *.egg-info
