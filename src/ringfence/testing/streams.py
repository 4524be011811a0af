"""Reading a child process's output line by line in trio tests."""
from __future__ import annotations

import trio


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream, ended: str = "stream ended") -> None:
        self.stream, self.buffer, self.ended = stream, b"", ended

    async def next(self) -> str:
        """The next line, without its newline; EOFError when the stream ends first."""
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(self.ended)
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()
