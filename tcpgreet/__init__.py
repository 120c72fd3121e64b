"""
tcpgreet: a TCP greeting (banner) service and probe client, built on Twisted.

The server runs under twistd (C{twistd -n tcpgreet}); the client is
C{python -m tcpgreet.client}.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
