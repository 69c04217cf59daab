"""xray-serve's DICOM node options, and the NodeSettings they make (kept apart from the HTTP options)."""
from __future__ import annotations

from pathlib import Path

import click

from xray.common.errors import XrayError

_OPTIONS = [
    click.option("--dicom-port", type=click.IntRange(0, 65535), default=None,
                 help="Also run a DICOM node (C-ECHO, C-STORE of CR/DX/SC) on this port (e.g. 11112)."),
    click.option("--dicomweb", is_flag=True,
                 help="Also take instances by DICOMweb STOW-RS at POST /dicomweb/studies[/{study}] (the node's "
                      "checks, results.jsonl and reports; with or without --dicom-port)."),
    click.option("--dicom-host", metavar="ADDR",
                 help="Address the DICOM port binds (default: --host), e.g. the LAN's while HTTP stays on 127.0.0.1."),
    click.option("--dicom-tls-cert", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                 help="With --dicom-tls-key: the DICOM port speaks TLS only (1.2+, BCP 195), with this PEM "
                      "certificate (chain). Re-read on SIGHUP."),
    click.option("--dicom-tls-key", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                 help="The PEM private key of --dicom-tls-cert (not readable by others)."),
    click.option("--dicom-tls-ca", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                 help="Require a client certificate signed by this CA (PEM) on the DICOM port (mutual TLS)."),
    click.option("--ae-title", default="XRAY_EDGE", show_default=True, help="The DICOM node's AE title."),
    click.option("--allow-ae", "allow_ae", multiple=True, metavar="AE[=CN]",
                 help="Calling AE titles the node accepts (repeatable; default: any). AE=CN: that AE title only "
                      "with a client certificate whose common name is CN (needs --dicom-tls-ca)."),
    click.option("--results", "results_dir", type=click.Path(file_okay=False), default="xray-dicom-results",
                 show_default=True, help="Folder of the node's results.jsonl and of the reports' outbox (0700)."),
    click.option("--send-to", metavar="AE@HOST:PORT|URL",
                 help="Send a DICOM Structured Report per instance there: by C-STORE to AE@HOST:PORT, or by DICOMweb "
                      "STOW-RS to dicomweb+https://HOST[:PORT]/ROOT (POST ROOT/studies; dicomweb+http:// too)."),
    click.option("--send-credentials", type=click.Path(dir_okay=False), metavar="FILE",
                 help="With a dicomweb+ --send-to: the first line 'Bearer TOKEN' or 'user:password' (HTTP Basic), "
                      "read again before every request (replace the file to renew a token)."),
    click.option("--send-tls-ca", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                 help="Send over TLS (DIMSE), verifying the destination's certificate and host name against this CA "
                      "(PEM); for dicomweb+https:// it replaces the system's store. Read again for every round."),
    click.option("--send-tls-cert", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                 help="With --send-tls-key: this node's client certificate (PEM) for a destination that asks for one."),
    click.option("--send-tls-key", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                 help="The PEM private key of --send-tls-cert (not readable by others)."),
    click.option("--max-instance-mb", type=click.FloatRange(min=0.001), default=64.0, show_default=True,
                 help="An association sending a larger instance is aborted."),
    click.option("--send-heatmap", is_flag=True,
                 help="With --send-to: also send the heatmap overlay as a Secondary Capture (models with heatmaps)."),
    click.option("--send-backoff-max-s", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
                 help="Reports wait on disk until the PACS takes them; retries back off 1, 2, 4, ... s up to this."),
    click.option("--send-max-age-h", type=click.FloatRange(min=0.001), default=168.0, show_default=True,
                 help="A report still undelivered after this long is set aside in --results DIR/expired/."),
    click.option("--accept-any-called-ae", is_flag=True,
                 help="Accept associations whatever AE title they call (default: it must be --ae-title)."),
    click.option("--log-patient-id", type=click.Choice(["keep", "hash", "omit"]), default="keep", show_default=True,
                 help="Patient IDs in results.jsonl: as received, a keyed HMAC (--patient-id-key), or left out."),
    click.option("--patient-id-key", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                 help="The secret key for --log-patient-id hash (keep it apart from the results)."),
    click.option("--max-associations", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Simultaneous DICOM associations."),
    click.option("--max-pdu-kb", type=click.IntRange(min=4, max=1024), default=64, show_default=True,
                 help="Largest PDU the node receives."),
]


def dicom_options(func):
    """The DICOM node's options, added to xray-serve's."""
    for option in reversed(_OPTIONS):
        func = option(func)
    return func


def node_settings_from(host, dicom_port, dicomweb, ae_title, allow_ae, results_dir, send_to, send_credentials, send_heatmap,
                       send_backoff_max_s, send_max_age_h, accept_any_called_ae, log_patient_id, patient_id_key,
                       max_instance_mb, max_associations, max_pdu_kb, dicom_host=None, dicom_tls_cert=None,
                       dicom_tls_key=None, dicom_tls_ca=None, send_tls_ca=None, send_tls_cert=None, send_tls_key=None,
                       read_timeout_s=30.0):
    """The node's settings, or None without --dicom-port and --dicomweb (then its other options are a mistake).
    port None: the node takes instances by STOW-RS only."""
    tls_in = (dicom_host, dicom_tls_cert, dicom_tls_key, dicom_tls_ca)
    tls_out = (send_tls_ca, send_tls_cert, send_tls_key)
    if dicom_port is None and not dicomweb:
        if send_to or allow_ae or send_heatmap or send_credentials or any(tls_in) or any(tls_out):
            raise XrayError("--send-to / --send-credentials / --send-heatmap / --allow-ae / --dicom-host / "
                            "--dicom-tls-* / --send-tls-* configure the DICOM node: add --dicom-port PORT or --dicomweb")
        return None
    if (allow_ae or any(tls_in)) and dicom_port is None:
        raise XrayError("--allow-ae / --dicom-host / --dicom-tls-* are about the DIMSE port: add --dicom-port PORT")
    tls = server_tls(dicom_tls_cert, dicom_tls_key, dicom_tls_ca)
    allow_ae, ae_certificates = split_allow_ae(allow_ae, tls)
    if send_heatmap and not send_to:
        raise XrayError("--send-heatmap needs --send-to AE@HOST:PORT or a dicomweb+https:// URL")
    from .destination import parse_destination
    from .node import NodeSettings
    from .results_log import PatientIdPolicy

    PatientIdPolicy(log_patient_id, patient_id_key)  # a missing or short key fails here, before anything starts
    for title in (ae_title, *allow_ae):
        if not title.strip() or len(title) > 16 or "\\" in title:
            raise XrayError(f"AE title {title!r}: 1 to 16 characters, no backslash")
    try:
        destination = parse_destination(send_to) if send_to else None
    except ValueError as e:
        raise XrayError(f"--send-to {e}") from None
    if send_credentials:
        check_credentials(send_credentials, destination)
    send_tls = send_tls_files(destination, send_tls_ca, send_tls_cert, send_tls_key)
    return NodeSettings(port=dicom_port, dicomweb=dicomweb, host=dicom_host or host, tls=tls, send_tls=send_tls,
                        ae_certificates=ae_certificates, handshake_timeout_s=read_timeout_s, ae_title=ae_title,
                        allow_ae=tuple(allow_ae),
                        results_dir=Path(results_dir), send_to=destination, max_pdu=max_pdu_kb * 1024,
                        send_credentials=Path(send_credentials) if send_credentials else None,
                        max_instance_mb=max_instance_mb, max_associations=max_associations, send_heatmap=send_heatmap,
                        send_backoff_max_s=send_backoff_max_s, send_max_age_h=send_max_age_h,
                        accept_any_called_ae=accept_any_called_ae, log_patient_id=log_patient_id,
                        patient_id_key=Path(patient_id_key) if patient_id_key else None)


def server_tls(cert, key, ca):
    """--dicom-tls-cert/-key/-ca: the DICOM port's TLS, its files checked now (one line if unusable)."""
    if not cert and not key:
        if ca:
            raise XrayError("--dicom-tls-ca needs --dicom-tls-cert and --dicom-tls-key (the node's own TLS identity)")
        return None
    if not (cert and key):
        raise XrayError("--dicom-tls-cert and --dicom-tls-key go together")
    from xray.serve.tls import ServerTls

    return ServerTls(Path(cert), Path(key), Path(ca) if ca else None, option="--dicom-tls")


def split_allow_ae(allow_ae, tls) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """--allow-ae AE or AE=CN: the AE titles, and the (AE, CN) pairs whose certificate must vouch for the title."""
    titles, pairs = [], []
    for item in allow_ae:
        title, eq, cn = item.partition("=")
        if eq and not cn.strip():
            raise XrayError(f"--allow-ae {item!r}: expected AE or AE=COMMON_NAME")
        titles.append(title)
        if eq:
            pairs.append((title, cn.strip()))
    if pairs and (tls is None or tls.ca is None):
        raise XrayError("--allow-ae AE=CN checks the client certificate's name: add --dicom-tls-ca (and "
                        "--dicom-tls-cert/-key)")
    return tuple(titles), tuple(pairs)


def send_tls_files(destination, ca, cert, key):
    """--send-tls-ca/-cert/-key: checked now (a context is made from them), read again for every round."""
    if not (ca or cert or key):
        return None
    from xray.serve.tls import client_context

    from .destination import DicomWebDestination
    from .dimse_client import SendTls

    if destination is None:
        raise XrayError("--send-tls-* are for --send-to")
    if bool(cert) != bool(key):
        raise XrayError("--send-tls-cert and --send-tls-key go together")
    if isinstance(destination, DicomWebDestination) and destination.scheme == "http":
        raise XrayError("--send-tls-* with a dicomweb+http:// destination: use dicomweb+https://")
    files = SendTls(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None)
    client_context(*files, option="--send-tls")
    return files


def check_credentials(path: str, destination):
    """--send-credentials goes with a DICOMweb --send-to, and must give a header now (at send time a bad file is
    only a retry: the cron job renewing it may be mid-write)."""
    from .credentials import CredentialsError, authorization_header
    from .destination import DicomWebDestination

    if not isinstance(destination, DicomWebDestination):
        raise XrayError("--send-credentials is for a DICOMweb destination: --send-to dicomweb+https://HOST/ROOT "
                        "(a DIMSE AE@HOST:PORT takes no credentials)")
    try:
        authorization_header(Path(path))
    except CredentialsError as e:
        raise XrayError(str(e)) from None
