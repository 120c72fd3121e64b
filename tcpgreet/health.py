"""
Health endpoints beside C{/metrics}: C{/healthz} (the process is up and its
reactor answers) and C{/readyz} (it serves: every listener listens, and with
C{--workers}, every worker is ready; 503 from the moment a stop begins, for
the whole drain).

They let an orchestrator probe tcpgreet over HTTP on the metrics endpoint
instead of opening greeting connections, each of which would be logged and
counted as one.  The metrics endpoint is stopped last (L{MetricsLast}), so
both keep answering while the drain lasts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

if TYPE_CHECKING:  # for the annotations alone
    from tcpgreet.service import GreetService
    from tcpgreet.workers.supervisor import WorkerSupervisor

# Why the service does not serve right now, or None when it does.
Unready = Callable[[], str | None]


def _plain(request: IRequest, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    # A probe's answer is about this instant: no cache may keep it.
    request.setHeader(b"Cache-Control", b"no-store")
    return text.encode("utf-8") + b"\n"


class HealthPage(Resource):
    """C{/healthz}: 200 whenever the reactor gets to answer, drain or not."""

    def render_GET(self, request: IRequest) -> bytes:
        return _plain(request, 200, "ok")


class ReadyPage(Resource):
    """C{/readyz}: 200 while C{unready} has nothing to say, else 503 and why."""

    def __init__(self, unready: Unready) -> None:
        super().__init__()
        self._unready = unready

    def render_GET(self, request: IRequest) -> bytes:
        reason = self._unready()
        if reason is None:
            return _plain(request, 200, "ready")
        return _plain(request, 503, f"not ready: {reason}")


def serve_health(site: Site, unready: Unready) -> None:
    """Add C{/healthz} and C{/readyz} to the metrics endpoint's C{site}."""
    site.resource.putChild(b"healthz", HealthPage())
    site.resource.putChild(b"readyz", ReadyPage(unready))


def greeter_unready(greeter: GreetService) -> str | None:
    """
    Why a L{tcpgreet.service.GreetService} does not serve: it is not
    running (a stop has begun: its listeners close and it drains), or some
    listener does not listen.
    """
    if not greeter.running:
        return "stopping"
    missing = len(greeter.endpoints) - len(greeter.ports)
    if missing:
        return f"{missing} of {len(greeter.endpoints)} listener(s) not listening"
    return None


def supervisor_unready(supervisor: WorkerSupervisor) -> str | None:
    """
    Why a L{tcpgreet.workers.WorkerSupervisor} does not serve: as for a
    greeter, or some worker is not ready (still starting, or exited and
    waiting for its restart).  Every worker counts: with per-address
    steering, the clients steered to a missing worker would wait.
    """
    reason = greeter_unready(supervisor)
    if reason is not None:
        return reason
    ready = sum(1 for worker in supervisor.workers.values()
                if worker.served_since is not None and not worker.exited)
    if ready < supervisor.count:
        return f"{ready} of {supervisor.count} workers ready"
    return None


class MetricsLast(MultiService):
    """
    A L{MultiService} that stops its C{metrics} service only once every
    other one has stopped: a greeting service's stop includes its drain,
    and while it lasts C{/readyz} must answer 503 (rather than refuse the
    connection, which a probe could not tell from a crash), C{/healthz}
    200, and C{/metrics} count the drain.
    """

    def stopService(self) -> Deferred:
        Service.stopService(self)
        metrics = self.namedServices.get("metrics")
        others = [service for service in reversed(list(self)) if service is not metrics]
        stopped = DeferredList([maybeDeferred(service.stopService) for service in others],
                               consumeErrors=True)
        if metrics is not None:
            stopped.addBoth(lambda _: metrics.stopService())
        return stopped
