"""The xen platform without Xen: run a driver with ``--platform xen`` on the sim hypervisor.

These machines have no /dev/xen. What stands in for Xen here:

* ``xen_standin.c``, built by :func:`build_standin` into one shared object that answers to
  the sonames ``libxengnttab.so.1`` and ``libxenevtchn.so.1``; put first on
  ``LD_LIBRARY_PATH``, it replaces Debian's libraries under the xen platform's bindings and
  forwards every call to the sim hypervisor as the domain whose control socket is
  ``$RINGFENCE_DOMAIN_FD``;
* :func:`serve_xenbus`, the domain's xenbus device: a Unix socket (``$XENSTORED_PATH``, which
  libxenstore honours too) on which xenstored knows every connection as that domain, the
  way the kernel's /dev/xen/xenbus connects a Xen domain's processes;
* :func:`spawn_xen_domain` writes the domain's ``domid`` node, as Xen's toolstack does.

So the driver runs the exact libxengnttab/libxenevtchn call sequences it makes on Xen.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import os
import pathlib
import socket
import subprocess
from collections.abc import Sequence
from typing import Any

import trio

from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV, Dom0
from ringfence.isolation.sandbox import SandboxSpec, spawn_sandboxed
from ringfence.isolation.spawn import open_process_dying_with_us
from ringfence.xenbus.client import XenStore

SONAMES = ("libxengnttab.so.1", "libxenevtchn.so.1")


def build_standin(directory: str | os.PathLike[str]) -> pathlib.Path:
    """Compile the stand-in into ``directory`` under both sonames; returns the directory
    to put on LD_LIBRARY_PATH."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    library = out / "libxen-standin.so"
    with importlib.resources.as_file(importlib.resources.files("ringfence.testing") / "xen_standin.c") as source:
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                        "-Wno-unused-parameter", "-o", str(library), str(source), "-lpthread"],
                       check=True, capture_output=True)
    for soname in SONAMES:
        link = out / soname
        link.unlink(missing_ok=True)
        link.symlink_to(library.name)
    return out


async def _splice(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await sink.send_eof()


async def serve_xenbus(dom0: Dom0, domid: int, path: str, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``path`` as domain ``domid``'s xenbus device until cancelled."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    await listener.bind(path)
    listener.listen(16)
    task_status.started()
    async with trio.open_nursery() as nursery:
        try:
            while True:
                client, _ = await listener.accept()
                try:
                    store = await dom0.store_connection_for(domid)
                except OSError:  # no xenstored, or the domain is gone: as a dead device
                    client.close()
                    continue
                ours = trio.SocketStream(client)
                theirs = trio.SocketStream(trio.socket.from_stdlib_socket(store))
                nursery.start_soon(_splice, ours, theirs)
                nursery.start_soon(_splice, theirs, ours)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def spawn_xen_domain(nursery: trio.Nursery, dom0: Dom0, xs: XenStore, name: str,
                           argv: Sequence[str], *, libdir: pathlib.Path, directory: pathlib.Path,
                           sandbox: SandboxSpec | None = None,
                           **kwargs: Any) -> tuple[int, trio.Process]:
    """Create a domain and run ``argv`` in it (in a sandbox if given) on the stand-in xen
    platform; its xenbus device is served from ``nursery``."""
    domid, fd = await dom0.create_domain(name)
    domain_path = f"/local/domain/{domid}"
    await xs.write(f"{domain_path}/domid", str(domid))
    await xs.write(f"{domain_path}/name", name)
    await xs.set_perms(domain_path, [f"n{domid}"])
    await xs.set_perms(f"{domain_path}/domid", ["n0", f"r{domid}"])
    xenbus = str(directory / f"xenbus-{domid}.sock")
    await nursery.start(serve_xenbus, dom0, domid, xenbus)
    env = dict(kwargs.pop("env", None) or os.environ)
    env.update({DOMAIN_FD_ENV: str(fd), "XENSTORED_PATH": xenbus,
                "LD_LIBRARY_PATH": ":".join(filter(None, [str(libdir), env.get("LD_LIBRARY_PATH")]))})
    try:
        if sandbox is not None:
            process = (await spawn_sandboxed(sandbox, argv, pass_fds=(fd,), env=env, **kwargs)).process
        else:
            # a failed test leaves no driver behind
            process = await open_process_dying_with_us(list(argv), pass_fds=(fd,), env=env, **kwargs)
    finally:
        os.close(fd)
    return domid, process
