"""STOW-RS in, the pieces without a server: the multipart/related reader and the PS3.18 response."""
from __future__ import annotations

import pydicom
import pytest

from xray.serve.dicom.multipart import MultipartError, parse_related
from xray.serve.dicom.stow import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, Outcome,
                                   response)

CT = 'multipart/related; type="application/dicom"; boundary=XyZ-42'


def related(*parts: bytes, boundary: str = "XyZ-42", headers: str = "Content-Type: application/dicom\r\n") -> bytes:
    out = b"preamble, ignored\r\n"
    for p in parts:
        out += f"--{boundary}\r\n{headers}\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue\r\n".encode()


def test_parts_come_back_byte_for_byte_even_when_they_hold_crlf_and_dashes():
    first, second = b"\r\n--XyZ-4\r\n\x00\xff" * 100, b"--XyZ-42 is not at a line start"
    parts = parse_related(CT, related(first, second))
    assert [p.data for p in parts] == [first, second]
    assert {p.content_type for p in parts} == {"application/dicom"}


def test_rfc2231_parameters_folded_headers_and_a_boundary_inside_the_preamble():
    body = b"see --XyZ-42x here\r\n" + related(b"DATA", headers="Content-Type:\r\n application/dicom\r\n")
    parts = parse_related("multipart/related; type*=''application%2Fdicom; boundary*=''XyZ-42", body)
    assert [(p.content_type, p.data) for p in parts] == [("application/dicom", b"DATA")]


def test_a_part_without_headers_is_of_the_root_type_and_other_types_are_named():
    parts = parse_related(CT, related(b"abc", headers=""))
    assert parts[0].content_type == "application/dicom" and parts[0].data == b"abc"
    mixed = parse_related(CT, related(b"{}", headers="content-type: Application/DICOM+JSON; charset=utf-8\r\n"))
    assert mixed[0].content_type == "application/dicom+json"


def test_a_part_over_the_limit_comes_back_with_its_size_and_no_data():
    small, big = b"\x00\xff" * 50, b"B" * 101
    parts = parse_related(CT, related(small, big, b"", headers=""), max_part_bytes=100)
    assert [(p.data, p.size) for p in parts] == [(small, 100), (None, 101), (b"", 0)]  # 100: at the limit, kept
    assert [p.content_type for p in parts] == ["application/dicom"] * 3
    assert [p.data for p in parse_related(CT, related(small, big))] == [small, big]  # no limit: all kept


@pytest.mark.parametrize("content_type, body, status, words", [
    ("application/dicom", b"x", 415, "multipart/related"),
    ('multipart/related; type="application/dicom+json"; boundary=a', b"x", 415, "application/dicom parts only"),
    ('multipart/related; type="application/dicom"', b"x", 400, "boundary"),
    (CT, b"no delimiter here", 400, "does not contain its boundary"),
    (CT, b"--XyZ-42\r\nContent-Type: application/dicom\r\n\r\npart without its end", 400, "closing boundary"),
    (CT, b"--XyZ-42--\r\n", 400, "no parts"),
    (CT, b"--XyZ-42\r\nContent-Type: application/dicom\r\nno empty line\r\n--XyZ-42--", 400, "empty line"),
])
def test_bodies_that_are_not_multipart_related_get_one_line_and_their_status(content_type, body, status, words):
    with pytest.raises(MultipartError) as e:
        parse_related(content_type, body)
    assert e.value.status == status and words in str(e.value) and "\n" not in str(e.value)


CR = "1.2.840.10008.5.1.4.1.1.1"


def _read(payload: dict) -> pydicom.Dataset:
    return pydicom.Dataset.from_json(payload)


def test_the_response_lists_stored_and_failed_instances_with_ps318_statuses():
    stored, failed = Outcome(CR, "1.2.3"), Outcome("1.2.840.10008.5.1.4.1.1.2", "1.2.4", SOP_CLASS_NOT_SUPPORTED)
    unreadable = Outcome(None, None, CANNOT_UNDERSTAND)
    status, payload = response([stored, failed, unreadable])
    assert status == 202
    ds = _read(payload)
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence] == [(CR, "1.2.3")]
    assert [i.FailureReason for i in ds.FailedSOPSequence] == [0x0122, 0xC000]
    assert ds.FailedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.4"
    assert "ReferencedSOPInstanceUID" not in ds.FailedSOPSequence[1]
    assert response([stored])[0] == 200 and "00081198" not in response([stored])[1]
    assert response([failed, unreadable])[0] == 409
    assert response([Outcome(CR, "1.2.5", OUT_OF_RESOURCES)])[0] == 503  # only "not now": send again
    assert response([Outcome(CR, "1.2.5", OUT_OF_RESOURCES), failed])[0] == 409


class FakeNode:
    """The DICOM node as stow_routes sees it: busy() and receive(), here scripted."""

    def __init__(self, busy=None, status=0x0000):
        from xray.serve.dicom.node import CHEST_STORAGE, decodable_transfer_syntaxes

        self._busy, self.status, self.received, self.logged = busy, status, [], []
        self.storage_classes = {str(c) for c in CHEST_STORAGE}
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self.results = self
        self.stow_bodies = 0
        from types import SimpleNamespace

        self.settings = SimpleNamespace(max_associations=2, max_instance_mb=64.0)

    def busy(self):
        return self._busy

    def receive(self, ds, encoded, ids, start=None):
        self.received.append((str(ds.SOPInstanceUID), encoded(), ids))
        return self.status

    def write(self, event, **fields):
        self.logged.append({"event": event, **fields})


def call_stow(node, body: bytes, content_type: str = CT, study: str | None = None):
    """The route's handler on a bare ASGI request: (status, headers, body)."""
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import Request

    from xray.serve.dicom.stow_routes import _stow

    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/dicomweb/studies", "query_string": b"",
             "headers": [(b"content-type", content_type.encode())], "client": ("127.0.0.1", 5),
             "app": SimpleNamespace(state=SimpleNamespace(node=node))}
    response = asyncio.run(_stow(Request(scope, receive), study))
    return response.status_code, response.headers, response.body


@pytest.fixture(scope="module")
def dx(tmp_path_factory):
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
    from test_dicom_node import write_dicom
    from test_infer import radiograph

    return write_dicom(tmp_path_factory.mktemp("dx") / "dx.dcm", radiograph(128, seed=1),
                       DigitalXRayImageStorageForPresentation, 16)


def test_a_busy_node_answers_503_with_retry_after_before_reading(dx):
    node = FakeNode(busy="the model is still loading")
    status, headers, body = call_stow(node, related(dx.read_bytes()))
    assert status == 503 and headers["retry-after"] == "5" and b"still loading" in body and node.received == []
    node = FakeNode()
    node.stow_bodies = 2  # --max-associations bodies already being received: no third in memory
    status, headers, body = call_stow(node, related(dx.read_bytes()))
    assert status == 503 and b"2 STOW-RS requests being received" in body and node.received == []
    node.stow_bodies = 1
    assert call_stow(node, related(dx.read_bytes()))[0] == 200 and node.stow_bodies == 1  # released after use


def test_parts_the_node_cannot_take_now_are_503_and_stored_ones_reach_receive_whole(dx):
    import json

    data = dx.read_bytes()
    status, headers, body = call_stow(FakeNode(status=0xA700), related(data))
    assert status == 503 and headers["retry-after"] == "5"
    assert [i["00081197"]["Value"][0] for i in json.loads(body)["00081198"]["Value"]] == [0xA700]
    node = FakeNode()
    status, headers, body = call_stow(node, related(data, data))
    assert status == 200 and headers["content-type"] == "application/dicom+json"
    assert [(r[1] == data, r[2]["received_by"], r[2]["client"]) for r in node.received] == [(True, "STOW-RS",
                                                                                             "127.0.0.1")] * 2


def test_a_part_over_max_instance_mb_is_refused_alone_and_the_others_stored(dx):
    import json

    data = dx.read_bytes()
    node = FakeNode()
    node.settings.max_instance_mb = (len(data) + 1) / 2**20  # the DX fits; a part one byte more does not
    status, _, body = call_stow(node, related(data, data + b"\0\0", data))
    assert status == 202
    answer = json.loads(body)
    assert len(answer["00081199"]["Value"]) == 2 and len(node.received) == 2
    assert answer["00081198"]["Value"] == [{"00081197": {"vr": "US", "Value": [0x0110]}}]  # no UID: never read
    assert [(r["status"], r["sop_instance_uid"]) for r in node.logged] == [("refused", "")]
    assert "MB limit (--max-instance-mb): STOW-RS failure reason 0x0110" in node.logged[0]["reason"]


def test_the_body_is_parsed_on_a_worker_thread_not_the_event_loop(dx, monkeypatch):
    """Parsing a 64 MB body takes ~0.1 s: on the event loop, no other request would be served meanwhile."""
    import threading

    from xray.serve.dicom import stow_routes

    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return parse_related(*args, **kwargs)

    monkeypatch.setattr(stow_routes, "parse_related", recording)
    assert call_stow(FakeNode(), related(dx.read_bytes()))[0] == 200  # asyncio.run: the loop on this thread
    assert call_stow(FakeNode(), b"x", content_type="application/dicom")[0] == 415  # raised there, answered here
    assert len(threads) == 2 and threading.current_thread() not in threads


def test_dicomweb_alone_makes_a_node_without_a_dimse_port_and_allow_ae_needs_one():
    from xray.common.errors import XrayError
    from xray.serve.dicom.options import node_settings_from

    args = {"host": "127.0.0.1", "dicom_port": None, "dicomweb": True, "ae_title": "XRAY_EDGE", "allow_ae": (),
            "results_dir": "r", "send_to": None, "send_credentials": None, "send_heatmap": False,
            "send_backoff_max_s": 60.0, "send_max_age_h": 168.0, "accept_any_called_ae": False,
            "log_patient_id": "keep", "patient_id_key": None, "max_instance_mb": 64.0, "max_associations": 8,
            "max_pdu_kb": 64}
    settings = node_settings_from(**args)
    assert settings.port is None and settings.dicomweb
    assert node_settings_from(**{**args, "dicomweb": False}) is None
    with pytest.raises(XrayError, match="are about the DIMSE port: add --dicom-port"):
        node_settings_from(**{**args, "allow_ae": ("CR1",)})
    with pytest.raises(XrayError, match="add --dicom-port PORT or --dicomweb"):
        node_settings_from(**{**args, "dicomweb": False, "send_to": "PACS@h:104"})


def test_the_node_does_not_classify_its_own_heatmap_routed_back(dx):
    """An archive forwarding new instances of the study back to the node: the heatmap SC the node built is
    not classified again (that would loop: SC -> SR + SC -> ...)."""
    import numpy as np

    from xray.serve.dicom.node import not_for_the_model
    from xray.serve.dicom.sr import build_heatmap_sc

    source = pydicom.dcmread(dx)
    assert not_for_the_model(source) is None
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[..., 0] = 200
    sc = pydicom.dcmread(_roundtrip(build_heatmap_sc(source, rgb)))  # as an archive would send it back
    assert not_for_the_model(sc) == "this node's own heatmap (an archive routed it back)"


def _roundtrip(ds) -> "io.BytesIO":
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf
