"""
tcpgreet's benchmark: C{python -m bench --help}, from the repository root.

It measures tcpgreet, as installed, side by side with minimal Twisted and
asyncio greeting servers, under a load generator of its own, and reports
greetings/s, connect-to-EOF latency and server CPU per greeting.
"""


class BenchError(Exception):
    """A reason the benchmark cannot go on, in one line for the operator."""
