"""C{python -m tcpgreet.client}: the probe client's command."""

from tcpgreet.client import main

main()
