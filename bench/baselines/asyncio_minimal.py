"""
A baseline outside Twisted: the stdlib asyncio event loop with a Protocol.

usage: python asyncio_minimal.py PORT

connection_made writes the greeting and closes the transport.  The Protocol
API rather than streams (asyncio.start_server), because it is the faster of
the two and so the fairer comparison.  Listens on 127.0.0.1 with a backlog
of 1024, tcpgreet's default.
"""

import asyncio
import sys

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


asyncio.run(serve(int(sys.argv[1])))
