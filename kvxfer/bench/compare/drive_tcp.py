"""The limit a comparison over TCP is judged against: the request's bytes as one stream on one TCP connection
between the same two processes (each layer's share of the bytes sent with one sendall, received in place), no
descriptors, no completion protocol. Not verified (the bytes land unplaced)."""
from __future__ import annotations

import socket

from driver import run


class RawTcp:
    def __init__(self, role, req, pool, timeout_s, options):
        self.role, self.timeout_s, self.chunk_bytes = role, timeout_s, req.chunk_bytes
        self.views = [memoryview(layer) for layer in pool]
        self.sock = None
        if role == "recv":
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.listener.settimeout(timeout_s)

    def address(self):
        return {"port": self.listener.getsockname()[1]} if self.role == "recv" else {}

    def connect(self, peer):
        if self.role == "recv":
            self.sock, _ = self.listener.accept()
        else:
            self.sock = socket.create_connection(("127.0.0.1", peer["port"]), timeout=self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.timeout_s)

    def arm(self, rid, blocks):
        pass

    def wait(self, rid, blocks):
        for view in self._views(blocks):
            got = 0
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("the sender closed the connection mid-request")
                got += n

    def send(self, rid, blocks):
        for view in self._views(blocks):
            self.sock.sendall(view)

    def _views(self, blocks):
        """Each layer's share of a request of `blocks` blocks: its K and V chunks' bytes."""
        return [v[:2 * blocks * self.chunk_bytes] for v in self.views]

    def close(self):
        if self.sock:
            self.sock.close()


if __name__ == "__main__":
    run(RawTcp)
