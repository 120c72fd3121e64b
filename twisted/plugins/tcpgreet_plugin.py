"""
The twistd plugin: C{twistd tcpgreet}.  Only a name, a module path and a
description live here, so plugin discovery never imports tcpgreet itself.
"""

from twisted.application.service import ServiceMaker

tcpgreet = ServiceMaker(
    "tcpgreet",
    "tcpgreet.tap",
    "A TCP greeting (banner) server: sends a message to every client, then closes.",
    "tcpgreet",
)
