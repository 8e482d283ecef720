"""Per-list settings: one typed dataclass, validated on every change (issue 3).

Settings are stored in the list database as a plain dict (field -> builtin value).  Three ways in,
all through the same validation: ``from_dict`` (the pickle, or ``mailqctl config load`` YAML, strict
types), ``set_text`` (``mailqctl config set KEY=VALUE``, values parsed from text), and attribute
assignment followed by ``validate()``.  An unknown key names the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mailq.errors import InvalidInput
from mailq.lists.validate import validate_address, validate_domain

ReplyTo = Literal["poster", "list", "explicit"]
NonmemberAction = Literal["hold", "reject", "discard", "accept"]
SubscribePolicy = Literal["open", "confirm", "approve", "confirm_and_approve"]
UnsubscribePolicy = Literal["confirm", "open"]
RosterVisibility = Literal["owners", "members", "public"]
DigestFrequency = Literal["daily", "weekly", "monthly"]
VolumeFrequency = Literal["never", "yearly", "monthly"]
DmarcAction = Literal["no_mitigation", "munge_from", "wrap_message", "reject", "discard"]
FilterAction = Literal["discard", "reject", "forward_to_owner", "preserve"]
#: What a ``header_matches`` rule does with a post whose header matches.
HEADER_ACTIONS = ("hold", "reject", "discard", "accept")


@dataclass
class ListSettings:
    display_name: str = ""
    description: str = ""
    #: The mail domain: the list posts as ``name@domain``.
    domain: str = "localhost"
    owners: list[str] = field(default_factory=list)
    moderators: list[str] = field(default_factory=list)
    #: Shared secret for ``Approved:`` headers; empty disables it.
    moderator_password: str = ""
    #: Added to subjects; ``%d`` is replaced with the post number. Empty: none.
    subject_prefix: str = ""
    reply_to: ReplyTo = "poster"
    #: Used when reply_to is ``explicit``.
    reply_to_address: str = ""
    #: Posts larger than this are held; 0 means no limit.
    max_message_kb: int = 40
    #: New members start moderated.
    default_member_moderation: bool = False
    #: What happens to posts from addresses that are not members.
    nonmember_action: NonmemberAction = "hold"
    #: Non-member addresses whose posts are accepted anyway.
    accept_nonmembers: list[str] = field(default_factory=list)
    #: Hold every post (an emergency brake).
    emergency: bool = False
    archive: bool = True
    #: The archive is for members only: posts carry no List-Archive header pointing at it.
    archive_private: bool = False
    #: Posts are collected for digest members (docs/digests.md); off: digest members get nothing.
    digest_enabled: bool = True
    #: A digest is sent once the pending digest grows past this size; 0: only by digest_frequency.
    digest_size_kb: int = 30
    #: A digest with pending posts is sent by cron (send-digests) once this long after the last one.
    digest_frequency: DigestFrequency = "daily"
    #: The digest volume number rises (and the issue number starts again at 1) this often.
    digest_volume_frequency: VolumeFrequency = "yearly"
    #: Text at the top of each digest ($placeholders as in templates); empty: the digest_header template.
    digest_header: str = ""
    #: Text at the end of each digest; empty: the digest_footer template.
    digest_footer: str = ""
    #: One SMTP transaction per recipient with a VERP envelope sender.
    personalize: bool = False
    footer: str = ""
    #: Tell the poster when their post is held.
    send_hold_ack: bool = True
    #: Tell the owners when a post is held.
    notify_owners_on_hold: bool = True
    #: Held messages older than this are discarded by cron; 0 keeps them forever.
    max_held_days: int = 14
    subscribe_policy: SubscribePolicy = "confirm"
    send_welcome: bool = True
    welcome_text: str = ""
    #: A member whose bounce score reaches this is disabled.
    bounce_score_threshold: float = 5.0
    #: Bounce information older than this is forgotten (score reset).
    bounce_info_stale_after_days: int = 7
    #: Warnings sent to a member disabled by bounces before they are removed.
    bounce_disabled_warnings: int = 3
    bounce_disabled_warnings_interval_days: int = 7
    #: Tell the owners when a member's delivery is disabled by bounces.
    bounce_notify_owner_on_disable: bool = True
    #: Tell the owners when a member is removed after the last bounce warning.
    bounce_notify_owner_on_removal: bool = True
    #: Forward mail to -bounces that is not a bounce (a person, an autoresponder) to the owners; false drops it.
    forward_unrecognized_bounces: bool = True
    #: Recipients allowed in To/Cc of a post before it is held; 0 means no limit.
    max_recipients: int = 10
    #: Listed by ``mailqctl lists list --advertised`` and in the -request ``lists`` answer.
    advertised: bool = True
    #: Unsubscribing by mail needs the member's confirmation (``confirm``) or not (``open``).
    unsubscribe_policy: UnsubscribePolicy = "confirm"
    #: Tell a member goodbye when they leave (``goodbye_text`` added to the ``goodbye`` template).
    send_goodbye: bool = True
    goodbye_text: str = ""
    #: Days a confirmation token or an owner-approval request stays valid.
    pending_confirm_days: int = 3
    #: Who may get the member list with the ``who`` command: owners, members, or anyone.
    roster_visibility: RosterVisibility = "owners"
    #: Automatic replies (command replies, help, confirmations) to one address per day; 0: no limit.
    max_autoresponses_per_day: int = 10
    #: The list's web page, for the ``$web_url`` placeholder of templates; empty: none.
    web_url: str = ""
    # -- stage dmarc (docs/pipeline.md) --
    #: What to do with a post whose From: domain publishes DMARC p=reject or p=quarantine.
    dmarc_mitigate_action: DmarcAction = "munge_from"
    #: Apply munge_from / wrap_message to every post, whatever its domain's policy (even none).
    dmarc_mitigate_unconditionally: bool = False
    #: The reason given to the poster when dmarc_mitigate_action is reject; empty: a standard text.
    dmarc_moderation_notice: str = ""
    # -- stage mime_filter --
    #: Remove the parts the filter settings below name; off: posts pass unchanged.
    filter_content: bool = False
    #: MIME types (``image/gif``) or main types (``image``) removed from posts.
    filter_types: list[str] = field(default_factory=list)
    #: When not empty, only these types (and multipart containers) are kept.
    pass_types: list[str] = field(default_factory=list)
    #: File name extensions removed from posts (without the dot).
    filter_extensions: list[str] = field(default_factory=lambda: [
        "exe", "bat", "cmd", "com", "pif", "scr", "vbs", "cpl"])
    #: When not empty, only attachments with these extensions are kept.
    pass_extensions: list[str] = field(default_factory=list)
    #: A multipart/alternative becomes its first (plainest) remaining part.
    collapse_alternatives: bool = True
    #: text/html parts become text/plain (html2text).
    convert_html_to_plaintext: bool = True
    #: What happens to a post that the filter leaves empty.
    filter_action: FilterAction = "discard"
    # -- stage sender_rules --
    #: Senders whose posts are discarded: addresses, or regular expressions starting with ``^``.
    ban_list: list[str] = field(default_factory=list)
    #: Rules ``{header, pattern, action}``: a post whose header matches the regular expression is
    #: held, rejected, discarded or accepted (the first matching rule decides).
    header_matches: list[dict[str, str]] = field(default_factory=list)
    #: Hold posts that look like a command (``unsubscribe``) meant for the -request address.
    administrivia: bool = True
    #: Hold posts that do not name the list (or an acceptable alias) in To or Cc.
    require_explicit_destination: bool = True
    #: Other addresses (or ``^regex``) that count as the list's for require_explicit_destination.
    acceptable_aliases: list[str] = field(default_factory=list)

    # -- conversion ----------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> ListSettings:
        """Build from a dict; unknown keys are an error when *strict* (else ignored: older databases)."""
        settings = cls()
        for key, value in data.items():
            if key not in _HINTS:
                if strict:
                    raise InvalidInput(unknown_key_message(key))
                continue
            setattr(settings, key, _check_type(key, value))
        settings.validate()
        return settings

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(self).items()}

    def set_text(self, key: str, text: str) -> None:
        """``config set KEY=VALUE``: parse *text* for *key*'s type and validate."""
        if key not in _HINTS:
            raise InvalidInput(unknown_key_message(key))
        value = parse_text(key, text)
        old = getattr(self, key)
        setattr(self, key, value)
        try:
            self.validate()
        except InvalidInput:
            setattr(self, key, old)
            raise

    def validate(self) -> None:
        """Check values beyond their types (addresses, ranges); raise InvalidInput naming the key."""
        self.domain = validate_domain(self.domain)
        for key in ("owners", "moderators", "accept_nonmembers"):
            for addr in getattr(self, key):
                try:
                    validate_address(addr)
                except InvalidInput as exc:
                    raise InvalidInput(f"{key}: {exc}") from None
        if self.reply_to_address:
            try:
                validate_address(self.reply_to_address)
            except InvalidInput as exc:
                raise InvalidInput(f"reply_to_address: {exc}") from None
        if self.reply_to == "explicit" and not self.reply_to_address:
            raise InvalidInput("reply_to is 'explicit' but reply_to_address is empty; set both, e.g. "
                               "'mailqctl config set LIST reply_to=explicit reply_to_address=ADDR'")
        for key in ("filter_types", "pass_types"):
            setattr(self, key, [_mime_type(key, v) for v in getattr(self, key)])
        for key in ("filter_extensions", "pass_extensions"):
            setattr(self, key, [_extension(key, v) for v in getattr(self, key)])
        for key in ("ban_list", "acceptable_aliases"):
            for item in getattr(self, key):
                address_or_regex(key, item)
        self.header_matches = [_header_rule(i, rule) for i, rule in enumerate(self.header_matches)]
        for key, hint in _HINTS.items():
            if hint is float and not math.isfinite(getattr(self, key)):
                # nan compares false with everything: a nan threshold would silently never trigger
                raise InvalidInput(f"{key} must be a finite number (got {getattr(self, key)}); "
                                   f"give a plain number such as 5 or 2.5")
            if hint in (int, float) and getattr(self, key) < 0:
                raise InvalidInput(f"{key} must not be negative (got {getattr(self, key)})")


_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*(/[a-z0-9][a-z0-9!#$&^_.+-]*)?\Z")
_EXT_RE = re.compile(r"[a-z0-9][a-z0-9_+~-]{0,31}\Z")
_HEADER_NAME_RE = re.compile(r"[!-9;-~]{1,76}\Z")


def _mime_type(key: str, value: str) -> str:
    low = value.strip().lower()
    if not _TYPE_RE.match(low):
        raise InvalidInput(f"{key}: {value!r} is not a MIME type (image/gif) or main type (image)")
    return low


def _extension(key: str, value: str) -> str:
    low = value.strip().lower().lstrip(".")
    if not _EXT_RE.match(low):
        raise InvalidInput(f"{key}: {value!r} is not a file name extension (exe, pdf, tar.gz is gz)")
    return low


def address_or_regex(key: str, item: str) -> None:
    """An entry of a ban list or alias list: ``^regex`` (compiled here) or an e-mail address."""
    if item.startswith("^"):
        try:
            re.compile(item, re.IGNORECASE)
        except re.error as exc:
            raise InvalidInput(f"{key}: {item!r} is not a valid regular expression: {exc}") from None
        return
    try:
        validate_address(item)
    except InvalidInput as exc:
        raise InvalidInput(f"{key}: {exc} (or give a regular expression starting with '^')") from None


def address_rule_match(entries: list[str], address: str) -> str | None:
    """The first entry of *entries* (addresses, or ``^regex``) that matches *address*, else None.

    Addresses compare case-insensitively; a regular expression is searched in the address with
    IGNORECASE (anchor it with ``$`` to match the whole address).  An entry that does not compile
    (from an older database) matches nothing.
    """
    low = address.strip().lower()
    if not low:
        return None
    for entry in entries:
        if entry.startswith("^"):
            try:
                if re.search(entry, low, re.IGNORECASE):
                    return entry
            except re.error:
                continue
        elif entry.strip().lower() == low:
            return entry
    return None


def _header_rule(index: int, rule: Any) -> dict[str, str]:
    where = f"header_matches[{index}]"
    if not isinstance(rule, dict) or not {"header", "pattern"} <= rule.keys() \
            or not rule.keys() <= {"header", "pattern", "action"}:
        raise InvalidInput(f"{where}: expected {{header: NAME, pattern: REGEX, action: "
                           f"{'|'.join(HEADER_ACTIONS)}}}, got {rule!r}")
    header, pattern = str(rule["header"]).strip(), str(rule["pattern"])
    action = str(rule.get("action", "hold")).strip().lower()
    if not _HEADER_NAME_RE.match(header):
        raise InvalidInput(f"{where}: {header!r} is not a header name")
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise InvalidInput(f"{where}: pattern {pattern!r} is not a valid regular expression: {exc}") from None
    if action not in HEADER_ACTIONS:
        raise InvalidInput(f"{where}: action {action!r} is not one of {', '.join(HEADER_ACTIONS)}")
    return {"header": header, "pattern": pattern, "action": action}


_HINTS: dict[str, Any] = typing.get_type_hints(ListSettings)
#: What each list setting holds, for messages and ``config show`` (lists of text unless named here).
_LIST_KINDS = {"owners": "list of addresses", "moderators": "list of addresses",
               "accept_nonmembers": "list of addresses",
               "ban_list": "list of addresses or ^regex", "acceptable_aliases": "list of addresses or ^regex",
               "filter_types": "list of MIME types", "pass_types": "list of MIME types",
               "filter_extensions": "list of extensions", "pass_extensions": "list of extensions",
               "header_matches": "YAML list of {header, pattern, action}"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(_HINTS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown list setting {key!r}; {hint}valid keys: {', '.join(sorted(_HINTS))}"


def describe_type(key: str) -> str:
    hint = _HINTS[key]
    if typing.get_origin(hint) is Literal:
        return "one of " + "|".join(typing.get_args(hint))
    return {bool: "true|false", int: "whole number", float: "number", str: "text"}.get(
        hint, _LIST_KINDS.get(key, "list of text"))


def _check_type(key: str, value: Any) -> Any:
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    bad = InvalidInput(f"{key}: expected {describe_type(key)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise bad
        return value
    if origin is list and typing.get_args(hint) == (dict[str, str],):
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
                for v in value):
            raise bad
        return [dict(v) for v in value]
    if origin is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad
        return [v.strip() for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad
        return float(value)
    if not isinstance(value, str):
        raise bad
    return value


def parse_text(key: str, text: str) -> Any:
    """Turn command-line text into a value of *key*'s type (raising InvalidInput with the expected form)."""
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    stripped = text.strip()
    bad = InvalidInput(f"{key}: expected {describe_type(key)}, got {text!r}")
    if origin is list:
        if stripped.startswith("[") or typing.get_args(hint) == (dict[str, str],):
            import yaml
            try:
                # Rules are text through and through: a pattern YES or 1 must not become true or 1.
                value = (yaml.load(stripped, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds only str/list/dict
                         if typing.get_args(hint) == (dict[str, str],) else yaml.safe_load(stripped))
            except yaml.YAMLError:
                raise bad from None
            return _check_type(key, value)
        return [item.strip() for item in stripped.split(",") if item.strip()]
    if hint is bool:
        low = stripped.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad
    if hint is int:
        try:
            return int(stripped)
        except ValueError:
            raise bad from None
    if hint is float:
        try:
            return float(stripped)
        except ValueError:
            raise bad from None
    if origin is Literal:
        return _check_type(key, stripped)
    return text.replace("\\n", "\n")
