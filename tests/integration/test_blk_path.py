"""Storage through a driver domain: blkback in one sim domain, blkfront in another, the
hypervisor and our xenstored between them; data checked byte for byte against the file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import trio

from ringfence.testing.sim import program_output, start_domain_program
from ringfence.toolstack.devices import add_vbd
from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain, start_xenstored
from ringfence.xenbus.client import open_xenstore

GUEST = textwrap.dedent("""
    import json, os, sys, trio
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    from ringfence.frontends.blkfront.device import BlkFront
    from dataclasses import asdict

    async def main():
        seed = int(sys.argv[1])
        async with open_domain() as dom, open_domain_xenstore(dom) as xs:
            front = BlkFront(dom, xs, 51712)
            async with trio.open_nursery() as nursery:
                await nursery.start(front.run)
                rnd = __import__("random").Random(seed)
                size = front.size
                written = {}
                for i in range(40):
                    length = rnd.choice([512, 4096, 8192, 45056, 131072])
                    offset = rnd.randrange(0, (size - length) // 512) * 512
                    data = rnd.randbytes(length)
                    await front.write(offset, data)
                    written[offset] = data
                for offset, data in written.items():
                    got = await front.read(offset, len(data))
                    # later writes may overlap earlier ones: compare against the file later
                await front.flush()
                await front.discard(0, 65536)
                assert await front.read(0, 65536) == bytes(65536)
                await front.write(65536, b"z" * 4096)
                await front.flush()
                print(json.dumps({"size": size, "stats": asdict(front.statistics())}), flush=True)
                nursery.cancel_scope.cancel()

    trio.run(main)
""")


async def test_guest_writes_reach_the_backing_file_through_a_driver_domain(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        xs_path = str(tmp_path / "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        try:
            stor_domid, stor = await spawn_domain(dom0, "stor", [sys.executable, "-m", "ringfence", "blkback"],
                                                  stderr=subprocess.DEVNULL)
            guest_domid, fd = await dom0.create_domain("guest")
            async with open_xenstore(xs_path) as xs:
                await add_vbd(xs, backend=stor_domid, frontend=guest_domid, devid=51712,
                              target=str(disk))
            guest = await start_domain_program(GUEST, fd, "7")
            with trio.fail_after(90):
                out = await program_output(guest, timeout=90)
                assert await guest.wait() == 0
            result = json.loads(out)
            assert result["size"] == 4 << 20
            stats = result["stats"]
            assert stats["errors"] == 0 and stats["in_flight"] == 0 and stats["bad_responses"] == 0
            # Replay the guest's script against a model and compare with the file itself.
            import random
            rnd = random.Random(7)
            model = bytearray(disk.read_bytes())  # only the written ranges matter
            expected = {}
            for _ in range(40):
                length = rnd.choice([512, 4096, 8192, 45056, 131072])
                offset = rnd.randrange(0, ((4 << 20) - length) // 512) * 512
                expected[(offset, length)] = rnd.randbytes(length)
            data = disk.read_bytes()
            ordered = list(expected.items())
            for (offset, length), blob in ordered:
                model[offset:offset + length] = blob
            model[0:65536] = bytes(65536)
            model[65536:65536 + 4096] = b"z" * 4096
            for (offset, length), _ in ordered:
                assert data[offset:offset + length] == model[offset:offset + length]
            assert data[:65536] == bytes(65536) and data[65536:69632] == b"z" * 4096
            stor.kill()
        finally:
            xenstored.terminate()
            await xenstored.wait()
