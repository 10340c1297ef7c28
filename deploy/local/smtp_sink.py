#!/usr/bin/env python3
"""SMTP sink for the chatfleet local stack and tests.

Why it exists: emailhandler has to talk to a real SMTP server, and tests need
to see what it sent and to make the server fail on purpose. This program
accepts every message on a loopback port and keeps it as a file instead of
delivering it:

  <mail-dir>/<id>.eml   the message as received, with two headers put in
                        front: X-Envelope-From and X-Envelope-To (the SMTP
                        envelope, which is not otherwise in the message)
  <mail-dir>/<id>.json  the envelope and session details: id, received_at,
                        mail_from, rcpt_tos, peer, helo, auth_login,
                        mail_options, rcpt_options, size, eml

The .json file is written before the .eml file and both appear atomically
(written under a dot-name, then renamed), so a reader that waits for
"*.eml" finds complete files, and the .json beside each one. Ids sort in
arrival order.

Failure injection, checked on every RCPT and DATA command:
  <mail-dir>/.reject-permanent exists -> "550 5.7.1 rejected by sink"
  <mail-dir>/.reject-temporary exists -> "451 4.3.0 try again later"
(permanent wins when both exist). Rejected messages are not stored.

AUTH PLAIN/LOGIN is offered without TLS and any credentials are accepted,
so a client configured with a user and password works too.

Usage: smtp_sink.py --port 2525 --mail-dir DIR [--host 127.0.0.1]
Needs aiosmtpd (pinned in deploy/local/requirements.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import logging
import os
import signal
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

LOG = logging.getLogger("smtp_sink")

REJECT_PERMANENT = ".reject-permanent"
REJECT_TEMPORARY = ".reject-temporary"
PERMANENT_REPLY = "550 5.7.1 rejected by sink"
TEMPORARY_REPLY = "451 4.3.0 try again later"


class SinkHandler:
    """aiosmtpd handler that stores messages as files in mail_dir."""

    def __init__(self, mail_dir: Path) -> None:
        self.mail_dir = mail_dir
        self._seq = itertools.count(1)

    def _rejection(self) -> str | None:
        if (self.mail_dir / REJECT_PERMANENT).exists():
            return PERMANENT_REPLY
        if (self.mail_dir / REJECT_TEMPORARY).exists():
            return TEMPORARY_REPLY
        return None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        reply = self._rejection()
        if reply:
            LOG.info("RCPT %s from %s: %s", address, session.peer, reply)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        reply = self._rejection()
        if reply:
            LOG.info("DATA from %s: %s", session.peer, reply)
            return reply
        try:
            msg_id = self._store(session, envelope)
        except OSError as exc:  # disk full, directory not writable, ...
            LOG.exception("could not store message")
            return f"451 4.3.0 sink could not store message: {exc.strerror}"
        return f"250 2.0.0 OK stored as {msg_id}"

    def _store(self, session, envelope) -> str:
        now = dt.datetime.now(dt.timezone.utc)
        msg_id = f"{now:%Y%m%dT%H%M%S.%fZ}-{os.getpid()}-{next(self._seq):06d}"
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        eol = b"\r\n" if b"\r\n" in content else b"\n"
        mail_from = envelope.mail_from or ""
        rcpt_tos = list(envelope.rcpt_tos)
        head = (
            b"X-Envelope-From: <" + mail_from.encode("utf-8") + b">" + eol
            + b"X-Envelope-To: " + ", ".join(f"<{r}>" for r in rcpt_tos).encode("utf-8") + eol
        )
        auth_login = None
        if isinstance(session.auth_data, LoginPassword):
            auth_login = session.auth_data.login.decode("utf-8", "replace")
        peer = session.peer
        meta = {
            "id": msg_id,
            "received_at": now.isoformat(),
            "mail_from": mail_from,
            "rcpt_tos": rcpt_tos,
            "peer": list(peer) if isinstance(peer, tuple) else peer,
            "helo": session.host_name,
            "auth_login": auth_login,
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "size": len(content),
            "eml": f"{msg_id}.eml",
        }
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.mail_dir / f"{msg_id}.json", json.dumps(meta, indent=2).encode() + b"\n")
        _write_atomic(self.mail_dir / f"{msg_id}.eml", head + content)
        LOG.info("stored %s from <%s> to %s (%d bytes)", msg_id, mail_from, rcpt_tos, len(content))
        return msg_id


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _accept_any_login(server, session, envelope, mechanism, auth_data) -> AuthResult:
    return AuthResult(success=True, auth_data=auth_data)


async def _serve(args: argparse.Namespace) -> None:
    mail_dir = Path(args.mail_dir).resolve()
    mail_dir.mkdir(parents=True, exist_ok=True)
    handler = SinkHandler(mail_dir)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname=args.hostname,
            ident="chatfleet smtp sink",
            enable_SMTPUTF8=True,
            decode_data=False,
            auth_required=False,
            auth_require_tls=False,
            authenticator=_accept_any_login,
            data_size_limit=args.max_size,
        )

    server = await loop.create_server(factory, host=args.host, port=args.port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    LOG.info("listening on %s:%d, storing mail in %s", args.host, args.port, mail_dir)
    try:
        await stop.wait()
    finally:
        LOG.info("stopping")
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SMTP sink that stores each message as a .eml file.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=2525, help="port to listen on (default: 2525)")
    parser.add_argument("--mail-dir", required=True, help="directory for the .eml/.json files")
    parser.add_argument("--hostname", default="chatfleet-smtp-sink", help="name in the 220 banner and EHLO reply")
    parser.add_argument("--max-size", type=int, default=32 * 1024 * 1024, help="largest message accepted, bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # aiosmtpd logs every command at INFO; keep only the sink's own lines, and
    # drop the deprecation warning aiosmtpd 1.4 logs about itself on each AUTH.
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.WARNING)
    mail_log.addFilter(lambda record: "login_data is deprecated" not in record.getMessage())
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
