"""Container health check for ``sorter listen``: a DICOM C-ECHO to the listener on this host.

Healthy (exit 0) when the listener answers the echo with Success, or when it answers the association
at all with an A-ASSOCIATE-RJ (calling AE not allowed, association limit reached, spool below the
free-space floor): it is alive and deciding, and restarting it would not help. Unhealthy (exit 1)
when nothing answers (connection refused, timeout, abort).

Settings come from the listener's own variables: SORTER_PORT (default 11112), SORTER_AE_TITLE
(default SORTER), SORTER_ALLOW_AE (the first entry is used as our calling AE so that an allow-list
does not turn every probe into a logged rejection; otherwise SORTER_HEALTHCHECK_AE, default
HEALTHCHECK), SORTER_TLS_CERT (TLS on: the probe speaks TLS without verifying the server),
SORTER_HEALTHCHECK_CERT / SORTER_HEALTHCHECK_KEY (a client certificate, for mutual TLS).
"""

from __future__ import annotations

import logging
import os
import ssl
import sys

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main() -> int:
    env = os.environ
    host = env.get("SORTER_HEALTHCHECK_HOST", "127.0.0.1")
    port = int(env.get("SORTER_PORT", "11112"))
    called = env.get("SORTER_AE_TITLE", "SORTER")
    allowed = env.get("SORTER_ALLOW_AE", "").split()
    calling = allowed[0] if allowed else env.get("SORTER_HEALTHCHECK_AE", "HEALTHCHECK")

    tls_args = None
    if env.get("SORTER_TLS_CERT"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # liveness only: we talk to ourselves on loopback
        if env.get("SORTER_HEALTHCHECK_CERT"):
            context.load_cert_chain(env["SORTER_HEALTHCHECK_CERT"], env.get("SORTER_HEALTHCHECK_KEY"))
        tls_args = (context, None)

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, 10)

    assoc = ae.associate(host, port, ae_title=called, tls_args=tls_args)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        code = getattr(status, "Status", None)
        if code == 0x0000:
            print(f"C-ECHO {calling} -> {called}@{host}:{port}: success")
            return 0
        print(f"C-ECHO {calling} -> {called}@{host}:{port}: status {code!r}", file=sys.stderr)
        return 1
    if assoc.is_rejected:
        print(f"association {calling} -> {called}@{host}:{port} rejected: listener alive")
        return 0
    print(f"no DICOM answer from {called}@{host}:{port}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
