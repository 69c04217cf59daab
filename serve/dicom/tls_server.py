"""pynetdicom's threaded association server, with the TLS handshake in the connection's own thread.

pynetdicom 3.0 wraps each accepted socket in its single accept thread (`AssociationServer.get_request`), on a
blocking socket: one client that opens TCP and says nothing stalls every other client until it goes away, and a
failed handshake is dropped without a word. Here the accept thread only accepts; the handshake runs in the
thread pynetdicom starts per connection anyway, bounded by a timeout, and a failure is reported (logged and
audited by the node) before the socket is closed. The TLS itself is the standard library's, from a
`serve.tls.ServerTls` whose context SIGHUP reloads in place.

This overrides two methods of `ThreadedAssociationServer`; pyproject pins pynetdicom 3.0 and the tests in
tests/test_dicom_tls.py exercise them on the installed version.
"""
from __future__ import annotations

import socket
import ssl
import threading
from typing import Callable

from pynetdicom.transport import ThreadedAssociationServer

from xray.serve.tls import ServerTls, handshake_reason


class HandshakeInThreadServer(ThreadedAssociationServer):
    tls: ServerTls | None = None
    handshake_timeout_s: float = 30.0
    on_handshake_failed: Callable[[tuple, str], None] = staticmethod(lambda address, reason: None)

    def get_request(self):
        """Accept only: the handshake waits for the connection's thread."""
        return self.socket.accept()

    def process_request_thread(self, request, client_address):
        if self.tls is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, raw: socket.socket, address) -> ssl.SSLSocket | None:
        raw.settimeout(self.handshake_timeout_s)
        try:
            tls = self.tls.context.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as e:  # SSLError, a timeout, a reset; ValueError: closed under us at shutdown
            self.on_handshake_failed(address, handshake_reason(e))
            _close(raw)
            return None
        tls.settimeout(None)  # as pynetdicom has it: its reactor polls with select(), its own timeouts apply
        return tls


def _close(sock: socket.socket):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def serve(ae, address, tls: ServerTls | None, handshake_timeout_s: float, on_handshake_failed, handlers):
    """ae.start_server(address, block=False) with this server class: the server, serving in a daemon thread."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=HandshakeInThreadServer)
    server.tls, server.handshake_timeout_s, server.on_handshake_failed = tls, handshake_timeout_s, on_handshake_failed
    thread = threading.Thread(target=server.serve_forever, name="xray-dicom-accept", daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: ae.shutdown() stops it too
    return server
