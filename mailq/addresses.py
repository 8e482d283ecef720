"""List addresses: ``dev``, ``dev-owner``, ``dev-request`` ... and what each one is for.

Every list has seven addresses, one per *kind*: the posting address and six role suffixes. The
``-bounces`` and ``-confirm`` addresses also take a ``+detail`` (VERP-encoded recipient, or a
confirmation cookie). LMTP recipients and the alias generator both go through this one module, so
the MTA side and the queue side can never disagree about what ``dev-join`` means.

It sits below ``mailq.lists`` (validation refuses list names that clash with a role suffix) and
``mailq.mta`` (aliases, LMTP, the pipe), so neither has to import the other for it. It must stay
cheap to import: ``mailq-deliver`` uses it on every delivery (standard library only, and not even
``typing`` or ``__future__``: annotations that name types from elsewhere are strings).
"""
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

#: kind -> local-part suffix. Order is the order aliases are printed in.
SUFFIXES = {
    "post": "",
    "owner": "-owner",
    "request": "-request",
    "bounces": "-bounces",
    "join": "-join",
    "leave": "-leave",
    "confirm": "-confirm",
}
KINDS = tuple(SUFFIXES)
#: Older spellings that MTAs may still route to us (Mailman 2.1 habits).
SYNONYMS = {"-subscribe": "join", "-unsubscribe": "leave", "-admin": "bounces"}
#: Kinds whose address may carry ``+detail``.
DETAIL_KINDS = ("bounces", "confirm")
#: Which queue each kind is written to.
QUEUE_FOR_KIND = {
    "post": "in", "owner": "in",
    "request": "commands", "join": "commands", "leave": "commands", "confirm": "commands",
    "bounces": "bounces",
}


def parse_list_address(local_part: str, exists: "Callable[[str], bool] | None" = None) -> tuple[str, str]:
    """``dev-owner`` -> ``("dev", "owner")``; ``dev`` -> ``("dev", "post")``.

    Case is folded (MTAs treat local parts case-insensitively in aliases). ``+detail`` is allowed
    on ``-bounces`` and ``-confirm`` and dropped here (see ``mailq.delivery.verp`` to decode it).
    With *exists* (list name -> bool), a list whose own name ends in a suffix (``team-owner``)
    wins over the suffix reading, so such a list stays reachable.
    """
    local = local_part.strip().lower()
    if "@" in local:
        local = local.split("@", 1)[0]
    base, plus, _detail = local.partition("+")
    if exists is not None and not plus and exists(base):
        return base, "post"
    for suffix, kind in _suffix_table():
        if suffix and base.endswith(suffix) and len(base) > len(suffix):
            if plus and kind not in DETAIL_KINDS:
                break
            return base[: -len(suffix)], kind
    if plus:
        # "dev+x" is not one of ours: keep the whole thing as the (unknown) list name.
        return local, "post"
    return base, "post"


def _suffix_table() -> list[tuple[str, str]]:
    # Longest suffix first, so "-unsubscribe" is not read as "-subscribe".
    table = [(s, k) for k, s in SUFFIXES.items() if s] + list(SYNONYMS.items())
    return sorted(table, key=lambda item: -len(item[0]))


def list_address(listname: str, kind: str, domain: str = "") -> str:
    """The address for *kind* of *listname* (``dev-owner@example.org``; no domain: the local part)."""
    local = listname + SUFFIXES[kind]
    return f"{local}@{domain}" if domain else local
