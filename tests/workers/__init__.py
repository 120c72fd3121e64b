"""Tests of tcpgreet.workers, one module of tests per module where it has one."""
