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

from xray.serve.tls import TIMED_OUT, ServerTls, handshake_reason


class HandshakeInThreadServer(ThreadedAssociationServer):
    request_queue_size = 128  # socketserver's listen backlog is 5: a burst of modalities would see refusals
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
        """The whole handshake within the timeout: the socket's own timeout bounds each read, and a timer cuts a
        client that trickles its ClientHello a byte at a time."""
        raw.settimeout(self.handshake_timeout_s)
        expired = threading.Event()

        def cut():
            expired.set()
            _shutdown(raw)

        timer = threading.Timer(self.handshake_timeout_s, cut)
        timer.daemon = True
        timer.start()
        try:
            tls = self.tls.context.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as e:  # SSLError, a timeout, a reset; ValueError: closed under us at shutdown
            reason = TIMED_OUT if expired.is_set() else handshake_reason(e)
            self.on_handshake_failed(address, reason)
            _close(raw)
            return None
        finally:
            timer.cancel()
        if expired.is_set():  # finished just as the timer cut it: the socket is shut, the connection gone
            _close(tls)
            self.on_handshake_failed(address, TIMED_OUT)
            return None
        tls.settimeout(None)  # as pynetdicom has it: its reactor polls with select(), its own timeouts apply
        return tls


def _shutdown(sock: socket.socket):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket):
    _shutdown(sock)
    sock.close()


def serve(ae, address, tls: ServerTls | None, handshake_timeout_s: float, on_handshake_failed, handlers):
    """ae.start_server(address, block=False) with this server class: the server, serving in a daemon thread."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=HandshakeInThreadServer)
    server.tls, server.handshake_timeout_s, server.on_handshake_failed = tls, handshake_timeout_s, on_handshake_failed
    thread = threading.Thread(target=server.serve_forever, name="xray-dicom-accept", daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: ae.shutdown() stops it too
    return server
