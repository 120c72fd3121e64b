"""
C{--workers}: one supervisor process and N worker processes that serve
the same listeners.

  - L{tcpgreet.workers.supervisor}: the supervisor, which binds every
    listener, starts, restarts and stops the workers, and writes their log;
  - L{tcpgreet.workers.__main__}: how a worker process starts
    (C{python -m tcpgreet.workers ...});
  - L{tcpgreet.workers.arguments}: the command line a worker is given;
  - L{tcpgreet.workers.handover}: the sockets the supervisor binds and its
    workers adopt;
  - L{tcpgreet.workers.reuseport}: a socket per worker on one address, and
    the BPF program that steers a client to one of them;
  - L{tcpgreet.workers.control}: the AMP channel between the two;
  - L{tcpgreet.workers.logrelay}: a worker's log, written by the supervisor.

This package imports nothing itself, Twisted least of all: a worker
process must name itself for the systemd sockets it inherits before
Twisted's endpoints module is first imported, and C{python -m} imports
the package before it runs C{__main__}.
"""
