"""``mailq-deliver KIND LIST``: the MTA pipe entry point (docs/mail-flow.md "The pipe").

The MTA runs this once per message (``|/path/bin/mailq-deliver post dev`` in its aliases). It
reads the message from stdin and writes it as one entry into the queue for KIND (``in`` for
post/owner, ``commands`` for request/join/leave/confirm, ``bounces`` for bounces), fsync'd, and
exits 0 only after the entry's rename. Every other outcome is a sysexits code the MTA understands:

====  =====================================================================================
 0    queued
 64   usage: wrong arguments (EX_USAGE)
 65   data error: empty message, over ``queue.max_message_size``, a header line over 998
      characters or MIME parts nested over 50 levels (``mailq.mta.mime``) (EX_DATAERR; the
      MTA bounces it with our one-line reason)
 67   no such list (EX_NOUSER; the MTA bounces it: "unknown user")
 75   temporary failure: disk full, filesystem unavailable, lock timeout, config unreadable
      (EX_TEMPFAIL; the MTA keeps the message and tries again, nothing is lost)
====  =====================================================================================

Started as root (an MTA that runs pipes as root), it first switches to the run-as user (config
key ``user:``, mailq/runas.py), so that no queue entry belongs to root.

It runs for every message, so it starts fast: no click, no email package, no lists package, no
YAML when the config has not changed; of ``mailq.queue`` only ``mailq.queue.entry``, which imports
nothing but built-in modules and ``_sha1``, not even the C pickler (``entry.encode_flat``; see its
docstring; ``bench/flow.py --deliver-only`` measures it). The few
settings it needs (the var path, the fsync flag, the size limit, the run-as user) are cached next to
the config file (``.<config name>.deliver-cache``, five text lines), keyed by the
config's path, size, mtime and inode; any mismatch, or a cache it cannot read or write, means the
YAML is parsed as usual. A list exists iff ``var/lists/<name>/list.pck`` exists: one stat; only
when it does not, a second stat of ``var/lists`` tells "no such list" (67) from "var not mounted"
(75).
"""
import os
import sys
import time

from mailq.addresses import QUEUE_FOR_KIND
from mailq.queue import entry

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_TEMPFAIL = 0, 64, 65, 67, 75
USAGE = ("usage: mailq-deliver [-C CONFIG] post|owner|request|bounces|join|leave|confirm LIST\n"
         "  Reads one message on stdin and queues it for LIST; run by the MTA from the aliases that\n"
         "  'mailqctl aliases' prints. Exit codes: 0 queued, 64 usage, 65 empty, too big, a header line\n"
         "  over 998 characters or MIME nested over 50 levels, 67 unknown list,\n"
         "  75 temporary failure (the MTA retries).\n"
         "Examples:\n"
         "  mailq-deliver post dev < message.eml\n"
         "  SENDER=alice@example.org mailq-deliver request dev < command.eml\n"
         "  mailq-deliver -C /etc/mailq/mailq.yaml owner dev < message.eml\n")
CACHE_VERSION = 3
DEFAULT_MAX_SIZE = 100 * 1024 * 1024  # mailq.config.QueueSettings.max_message_size
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Exit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code, self.message = code, message


def main(argv: "list[str] | None" = None) -> None:
    try:
        code = deliver(sys.argv[1:] if argv is None else argv)
    except Exit as exc:
        if exc.message:
            sys.stderr.write(f"mailq-deliver: {exc.message}\n")
        code = exc.code
    except Exception as exc:  # a bug must not bounce mail: the MTA keeps it until someone looks
        import traceback

        traceback.print_exc()
        sys.stderr.write(f"mailq-deliver: internal error ({type(exc).__name__}: {exc}); nothing was queued, "
                         "the MTA will retry\n")
        code = EX_TEMPFAIL
    sys.exit(code)


def deliver(args: "list[str]") -> int:
    if len(args) == 1 and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return EX_OK
    config = None
    if args and args[0] in ("-C", "--config"):
        # MTAs cannot set environment variables per alias, so the config path may come first.
        if len(args) < 2:
            raise Exit(EX_USAGE, f"{args[0]} needs a FILE\n{USAGE.rstrip()}")
        config, args = args[1], args[2:]
    if len(args) != 2:
        raise Exit(EX_USAGE, f"expected KIND and LIST, got {len(args)} argument(s)\n{USAGE.rstrip()}")
    kind, listname = args[0].lower(), args[1].lower()
    queue_name = QUEUE_FOR_KIND.get(kind)
    if queue_name is None:
        raise Exit(EX_USAGE, f"unknown kind {args[0]!r}; expected one of {', '.join(QUEUE_FOR_KIND)}")
    if not _plausible_name(listname):
        raise Exit(EX_NOUSER, f"no such list {args[1]!r} (not a valid list name)")
    # Read the whole message first: an MTA whose pipe write fails may log a confusing error
    # instead of the exit status and the reason.
    var, fsync, limit, user = _settings(config)
    if user and os.geteuid() == 0:
        _become(user)
    msg = _read_message(limit)
    _check_list(var, listname)
    if limit and len(msg) > limit:
        raise Exit(EX_DATAERR, f"message too big for {kind} {listname}: over {limit} bytes "
                               "(queue.max_message_size); nothing queued")
    msg, from_line_sender = _strip_from_line(msg)
    if not msg.strip():
        raise Exit(EX_DATAERR, f"empty message on stdin for {kind} {listname}; nothing queued")
    # Imported here (start-up per message, bench/flow.py --deliver-only): the refusals above exit without it.
    from mailq.mta.mime import mime_problem

    problem = mime_problem(msg)
    if problem:
        raise Exit(EX_DATAERR, f"message for {kind} {listname} refused: {problem}; nothing queued")
    env = os.environ
    metadata = {
        "listname": listname,
        "kind": kind,
        "received": time.time(),
        "via": "pipe",
        # $SENDER set but empty is the null sender of a bounce: keep "" rather than the From_ line's
        # MAILER-DAEMON placeholder.
        "envelope_sender": env["SENDER"] if "SENDER" in env else from_line_sender,
    }
    original = env.get("ORIGINAL_RECIPIENT") or env.get("RECIPIENT")
    if original:
        metadata["original_recipient"] = original
    return _enqueue(var, fsync, queue_name, msg, metadata)


def _read_message(limit: int) -> bytes:
    """Stdin up to *limit* + 1 bytes (0: all); past the limit the rest is read and dropped.

    Draining matters: an MTA whose pipe write fails may report that instead of our exit status.
    """
    stdin = sys.stdin.buffer
    if not limit:
        return stdin.read()
    msg = stdin.read(limit + 1)
    if len(msg) > limit:
        while stdin.read(1 << 20):
            pass
    return msg


def _plausible_name(name: str) -> bool:
    # A stat of var/lists/<name>/ must stay inside var/lists: no separators, no dot files.
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".") and len(name) < 200


def _check_list(var: str, listname: str) -> None:
    try:
        os.stat(os.path.join(var, "lists", listname, "list.pck"))
        return
    except FileNotFoundError:
        pass
    except OSError as exc:  # EIO, ESTALE, EACCES: the filesystem, not the list, is the problem
        raise Exit(EX_TEMPFAIL, f"cannot check list {listname!r} in {var}/lists: {exc.strerror}; "
                                "the MTA will retry")
    # Only now, for an unknown list, one more stat: is this a real var tree? An unmounted NFS mount
    # point is an empty folder, and answering 67 there would bounce every list's mail. var/lists
    # exists on every site with a list (ListStore.create makes it); without it nothing can be
    # known, so the MTA keeps the mail.
    try:
        os.stat(os.path.join(var, "lists"))
    except FileNotFoundError:
        raise Exit(EX_TEMPFAIL, f"{var}/lists is not there: is the mailq var filesystem mounted? (a new "
                                "site: create a list first with 'mailqctl lists create'); the MTA will retry")
    except OSError as exc:
        raise Exit(EX_TEMPFAIL, f"cannot check {var}/lists: {exc.strerror}; the MTA will retry")
    # The MTA bounces this text to the sender: no paths of this server in it.
    raise Exit(EX_NOUSER, f"no such list {listname!r} at this site")


def _strip_from_line(msg: bytes) -> "tuple[bytes, str]":
    """Drop an mbox ``From sender date`` first line (some MTAs prepend one); return its sender."""
    if msg.startswith(b"From "):
        line, _, rest = msg.partition(b"\n")
        words = line.split()
        return rest, (words[1].decode("utf-8", "replace") if len(words) > 1 else "")
    return msg, ""


def _enqueue(var: str, fsync: bool, queue_name: str, msg: bytes, metadata: dict) -> int:
    try:
        entry.enqueue_message(os.path.join(var, "qfiles", queue_name), msg, metadata, fsync=fsync)
    except (OSError, entry.QueueFull) as exc:
        # Disk full, read-only or missing folders, a folder this user may not write: all fixable by
        # an operator, so the MTA keeps the mail and retries (75) rather than bouncing it.  Who we
        # ran as and which path failed is what the operator needs (the MTA may run us as nobody).
        # Imported here: only this failure path needs it (start-up per message).
        from mailq.runas import who

        cause = exc if isinstance(exc, OSError) else exc.__cause__
        reason = getattr(cause, "strerror", None) or exc
        where = getattr(cause, "filename", None) or f"{var}/qfiles/{queue_name}"
        raise Exit(EX_TEMPFAIL, f"cannot queue the message in {var}/qfiles/{queue_name}: {reason}: "
                                f"{where} (running as {who()}); nothing was queued, the MTA will retry")
    return EX_OK


def _become(user: str) -> None:
    """Run as root by the MTA: switch to the run-as user before writing (mailq/runas.py)."""
    # Imported here: only a start as root needs it (start-up per message).
    from mailq.runas import RunAsError, become

    try:
        become(user, "mailq-deliver")
    except RunAsError as exc:
        raise Exit(EX_TEMPFAIL, f"{exc}; nothing was queued, the MTA will retry")


# -- settings: the var path, the fsync flag and the size limit, cached -----------------------------

def _config_path(explicit: "str | None" = None) -> "str | None":
    path = explicit or os.environ.get("MAILQ_CONFIG")
    if path:
        return path
    if not os.path.isfile(os.path.join(_CHECKOUT, "setup.cfg")):   # installed: mailq.config.INSTALLED_CONFIG
        return "/etc/mailq/mailq.yaml"
    default = os.path.join(_CHECKOUT, "etc", "mailq.yaml")
    return default if os.path.exists(default) else None


def _settings(explicit: "str | None" = None) -> "tuple[str, bool, int]":
    """``(var, fsync, max size, run-as user)``: from the cache when the config is unchanged, else YAML."""
    path = _config_path(explicit)
    if path is None:        # a checkout without etc/mailq.yaml: its own var/
        return os.path.join(_CHECKOUT, "var"), True, DEFAULT_MAX_SIZE, ""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Exit(EX_TEMPFAIL, f"cannot read config {path}: {exc.strerror}; fix it (or MAILQ_CONFIG), "
                                "the MTA will retry")
    key = f"{CACHE_VERSION}\0{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    cache = _cache_path(path)
    try:
        with open(cache, encoding="utf-8") as fh:
            cached_key, var, fsync, limit, user = fh.read().split("\n")[:5]
        if cached_key == key and var and fsync in ("0", "1"):
            return var, fsync == "1", int(limit), user
    except (OSError, ValueError, UnicodeDecodeError):
        pass  # no cache, or a stale/broken one: parse the YAML
    try:
        _full_imports()
        # Imported here: only a settings-cache miss parses the YAML, once site-packages is enabled.
        from mailq.config import ConfigError, load_settings

        settings = load_settings(path)
    except ConfigError as exc:
        raise Exit(EX_TEMPFAIL, f"config unusable: {exc}; the MTA will retry once it is fixed")
    var, fsync, limit = str(settings.var), bool(settings.queue.fsync), int(settings.queue.max_message_size)
    user = settings.run_as
    if "\n" not in var and "\n" not in user:
        _write_cache(cache, f"{key}\n{var}\n{int(fsync)}\n{limit}\n{user}\n")
    return var, fsync, limit, user


def _full_imports() -> None:
    """Make site-packages importable (PyYAML, for the config) when Python was started with -S.

    bin/mailq-deliver starts Python with -S: the fast path (a cached config) needs only the standard
    library and mailq, and skipping site saves more than the rest of the start-up costs.
    """
    if sys.flags.no_site:
        import site

        site.main()


def _cache_path(config: str) -> str:
    folder, name = os.path.split(os.path.abspath(config))
    return os.path.join(folder, f".{name}.deliver-cache")


def _write_cache(cache: str, text: str) -> None:
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, cache)  # atomic: a concurrent reader sees the old cache or the new one
    except OSError:
        # A read-only etc/ just means no cache: every delivery parses the YAML.
        try:
            os.unlink(tmp)
        except OSError:
            pass


if __name__ == "__main__":
    main()
