"""The blkback backing store on a real file: vectored I/O, discard holes, flush, read-only."""
from __future__ import annotations

import errno
import os

import pytest

from ringfence.backends.blkback.vbd import IoKind, IoRequest, Vbd


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


async def test_read_write_discard_flush(disk):
    vbd = Vbd(str(disk))
    assert vbd.size == 1 << 20 and vbd.sectors == 2048 and vbd.sector_size == 512
    pages = [memoryview(bytearray(b"a" * 4096)), memoryview(bytearray(b"b" * 512))]
    write = IoRequest(IoKind.WRITE, offset=8192, length=4608, buffers=pages)
    out = [memoryview(bytearray(4096)), memoryview(bytearray(512))]
    read = IoRequest(IoKind.READ, offset=8192, length=4608, buffers=out)
    await vbd.submit([write])
    await vbd.submit([read, IoRequest(IoKind.FLUSH)])
    assert bytes(out[0]) == b"a" * 4096 and bytes(out[1]) == b"b" * 512
    await vbd.submit([IoRequest(IoKind.DISCARD, offset=65536, length=65536)])
    data = disk.read_bytes()
    assert data[65536:131072] == bytes(65536) and data[8192:8192 + 4096] == b"a" * 4096
    stats = vbd.statistics()
    assert (stats.reads, stats.writes, stats.flushes, stats.discards, stats.io_errors) == (1, 1, 1, 1, 0)
    vbd.close()


async def test_read_only_refuses_writes_and_discards(disk):
    vbd = Vbd(str(disk), read_only=True)
    requests = [IoRequest(IoKind.WRITE, 0, 512, [memoryview(bytearray(512))]),
                IoRequest(IoKind.DISCARD, 0, 4096)]
    await vbd.submit(requests)
    assert [r.error for r in requests] == [errno.EROFS, errno.EROFS]
    assert vbd.statistics().io_errors == 2
    vbd.close()


def test_not_a_disk(tmp_path):
    with pytest.raises(OSError):
        Vbd(str(tmp_path))


def test_backing_path_takes_libxl_raw_prefixes_and_refuses_other_formats():
    import errno

    from ringfence.backends.blkback.vbd import backing_path
    assert backing_path("/srv/disk.img") == "/srv/disk.img"
    assert backing_path("aio:/srv/disk.img") == "/srv/disk.img"
    assert backing_path("raw:/dev/vg/guest") == "/dev/vg/guest"
    assert backing_path("/srv/odd:name.img") == "/srv/odd:name.img"
    with pytest.raises(OSError) as refused:
        backing_path("qcow2:/srv/disk.qcow2")
    assert refused.value.errno == errno.EOPNOTSUPP
