"""A TCP load balancer for broker replicas behind one issuer address, as a Service does in a cluster:
each new connection goes to the next backend that accepts it (round robin, skipping refused ones), and
bytes are copied both ways untouched (TLS ends at the broker). Threads, not asyncio: it lives in the
harness's own process next to blocking test code."""
from __future__ import annotations

import itertools
import socket
import threading


class TcpBalancer:
    def __init__(self, host: str, port: int, backends: list[tuple[str, int]]):
        self.address = (host, port)
        self.backends = list(backends)
        self._next = itertools.count()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self.refused = 0  # connections no backend accepted

    def start(self) -> "TcpBalancer":
        listener = socket.create_server(self.address, reuse_port=False)
        listener.settimeout(0.5)
        self._listener = listener
        threading.Thread(target=self._accept, name="tcp-balancer", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        start = next(self._next)
        for i in range(len(self.backends)):
            backend = self.backends[(start + i) % len(self.backends)]
            try:
                return socket.create_connection(backend, timeout=2)
            except OSError:
                continue
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream = self._connect()
        if upstream is None:
            self.refused += 1
            client.close()
            return
        upstream.settimeout(None)
        client.settimeout(None)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
