"""Tests of tcpgreet.client, one module of tests per module where it has one."""
