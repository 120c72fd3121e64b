/*
 * greetserver.c - the benchmark's floor: the least a greeting server can do
 * on Linux.  One thread, one epoll set holding only the listening socket.
 *
 * When the listener is readable, accept every pending connection
 * (accept4, non-blocking, until EAGAIN), write the greeting to each and
 * close it.  Nothing is registered per connection, nothing is read, nothing
 * is logged: any real server does more, so its CPU per greeting over this
 * one's is what its features and its language cost.
 *
 * usage: greetserver PORT
 * Listens on 127.0.0.1:PORT with a backlog of 1024, as tcpgreet does, and
 * sends "Thank you for connecting\r\n".  Runs until it is killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static const char greeting[] = "Thank you for connecting\r\n";

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "greetserver: bad port %s\n", argv[1]);
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int on = 1;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (listener < 0 ||
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0 ||
        bind(listener, (struct sockaddr *)&address, sizeof address) < 0 ||
        listen(listener, 1024) < 0) {
        perror("greetserver: listen");
        return 1;
    }
    int poller = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event wanted = {.events = EPOLLIN, .data.fd = listener};
    if (poller < 0 || epoll_ctl(poller, EPOLL_CTL_ADD, listener, &wanted) < 0) {
        perror("greetserver: epoll");
        return 1;
    }
    for (;;) {
        struct epoll_event ready;
        int n = epoll_wait(poller, &ready, 1, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("greetserver: epoll_wait");
            return 1;
        }
        for (;;) {
            int connection = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (connection < 0) {
                /* EAGAIN: the queue is empty.  Anything else (EMFILE, a
                 * connection reset while queued) waits for the next wake-up. */
                break;
            }
            /* A fresh socket's send buffer takes the whole greeting: a short
             * write cannot happen here, and a failed one loses one client. */
            ssize_t written = write(connection, greeting, sizeof greeting - 1);
            (void)written;
            close(connection);
        }
    }
}
