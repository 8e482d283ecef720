"""Settings from ``etc/mailq.yaml``: typed, validated, with defaults that make a checkout work.

The file is read with PyYAML's composer so that every error can name the file, the line and what
was expected.  The schema is the dataclasses below: a key that is not a field is refused (with the
valid keys listed), a value of the wrong type is refused, and a missing key keeps its default.

Where the file is found, first match wins: the ``-C/--config`` option, ``$MAILQ_CONFIG``,
``etc/mailq.yaml`` in the checkout (only when it exists), else built-in defaults.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = CHECKOUT / "etc" / "mailq.yaml"

#: Every queue that runners serve, in the order the master starts them.
RUNNER_QUEUES = ("in", "out", "virgin", "retry", "bounces", "commands", "archive")
#: Queues that hold entries for an operator; no runner serves them.
HOLDING_QUEUES = ("shunt", "bad")
ALL_QUEUES = RUNNER_QUEUES + HOLDING_QUEUES


class ConfigError(Exception):
    """A configuration file that cannot be used: the message names file, line and what was expected."""


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


@dataclass
class NodeSettings:
    name: str = dataclasses.field(default_factory=_short_hostname)


@dataclass
class PathSettings:
    var: Path = CHECKOUT / "var"
    #: Host-local state (master lock, pid file, lease stamp), keyed by node name below it.
    #: Empty means ``<var>/run``; point it at local disk (``/run/mailq``) in production.
    run: str = ""


@dataclass
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 25
    starttls: bool = False
    user: str = ""
    password: str = ""
    timeout: float = 30.0
    #: Recipients per transaction in bulk (non-personalized) delivery.
    chunk_size: int = 500
    #: Deliver straight to the recipients' MX hosts (dnspython) instead of the smarthost.
    direct_mx: bool = False
    #: Name used in HELO/LHLO; empty means the node name.
    helo: str = ""
    #: CA bundle (PEM) that signs the smarthost's STARTTLS certificate; empty: the system CAs.
    ca_file: str = ""
    #: Send smtp.user/password without TLS (only for a trusted link such as loopback); else refused.
    allow_plaintext_auth: bool = False


@dataclass
class LmtpSettings:
    host: str = "127.0.0.1"
    port: int = 8024
    enabled: bool = True


@dataclass
class ClusterSettings:
    failover: Literal["manual", "auto"] = "manual"
    heartbeat: float = 2.0
    lease: float = 10.0
    #: Extra wait past the lease before another node may take a silent node's slices.
    margin: float = 2.0


@dataclass
class QueueSettings:
    fsync: bool = True
    #: A claim recovered this many times goes to ``bad`` instead of back to the queue.
    recovery_limit: int = 3
    #: Temporary files older than this (seconds) are removed by recovery.
    stale_tmp_seconds: float = 3600.0
    #: Largest message (bytes) mail-in takes: mailq-deliver exits 65, LMTP answers 552; 0: no limit.
    max_message_size: int = 100 * 1024 * 1024


@dataclass
class RunnerSettings:
    #: Seconds between directory scans (catches files written by other hosts; inotify does not).
    poll_interval: float = 1.0
    #: Slices per queue when there is no slice map yet.
    slices: dict[str, int] = field(default_factory=lambda: {q: 1 for q in RUNNER_QUEUES})
    #: Restarts of one crashed runner before the master gives up on it.
    restart_cap: int = 10
    #: Longest wait (seconds) between restarts of a crashing runner; the wait doubles from 0.5 s up to this.
    restart_backoff_max: float = 60.0
    #: Seconds a runner waits for the entry in hand when asked to stop.
    stop_timeout: float = 30.0


@dataclass
class DeliverySettings:
    #: First retry delay in seconds; doubles each attempt up to ``retry_max``.
    retry_initial: float = 60.0
    retry_max: float = 3600.0
    #: After this many seconds of temporary failures a recipient is given up and the owner told.
    give_up_after: float = 5 * 86400.0
    #: Address the system uses as sender of its own notices; empty means mailq@<node>.
    site_owner: str = ""


@dataclass
class PipelineSettings:
    posts: list[str] = field(default_factory=lambda: [
        "sanity", "moderation", "subject_prefix", "list_headers", "footer",
        "recipients", "avoid_duplicates", "to_archive", "to_digest", "to_outgoing",
    ])
    owner: list[str] = field(default_factory=lambda: ["sanity", "owner_recipients", "to_outgoing"])
    #: Base HTTPS address of the list web pages, if any: enables the RFC 8058 one-click
    #: ``List-Unsubscribe`` link (``<web_url>/lists/<name>/unsubscribe``) and ``List-Archive``.
    web_url: str = ""
    #: Posts appended to an archive or pending-digest mbox per lock acquisition (archive runner).
    archive_batch: int = 200


@dataclass
class ListsSettings:
    #: Mail domain of new lists when `mailq lists create` gets no --domain; empty means the node name.
    default_domain: str = ""
    #: Seconds a list database writer waits for the list's lock before giving up (exit 75).
    lock_timeout: float = 30.0


@dataclass
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    lmtp: LmtpSettings = field(default_factory=LmtpSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    runners: RunnerSettings = field(default_factory=RunnerSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    log: LogSettings = field(default_factory=LogSettings)
    lists: ListsSettings = field(default_factory=ListsSettings)
    #: The file these settings came from, or None for built-in defaults.
    source: Path | None = None

    # -- derived paths: the shared tree (DESIGN §2) -------------------------------------------
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
        """Host-local state for this node (master lock, pid file, lease stamp)."""
        base = Path(self.paths.run) if self.paths.run else self.var / "run"
        return base / self.node.name

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
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    return None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings from *path* (or the usual places); raise ConfigError naming file and line."""
    chosen = config_path(path)
    if chosen is None:
        return Settings()
    try:
        text = chosen.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{chosen}: no such config file (set -C/--config or MAILQ_CONFIG to an existing file)")
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
    return settings


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
        return Settings()
    return _build(Settings, root, filename, "")


def _where(node: Any, filename: str) -> str:
    return f"{filename}:{node.start_mark.line + 1}"


def _build(cls: type, node: Any, filename: str, prefix: str) -> Any:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(node, filename)}: {prefix or 'top level'}: expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(
                f"{_where(key_node, filename)}: unknown key {dotted!r}; "
                f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(fields))}")
        values[key] = _convert(hints[key], value_node, filename, dotted)
    return cls(**values)


def _convert(hint: Any, node: Any, filename: str, dotted: str) -> Any:
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
        return {_convert(key_t, k, filename, dotted): _convert(val_t, v, filename, f"{dotted}.{k.value}")
                for k, v in node.value}
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
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
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
