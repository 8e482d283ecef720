"""Settings from ``etc/mailq.yaml``: typed, validated, with defaults that make a checkout work.

The file is read with PyYAML's composer so that every error can name the file, the line and what
was expected.  The schema is the dataclasses below: a key that is not a field is refused (with the
valid keys listed), so is a key given twice, a value of the wrong type or out of its range (the
``check`` in a field's metadata), and a missing key keeps its default.  Where text is expected a
number is taken as written (``name: 01`` is ``"01"``); where a number is expected ``1e3`` is
accepted although YAML 1.1 reads it as text.

Where the file is found, first match wins: the ``-C/--config`` option, ``$MAILQ_CONFIG``, then
for an installed package ``/etc/mailq/mailq.yaml`` (an error names it when it is missing:
``mailqctl init`` writes it), for a checkout ``etc/mailq.yaml`` when it exists, else built-in
defaults.

Defaults for the two trees: in a checkout ``paths.var`` is ``var/`` in the checkout and ``paths.run``
is ``<var>/run``.  An installed package (no checkout beside it) has no sensible shared tree of its
own, so without ``paths.var`` it refuses to start; with ``paths.var`` set anywhere but the checkout,
``paths.run`` defaults to host-local ``/run/mailq`` (``/var/run/mailq``), never to the shared tree,
because the master's lock must be a kernel lock on local disk.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mailq.errors import MailqError
from mailq.runas import INSTALLED_DEFAULT

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = CHECKOUT / "etc" / "mailq.yaml"
#: A source checkout (or an editable install) has setup.cfg beside the package; site-packages has not.
IS_CHECKOUT = (CHECKOUT / "setup.cfg").is_file()
#: The default shared tree; compared by identity in load_settings to tell "not set" from "set".
CHECKOUT_VAR = CHECKOUT / "var"
#: The config file of an installed package when neither -C nor MAILQ_CONFIG names one.
INSTALLED_CONFIG = Path("/etc/mailq/mailq.yaml")
#: Host-local folders for paths.run when paths.var is set and paths.run is not, first usable wins.
HOST_LOCAL_RUN = (Path("/run/mailq"), Path("/var/run/mailq"))

#: Every queue that runners serve, in the order the master starts them.
RUNNER_QUEUES = ("in", "out", "virgin", "retry", "bounces", "commands", "archive")
#: Queues that hold entries for an operator; no runner serves them.
HOLDING_QUEUES = ("shunt", "bad")
ALL_QUEUES = RUNNER_QUEUES + HOLDING_QUEUES


class ConfigError(MailqError):
    """A configuration file that cannot be used: the message names file, line and what was expected."""


# -- value checks: a field's metadata["check"](value) returns what was expected, or None -----------

def _limited(default: Any, *, at_least: float | None = None, above: float | None = None,
             at_most: float | None = None) -> Any:
    """A numeric field with a range, checked when the file is read."""
    def check(value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return "a finite number"
        if (at_least is not None and value < at_least) or (above is not None and value <= above) \
                or (at_most is not None and value > at_most):
            parts = [f">= {at_least:g}" if at_least is not None else "", f"> {above:g}" if above is not None else "",
                     f"<= {at_most:g}" if at_most is not None else ""]
            return "a number " + " and ".join(p for p in parts if p)
        return None
    return field(default=default, metadata={"check": check})


#: Node names end up in file names on the shared tree (claims, heartbeats, log folders).
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def node_name_problem(name: str) -> str | None:
    """What a node name must look like, or None when *name* is one."""
    if NODE_NAME_RE.fullmatch(name):
        return None
    return ("a node name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it becomes part of file names on the shared tree)")


def _slices_problem(queue: str, count: int) -> str | None:
    if queue not in RUNNER_QUEUES:
        return f"a runner queue ({', '.join(RUNNER_QUEUES)}) as key"
    if count < 1:
        return "a slice count >= 1"
    return None


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


@dataclass
class NodeSettings:
    name: str = dataclasses.field(default_factory=_short_hostname, metadata={"check": node_name_problem})


@dataclass
class PathSettings:
    #: The shared tree (NFS in a cluster).  Default: var/ in the checkout; an installed package
    #: has no default and refuses to start without it (load_settings).
    var: Path = CHECKOUT_VAR
    #: Host-local state (master lock, pid file, lease stamp), keyed by node name below it.
    #: Empty means ``<var>/run`` in a checkout, else host-local ``/run/mailq`` (Settings.run_dir).
    run: str = ""


@functools.lru_cache(maxsize=4)
def host_local_run(candidates: tuple[Path, ...] = HOST_LOCAL_RUN) -> Path:
    """The first of *candidates* that exists as a folder or can be made (its parent is writable).

    Only the success is cached: a folder made later (systemd's RuntimeDirectory) is found then.
    """
    for path in candidates:
        if path.is_dir() or (path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)):
            return path
    raise ConfigError(
        f"paths.run is not set and none of {', '.join(map(str, candidates))} exists or can be made by "
        f"this user: set paths.run to a host-local folder this user can write (not on the shared tree: "
        f"the master's lock must be on local disk), or create /run/mailq owned by the mailq user "
        f"(systemd: RuntimeDirectory=mailq)")


@dataclass
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = _limited(25, at_least=1, at_most=65535)
    starttls: bool = False
    user: str = ""
    password: str = ""
    timeout: float = _limited(30.0, above=0)
    #: Recipients per transaction in bulk (non-personalized) delivery.
    chunk_size: int = _limited(500, at_least=1)
    #: SMTP sessions one out runner uses at once for one entry's chunks or personalized copies
    #: (docs/mail-flow.md "Several sessions"); 1 sends everything over one connection.
    connections: int = _limited(4, at_least=1, at_most=64)
    #: Transactions between two checkpoints of an out entry's progress (docs/mail-flow.md
    #: "Checkpoints"): a killed out runner's successor resends at most this many (plus the
    #: transactions of the other sessions in flight).  0: no checkpoints, a crash resends the entry.
    checkpoint_every: int = _limited(100, at_least=0)
    #: Direct MX only: transactions in flight at once towards one recipient domain.
    sessions_per_destination: int = _limited(2, at_least=1, at_most=64)
    #: Deliver straight to the recipients' MX hosts (dnspython) instead of the smarthost.
    direct_mx: bool = False
    #: Name used in HELO/LHLO; empty means the node name.
    helo: str = ""
    #: CA bundle (PEM) that signs the smarthost's STARTTLS certificate; empty: the system CAs.
    ca_file: str = ""
    #: Send smtp.user/password without TLS (only for a trusted link such as loopback); else refused.
    allow_plaintext_auth: bool = False


def _networks_problem(values: list[str]) -> str | None:
    """``lmtp.allow``: addresses or networks in CIDR notation."""
    import ipaddress

    for value in values:
        try:
            ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            return f"IP addresses or networks such as 127.0.0.1 or 192.0.2.0/24 (not {value!r})"
    return None


def _nameserver_problem(value: list[str]) -> str | None:
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_address(item)
        except ValueError:
            return f"a list of IP addresses (an IPv4 or IPv6 address, not a host name: {item!r})"
    return None


@dataclass
class DnsSettings:
    """Every DNS lookup mailq makes (DMARC policies, direct MX delivery) asks these servers."""

    #: Resolvers to ask (IP addresses); empty: the host's /etc/resolv.conf.
    nameservers: list[str] = field(default_factory=list, metadata={"check": _nameserver_problem})
    port: int = _limited(53, at_least=1, at_most=65535)
    #: Seconds one lookup may take in all (every server and retry); then it has failed.
    timeout: float = _limited(5.0, above=0)
    #: Longest time (seconds) a DMARC answer is kept in the shared cache, whatever its TTL.
    cache_max_ttl: float = _limited(86400.0, above=0)
    #: Shortest time (seconds) an answer is kept: a TTL of 0 must not mean one lookup per post.
    cache_min_ttl: float = _limited(60.0, at_least=0)
    #: How long "no record" is kept when the server sent no SOA to take the negative TTL from.
    negative_ttl: float = _limited(3600.0, above=0)
    #: How long a failed lookup (timeout, SERVFAIL) counts as "no policy" before it is tried again.
    failure_ttl: float = _limited(300.0, above=0)
    #: Most answers the shared DMARC cache keeps (oldest dropped first): strangers cannot fill the disk.
    cache_max_entries: int = _limited(20000, at_least=256)


@dataclass
class LmtpSettings:
    host: str = "127.0.0.1"
    port: int = _limited(8024, at_least=1, at_most=65535)
    enabled: bool = True
    #: RCPT TO accepted per transaction; more are answered 452 (the client sends them in another one).
    max_recipients: int = _limited(100, at_least=1)
    #: Open connections at once; one more is answered 421 and closed.
    max_connections: int = _limited(20, at_least=1)
    #: Seconds a connection may sit waiting for the client's next command before it is closed (421).
    timeout: float = _limited(300.0, above=0)
    #: Seconds the client may take to send one message after DATA (421 and closed past that).
    data_timeout: float = _limited(600.0, above=0)
    #: Client addresses or networks (CIDR) that may connect; others get 554 at the greeting.
    allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"],
                             metadata={"check": _networks_problem})


@dataclass
class ClusterSettings:
    failover: Literal["manual", "auto"] = "manual"
    heartbeat: float = _limited(2.0, above=0)
    lease: float = _limited(10.0, above=0)
    #: Extra wait past the lease before another node may take a silent node's slices.
    margin: float = _limited(2.0, at_least=0)


@dataclass
class QueueSettings:
    fsync: bool = True
    #: A claim recovered this many times goes to ``bad`` instead of back to the queue.
    recovery_limit: int = _limited(3, at_least=0)
    #: Temporary files older than this (seconds) are removed by recovery.
    stale_tmp_seconds: float = _limited(3600.0, above=0)
    #: Largest message (bytes) mail-in takes: mailq-deliver exits 65, LMTP answers 552; 0: no limit.
    max_message_size: int = _limited(100 * 1024 * 1024, at_least=0)
    #: A claim held longer than this (seconds) is flagged by `queue count` and `cluster status`.
    claim_warn_after: float = _limited(900.0, above=0)


@dataclass
class RunnerSettings:
    #: Seconds between directory scans (catches files written by other hosts; inotify does not).
    poll_interval: float = _limited(1.0, above=0)
    #: Slices per queue when there is no slice map yet.
    slices: dict[str, int] = field(default_factory=lambda: {q: 1 for q in RUNNER_QUEUES},
                                   metadata={"item_check": _slices_problem})
    #: Restarts of one crashed runner before the master gives up on it.
    restart_cap: int = _limited(10, at_least=0)
    #: Longest wait (seconds) between restarts of a crashing runner; the wait doubles from 0.5 s up to this.
    restart_backoff_max: float = _limited(60.0, above=0)
    #: Seconds a runner waits for the entry in hand when asked to stop.
    stop_timeout: float = _limited(30.0, at_least=0)
    #: Seconds before an entry whose processing failed temporarily (disk full, a lock) is tried again.
    retry_delay: float = _limited(30.0, above=0)


@dataclass
class DeliverySettings:
    #: First retry delay in seconds; doubles each attempt up to ``retry_max``.
    retry_initial: float = _limited(60.0, above=0)
    retry_max: float = _limited(3600.0, above=0)
    #: After this many seconds of temporary failures a recipient is given up and the owner told.
    give_up_after: float = _limited(5 * 86400.0, above=0)
    #: Address the system uses as sender of its own notices; empty means mailq@<node>.
    site_owner: str = ""


def _ban_problem(value: list[str]) -> str | None:
    """Each entry of a ban list is an address, or a regular expression starting with ``^``."""
    for item in value:
        if item.startswith("^"):
            try:
                re.compile(item, re.IGNORECASE)
            except re.error as exc:
                return f"valid regular expressions after '^' ({item!r}: {exc})"
        elif "@" not in item:
            return f"e-mail addresses or '^regex' entries (not {item!r})"
    return None


@dataclass
class PipelineSettings:
    posts: list[str] = field(default_factory=lambda: [
        "sanity", "sender_rules", "dmarc", "moderation", "mime_filter", "post_number", "subject_prefix",
        "list_headers", "footer", "recipients", "avoid_duplicates", "to_archive", "to_digest",
        "to_outgoing",
    ])
    owner: list[str] = field(default_factory=lambda: ["sanity", "owner_recipients", "to_outgoing"])
    #: Base HTTPS address of the list web pages, if any: ``List-Archive`` and, in personalized
    #: delivery, a per-recipient RFC 8058 one-click link (docs/mail-flow.md, "One-click unsubscribe").
    web_url: str = ""
    #: Posts appended to an archive or pending-digest mbox per lock acquisition (archive runner).
    archive_batch: int = _limited(200, at_least=1)
    #: Posts the ``in`` runner claims at once when there is a backlog: their post numbers are
    #: taken in one lock cycle per list (``mailq.lists.numbers.take_many``, docs/digests.md).
    in_batch: int = _limited(20, at_least=1, at_most=500)
    #: Site-wide ban list for posts to every list (``sender_rules``): addresses, or ``^regex``.
    ban_list: list[str] = field(default_factory=list, metadata={"check": _ban_problem})


@dataclass
class ListsSettings:
    #: Mail domain of new lists when `mailqctl lists create` gets no --domain; empty means the node name.
    default_domain: str = ""
    #: Seconds a list database writer waits for the list's lock before giving up (exit 75).
    lock_timeout: float = _limited(30.0, at_least=0)


@dataclass
class MetricsSettings:
    #: The master serves Prometheus ``/metrics`` on this port; 0: not served (``mailqctl metrics`` works anyway).
    port: int = _limited(0, at_least=0, at_most=65535)
    #: Address it binds: loopback by default (a node_exporter or Prometheus on this host scrapes it).
    host: str = "127.0.0.1"


@dataclass
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    lmtp: LmtpSettings = field(default_factory=LmtpSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    runners: RunnerSettings = field(default_factory=RunnerSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    log: LogSettings = field(default_factory=LogSettings)
    lists: ListsSettings = field(default_factory=ListsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    #: The run-as user: commands started as root switch to it before touching the shared tree
    #: (mailq/runas.py).  Empty: ``mailq`` for an installed package, the invoking user in a checkout.
    user: str = ""
    #: The file these settings came from, or None for built-in defaults.
    source: Path | None = None

    # -- derived paths: the shared tree (docs/design.md §2) -------------------------------------------
    @property
    def var(self) -> Path:
        return self.paths.var

    @property
    def qfiles(self) -> Path:
        return self.var / "qfiles"

    def queue_dir(self, queue: str) -> Path:
        return self.qfiles / queue

    @property
    def lists_dir(self) -> Path:
        return self.var / "lists"

    @property
    def archives_dir(self) -> Path:
        return self.var / "archives"

    @property
    def cluster_dir(self) -> Path:
        return self.var / "cluster"

    @property
    def slice_map_path(self) -> Path:
        return self.cluster_dir / "slices.yaml"

    @property
    def locks_dir(self) -> Path:
        return self.var / "locks"

    @property
    def log_dir(self) -> Path:
        """This node's log folder: ``var/log/<node>/``."""
        return self.var / "log" / self.node.name

    @property
    def run_dir(self) -> Path:
        """Host-local state for this node (master lock, pid file, lease stamp): ``<paths.run>/<run_key>``.

        ``paths.run`` if set; else ``<var>/run`` while var is the checkout's own (a checkout is one
        host); else host-local ``/run/mailq`` (ConfigError, a MailqError, when it cannot be used).
        """
        if self.paths.run:
            base = Path(self.paths.run)
        elif self.paths.var == CHECKOUT_VAR:
            base = self.var / "run"
        else:
            base = host_local_run()
        return base / self.run_key

    @property
    def run_key(self) -> str:
        """``<node>@<8 hex digits of the var path's SHA-1>``: this node's folder name under ``paths.run``.

        Keyed by the shared tree as well as the node name, so that two sites on one host that use
        the same node name (different ``paths.var``, same ``paths.run``) never share a master lock,
        pid file or lease, and ``mailqctl stop`` of one never signals the other's master.
        """
        import hashlib

        digest = hashlib.sha1(os.fsencode(os.path.abspath(self.var))).hexdigest()[:8]
        return f"{self.node.name}@{digest}"

    @property
    def run_as(self) -> str:
        """The user root switches to (``user:``, else the installed default); "" means no switch."""
        return self.user or ("" if IS_CHECKOUT else INSTALLED_DEFAULT)

    @property
    def site_owner(self) -> str:
        return self.delivery.site_owner or f"mailq@{self.node.name}"

    def slice_count(self, queue: str) -> int:
        return self.runners.slices.get(queue, 1)


# -- loading --------------------------------------------------------------------------------------

def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read, or None for built-in defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("MAILQ_CONFIG")
    if env:
        return Path(env)
    if not IS_CHECKOUT:
        return INSTALLED_CONFIG
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    return None


def share_dir() -> Path:
    """Where the sample config (``etc/``) and the docs (``docs/``) are: the checkout, or what the
    wheel installed under ``<prefix>/share/mailq`` (setup.cfg ``data_files``)."""
    if IS_CHECKOUT:
        return CHECKOUT
    import sys
    import sysconfig

    candidates = [Path(sysconfig.get_path("data")) / "share" / "mailq", Path(sys.prefix) / "share" / "mailq",
                  Path("/usr/local/share/mailq"), Path("/usr/share/mailq")]
    return next((c for c in candidates if (c / "etc" / "mailq.yaml").exists()), candidates[0])


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings from *path* (or the usual places); raise ConfigError naming file and line."""
    chosen = config_path(path)
    if chosen is None:
        return _require_var(Settings(), None)
    try:
        text = chosen.read_text(encoding="utf-8")
    except FileNotFoundError:
        made_by = " or create it with `mailqctl init`" if chosen == INSTALLED_CONFIG else ""
        raise ConfigError(f"{chosen}: no such config file (set -C/--config or MAILQ_CONFIG to an existing "
                          f"file{made_by}; sample: {share_dir() / 'etc' / 'mailq.yaml'})")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{chosen}: cannot read config file: {exc}")
    settings = parse_settings(text, str(chosen))
    settings.source = chosen
    # Relative paths are relative to the checkout for etc/mailq.yaml, else to the file's folder; a
    # daemon runs from "/", so they are made absolute here once.
    anchor = chosen.parent.parent if chosen.parent.name == "etc" else chosen.parent
    if not settings.paths.var.is_absolute():
        settings.paths.var = (anchor / settings.paths.var).resolve()
    if settings.paths.run and not Path(settings.paths.run).is_absolute():
        settings.paths.run = str((anchor / settings.paths.run).resolve())
    return _require_var(settings, chosen)


def _require_var(settings: Settings, source: Path | None) -> Settings:
    """Refuse an installed package's default var (``site-packages/var``): nobody means that tree."""
    if settings.paths.var is not CHECKOUT_VAR or IS_CHECKOUT:
        return settings
    where = f"{source}: paths.var is not set" if source else "no config file found and paths.var is not set"
    raise ConfigError(
        f"{where}; mailq is installed as a package ({CHECKOUT}), not run from a checkout, so there is no "
        f"var/ beside it. Set paths.var to the shared tree (the NFS mount in a cluster, e.g. /srv/mailq/var) "
        f"in the config file{'' if source else ' and point -C/--config or MAILQ_CONFIG at it'} "
        f"(`mailqctl init --var PATH` writes one); the commented sample is {share_dir() / 'etc' / 'mailq.yaml'}.")


def parse_settings(text: str, filename: str = "<config>") -> Settings:
    import yaml  # deferred: mailq-deliver with no config file never pays for it

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}")
    if root is None:
        settings = Settings()
    else:
        settings = _build(Settings, root, filename, "")
    if not _given(root, "node", "name"):
        problem = node_name_problem(settings.node.name)
        if problem:     # the host name default: there is no line to point at
            raise ConfigError(f"{filename}: node.name is not set and the host name {settings.node.name!r} "
                              f"is not {problem}; set node.name")
    return settings


def _given(root: Any, *keys: str) -> bool:
    """Whether the YAML tree sets the dotted key *keys* (``_given(root, "node", "name")``)."""
    import yaml

    node = root
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return False
        node = next((v for k, v in node.value if k.value == key), None)
        if node is None:
            return False
    return True


def _where(node: Any, filename: str) -> str:
    return f"{filename}:{node.start_mark.line + 1}"


def _build(cls: type, node: Any, filename: str, prefix: str) -> Any:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(node, filename)}: {prefix or 'top level'}: expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(
                f"{_where(key_node, filename)}: unknown key {dotted!r}; "
                f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(fields))}")
        _refuse_duplicate(seen, key_node, filename, dotted)
        meta = fields[key].metadata
        values[key] = _convert(hints[key], value_node, filename, dotted, meta.get("item_check"))
        problem = meta["check"](values[key]) if "check" in meta else None
        if problem:
            raise ConfigError(f"{_where(value_node, filename)}: {dotted}: expected {problem}, got {values[key]!r}")
    return cls(**values)


def _refuse_duplicate(seen: dict[str, Any], key_node: Any, filename: str, dotted: str) -> None:
    """YAML would silently keep the last of two equal keys; a config file must not."""
    first = seen.setdefault(key_node.value, key_node)
    if first is not key_node:
        raise ConfigError(f"{_where(key_node, filename)}: {dotted}: key given twice (first on line "
                          f"{first.start_mark.line + 1}); expected each key once, remove one")


#: Plain scalars YAML 1.1 leaves as text although they are decimal numbers: 1e3, 2.5E-1, 1.5e3.
_EXPONENT_FLOAT_RE = re.compile(r"[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+")


def _convert(hint: Any, node: Any, filename: str, dotted: str, item_check: Any = None) -> Any:
    import yaml

    where = _where(node, filename)
    if dataclasses.is_dataclass(hint):
        return _build(hint, node, filename, dotted)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        value = _scalar(node)
        if value not in choices:
            raise ConfigError(f"{where}: {dotted}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(f"{where}: {dotted}: expected a list")
        return [_convert(item, child, filename, f"{dotted}[{i}]") for i, child in enumerate(node.value)]
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{where}: {dotted}: expected a mapping")
        out, seen = {}, {}
        for k, v in node.value:
            _refuse_duplicate(seen, k, filename, f"{dotted}.{k.value}")
            key, value = _convert(key_t, k, filename, dotted), _convert(val_t, v, filename, f"{dotted}.{k.value}")
            problem = item_check(key, value) if item_check else None
            if problem:
                raise ConfigError(f"{_where(k, filename)}: {dotted}.{k.value}: expected {problem}, "
                                  f"got {k.value}: {v.value}")
            out[key] = value
        return out
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: {dotted}: unsupported type")  # no optional fields in the schema
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{where}: {dotted}: expected a single value ({_type_name(hint)})")
    value = _scalar(node)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and node.style is None and _EXPONENT_FLOAT_RE.fullmatch(value):
            return float(value.replace("_", ""))
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return node.value       # as written: 01 stays "01", 1.10 stays "1.10"
    elif hint is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
    raise ConfigError(f"{where}: {dotted}: expected {_type_name(hint)}, got {value!r}")


def _scalar(node: Any) -> Any:
    import yaml

    return yaml.SafeLoader(" ").construct_object(node) if node.tag else node.value


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            Path: "a path"}.get(hint, str(hint))
