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
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mailq.errors import InvalidInput
from mailq.lists.validate import validate_address, validate_domain

ReplyTo = Literal["poster", "list", "explicit"]
NonmemberAction = Literal["hold", "reject", "discard", "accept"]
SubscribePolicy = Literal["open", "confirm", "approve", "confirm_and_approve"]
DigestFrequency = Literal["daily", "weekly", "monthly"]
VolumeFrequency = Literal["never", "yearly", "monthly"]


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
    #: Recipients allowed in To/Cc of a post before it is held; 0 means no limit.
    max_recipients: int = 10
    #: Listed by ``mailqctl lists list --advertised`` and in the -request ``lists`` answer.
    advertised: bool = True

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
        for key, hint in _HINTS.items():
            if hint is float and not math.isfinite(getattr(self, key)):
                # nan compares false with everything: a nan threshold would silently never trigger
                raise InvalidInput(f"{key} must be a finite number (got {getattr(self, key)}); "
                                   f"give a plain number such as 5 or 2.5")
            if hint in (int, float) and getattr(self, key) < 0:
                raise InvalidInput(f"{key} must not be negative (got {getattr(self, key)})")


_HINTS: dict[str, Any] = typing.get_type_hints(ListSettings)
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
        hint, "list of addresses")


def _check_type(key: str, value: Any) -> Any:
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    bad = InvalidInput(f"{key}: expected {describe_type(key)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise bad
        return value
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
        if stripped.startswith("["):
            import yaml
            try:
                value = yaml.safe_load(stripped)
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
