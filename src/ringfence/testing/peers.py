"""Reference implementations to test and benchmark against: Debian's own xenstored.

``../shared/tools/peer-xenstored SOCKET [c|ocaml]`` (from the development tree, or the path
in $RINGFENCE_PEER_XENSTORED) runs Xen's C or OCaml daemon here with no hypervisor.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
from collections.abc import AsyncIterator

import trio

ENV = "RINGFENCE_PEER_XENSTORED"


def peer_xenstored() -> str | None:
    candidates = [os.environ.get(ENV, "")]
    for base in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve()):
        for parent in [base, *base.parents]:
            candidates.append(str(parent / "shared" / "tools" / "peer-xenstored"))
    candidates.append("/work/shared/tools/peer-xenstored")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextlib.asynccontextmanager
async def open_peer_xenstored(directory: str, flavour: str = "c") -> AsyncIterator[str]:
    """Run Xen's xenstored on a socket in ``directory``; yields the socket path."""
    tool = peer_xenstored()
    if tool is None:
        raise FileNotFoundError(f"peer-xenstored not found (set ${ENV})")
    path = os.path.join(directory, f"peer-{flavour}.sock")
    process = await trio.lowlevel.open_process([tool, path, flavour], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with trio.fail_after(60):
            while not os.path.exists(path):
                if process.poll() is not None:
                    raise RuntimeError(f"peer-xenstored exited with {process.returncode}")
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        yield path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        await process.wait()
