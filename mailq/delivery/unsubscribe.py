"""RFC 8058 one-click unsubscribe: a per-recipient HTTPS link whose token only we can make.

RFC 8058 wants the URI alone to say who unsubscribes, so one link for the whole list cannot work.
In personalized (VERP) delivery, the out runner rewrites each copy's ``List-Unsubscribe`` to

    List-Unsubscribe: <https://WEB/lists/dev/unsubscribe?address=alice%40example.org&token=TOKEN>,
     <mailto:dev-leave@example.org>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

when ``pipeline.web_url`` is an ``https://`` address. TOKEN is an HMAC-SHA256 of the list name and
the (lower-cased) address under a site secret kept in ``var/secrets/unsubscribe.key`` (made on
first use, mode 0600, shared by every node through var; never in git). Bulk delivery sends one copy
to many members, so it carries only the mailto: address and no ``List-Unsubscribe-Post``.

Whatever web front end the operator runs checks a request with ``verify_token`` (or the command
line: ``python -m mailq.delivery.unsubscribe verify LIST ADDRESS TOKEN``, exit 0 valid, 1 not)
before it unsubscribes anyone. Rotating the secret (delete the file) invalidates every link
already mailed.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable
from urllib.parse import quote

from mailq.config import Settings, load_settings
from mailq.errors import TemporaryFailure

SECRET_NAME = "unsubscribe.key"
#: Seconds a process trusts the key it read: a rotated key (file deleted, made anew) reaches running
#: out runners within this time, without a stat per recipient (NFS round trips) to notice it.
RECHECK_SECONDS = 60.0
#: path -> (key, when read, an HMAC-SHA256 keyed with it: each token copies it instead of keying anew)
_secrets: dict[str, tuple[bytes, float, hmac.HMAC]] = {}


def secret_path(settings: Settings) -> str:
    return os.path.join(settings.var, "secrets", SECRET_NAME)


def site_secret(settings: Settings) -> bytes:
    """The site's HMAC key, made once (32 random bytes) by whichever node needs it first.

    A damaged key file is a TemporaryFailure: personalized mail waits (nothing is shunted or sent
    with links that would not verify) until an operator deletes the file.
    """
    return _keyed(settings)[0]


def _keyed(settings: Settings) -> tuple[bytes, float, hmac.HMAC]:
    path = secret_path(settings)
    cached = _secrets.get(path)
    if cached is not None and time.monotonic() - cached[1] < RECHECK_SECONDS:
        return cached
    try:
        with open(path, "rb") as fh:
            key = fh.read()
    except FileNotFoundError:
        key = _create_secret(path)
    if len(key) < 32:
        raise TemporaryFailure(f"{path} holds {len(key)} bytes, expected 32 or more; delete it to make a new "
                               "one (links already mailed stop working)")
    cached = _secrets[path] = (key, time.monotonic(), hmac.new(key, digestmod=hashlib.sha256))
    return cached


def _create_secret(path: str) -> bytes:
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link(), not rename(): two nodes making it at once must end up with ONE key, the first.
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
    finally:
        os.unlink(tmp)
    with open(path, "rb") as fh:
        return fh.read()


def make_token(settings: Settings, listname: str, address: str) -> str:
    """The unguessable token for *address* on *listname* (URL-safe, 32 characters)."""
    mac = _keyed(settings)[2].copy()        # keyed once per key: a copy per token (one per copy sent)
    mac.update(f"{listname.lower()}\0{address.strip().lower()}".encode())
    return base64.urlsafe_b64encode(mac.digest()[:24]).decode("ascii")


def verify_token(settings: Settings, listname: str, address: str, token: str) -> bool:
    """True iff *token* is the one mailed to *address* for *listname* (constant-time compare).

    For the web front end: call it with the ``address`` and ``token`` query parameters of the
    one-click POST (and the list name from the path) before unsubscribing the address.
    """
    try:
        expected = make_token(settings, listname, address)
    except FileNotFoundError:
        return False
    return hmac.compare_digest(expected.encode("ascii"), token.strip().encode("ascii", "replace"))


def unsubscribe_url(settings: Settings, listname: str, address: str) -> str | None:
    """The one-click link for *address*, or None without an ``https://`` ``pipeline.web_url``."""
    link = linker(settings, listname)
    return link(address) if link else None


def linker(settings: Settings, listname: str) -> Callable[[str], str] | None:
    """``unsubscribe_url`` for one list, its fixed part made once (personalized delivery makes a
    link per copy); None without an ``https://`` ``pipeline.web_url``."""
    web = str(settings.pipeline.web_url or "").rstrip("/")
    if not web.startswith("https://"):
        return None
    head = f"{web}/lists/{quote(listname, safe='')}/unsubscribe?address="
    return lambda address: f"{head}{quote(address, safe='')}&token={make_token(settings, listname, address)}"


_UNSUBSCRIBE = re.compile(rb"^list-unsubscribe(-post)?[ \t]*:", re.IGNORECASE)


def personalizer(msg: bytes) -> Callable[[str], bytes] | None:
    """A maker of copies of *msg* whose ``List-Unsubscribe`` (kept mailto: addresses) is led by the
    given URL, plus the one-click ``List-Unsubscribe-Post``; None for a message without
    ``List-Unsubscribe`` (it did not come through the list pipeline: owner mail, notices).

    The header is parsed once here; each copy is then two concatenations (personalized delivery
    makes one per recipient).
    """
    nl = b"\r\n" if b"\r\n" in msg[:4000] else b"\n"
    end = msg.find(nl + nl)
    if end < 0:
        return None
    head, rest = msg[:end], msg[end:]
    kept: list[bytes] = []
    old_value: list[bytes] = []
    current = None          # the header being dropped: b"" List-Unsubscribe, b"-post" the Post one
    for line in head.split(nl):
        if line[:1] in (b" ", b"\t") and current is not None:
            if current == b"":
                old_value.append(line.strip())
            continue
        match = _UNSUBSCRIBE.match(line)
        current = (match.group(1) or b"").lower() if match else None
        if match is None:
            kept.append(line)
        elif current == b"":
            old_value.append(line[match.end():].strip())
    if not old_value:
        return None
    uris = [u.strip() for u in b" ".join(old_value).split(b",") if u.strip().lower().startswith(b"<mailto:")]
    before = nl.join(kept) + nl + b"List-Unsubscribe: <"
    after = b">" + b"".join(b"," + nl + b" " + u for u in uris) + nl + \
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" + rest
    return lambda url: before + url.encode("ascii") + after


def main(argv: list[str] | None = None) -> int:
    """``python -m mailq.delivery.unsubscribe verify LIST ADDRESS TOKEN``: 0 valid, 1 not, 2 usage."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] != "verify":
        sys.stderr.write("usage: python -m mailq.delivery.unsubscribe verify LIST ADDRESS TOKEN\n"
                         "  Exit 0 if TOKEN is the one-click unsubscribe token mailed to ADDRESS for LIST,\n"
                         "  1 if not. Example:\n"
                         "  python -m mailq.delivery.unsubscribe verify dev alice@example.org Zm9v...\n")
        return 2
    ok = verify_token(load_settings(), args[1], args[2], args[3])
    print("valid" if ok else "not valid")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
