"""
A baseline on uvloop (libuv under asyncio's API), when it is installed:
the fastest event loop a Python greeting server commonly runs on.

usage: python uvloop_minimal.py PORT

The same Protocol as asyncio_minimal.py: connection_made writes the
greeting and closes the transport.  Listens on 127.0.0.1 with a backlog of
1024, tcpgreet's default.
"""

import asyncio
import sys

import uvloop

GREETING = b"Thank you for connecting\r\n"
BACKLOG = 1024


class Greeter(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(GREETING)
        transport.close()


async def serve(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Greeter, "127.0.0.1", port, backlog=BACKLOG)
    async with server:
        await server.serve_forever()


uvloop.run(serve(int(sys.argv[1])))
