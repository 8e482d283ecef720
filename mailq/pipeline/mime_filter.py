"""Stage ``mime_filter``: take unwanted parts out of posts (lists with ``filter_content`` on).

Walks the whole MIME tree, nested multiparts and ``message/rfc822`` parts (forwarded posts)
included, and removes every leaf part that

* has a type in ``filter_types`` (``image/gif``, or a main type such as ``image``), or a type not
  in ``pass_types`` when that list is not empty (containers, multipart/* and message/rfc822,
  always pass: their contents are judged part by part);
* has a file name whose extension is in ``filter_extensions`` (``exe``, ...), or, when
  ``pass_extensions`` is not empty, a file name whose extension is not in it.

A part's type is judged twice: as declared, and as its file name's extension says (Python's
built-in table, never the host's /etc/mime.types, so every host decides alike).  A part that
declares ``text/plain`` but is called ``invoice.exe`` is both, and either type can remove it.

Then ``collapse_alternatives`` turns a multipart/alternative into its first remaining part (the
plainest, RFC 2046), and ``convert_html_to_plaintext`` turns every text/html part into text/plain
with html2text (links kept as text; HTML larger than ``HTML_LIMIT`` or nested deeper than
``HTML_DEPTH`` is replaced by a line saying so instead of converted).  Containers left empty are
removed too.  A post with nothing left follows ``filter_action``: ``discard``, ``reject`` (the
poster is told which parts the list does not take), ``forward_to_owner`` (discarded; the owners
get it attached) or ``preserve`` (discarded; kept in ``var/lists/<list>/preserved/`` and the
owners told where).

``msgdata["filtered"]`` lists what was removed or converted, for the log.  Parts that nothing
removes are not re-encoded: their bytes go out as they came.
"""
from __future__ import annotations

import mimetypes
from email.message import Message
from typing import Any

from mailq.lists.mlist import MailingList
from mailq.lists.settings import ListSettings
from mailq.pipeline.base import Context, Discard, Reject, _raw
from mailq.pipeline.textbody import decode_text, encode_text

#: HTML parts larger than this (bytes of text) are not converted: html2text is pure Python.
HTML_LIMIT = 2 * 1024 * 1024
#: Deeper nesting than this is not a real post's: the part is removed.
MAX_DEPTH = 20
#: HTML whose elements nest deeper than this is not converted (html2text's output grows with depth).
HTML_DEPTH = 100
#: Elements without an end tag (they do not nest).
_VOID = frozenset(("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
                   "source", "track", "wbr"))
#: Elements that HTML lets a sibling of the same kind close (``<p>a<p>b``).
_SIBLINGS = frozenset(("p", "li", "dt", "dd", "tr", "td", "th", "option"))
_TYPES = mimetypes.MimeTypes()   # the built-in table only: the same answer on every host
_CONTENT_HEADERS = ("content-type", "content-transfer-encoding", "content-disposition",
                    "content-description", "content-id", "content-language", "content-md5")


class Rules:
    """The filter settings of one list, ready to judge parts."""

    def __init__(self, s: ListSettings) -> None:
        self.filter_types = set(s.filter_types)
        self.pass_types = set(s.pass_types)
        self.filter_extensions = set(s.filter_extensions)
        self.pass_extensions = set(s.pass_extensions)
        self.collapse = bool(s.collapse_alternatives)
        self.convert = bool(s.convert_html_to_plaintext)

    def why_removed(self, part: Message) -> str | None:
        """Why the leaf *part* goes, or None when it stays."""
        declared = part.get_content_type()
        filename = filename_of(part)
        ext = filename.rpartition(".")[2].lower() if "." in filename else ""
        named = f" ({filename!r})" if filename else ""
        guessed = _TYPES.guess_type(f"x.{ext}", strict=False)[0] if ext else None
        for ctype in dict.fromkeys(t for t in (declared, guessed) if t):
            how = "declared" if ctype == declared else f"by its name{named}"
            if _type_in(ctype, self.filter_types):
                return f"{ctype} part{named}: type {how} is in filter_types"
            if self.pass_types and not _type_in(ctype, self.pass_types):
                return f"{ctype} part{named}: type {how} is not in pass_types"
        if ext and ext in self.filter_extensions:
            return f"{declared} part{named}: extension .{ext} is in filter_extensions"
        if filename and self.pass_extensions and ext not in self.pass_extensions:
            return f"{declared} part{named}: extension {('.' + ext) if ext else '(none)'} is not in pass_extensions"
        return None


def warm_up() -> None:
    """Import html2text before the first post (the ``in`` runner calls it)."""
    import html2text  # noqa: F401


def process(mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    s = mlist.settings
    if not s.filter_content or msgdata.get("kind", "post") != "post":
        return
    rules = Rules(s)
    done: list[str] = []
    kept = _clean(msg, rules, done, 0)
    if kept and rules.convert:
        _convert_html(msg, done)
    if done:
        msgdata["filtered"] = done
        ctx.log.info("list %s: mime_filter: post from %s: %s", mlist.name, msgdata.get("sender") or "?",
                     "; ".join(done))
    if kept:
        return
    action = s.filter_action
    reason = "nothing is left of the post after content filtering: " + "; ".join(done)
    if action == "reject":
        raise Reject(f"{mlist.posting_address} does not take this kind of content. {reason}")
    if action == "forward_to_owner":
        raise Discard(reason, to_owner="forward")
    if action == "preserve":
        raise Discard(reason, to_owner="preserve")
    raise Discard(reason)


def filename_of(part: Message) -> str:
    """The part's file name (Content-Disposition, else Content-Type name=), decoded; "" if none."""
    try:
        name = part.get_filename() or ""
    except Exception:   # malformed RFC 2231 parameters: read the raw value instead
        name = ""
    if not name:
        for header, param in (("content-disposition", "filename"), ("content-type", "name")):
            value = _raw(part.get(header, ""))
            marker = f"{param}="
            low = value.lower()
            if marker in low:
                name = value[low.index(marker) + len(marker):].split(";")[0].strip().strip('"')
                break
    return str(name).strip().rstrip(". ")   # Windows drops trailing dots and spaces: "x.exe." is x.exe


def _type_in(ctype: str, wanted: set[str]) -> bool:
    return ctype in wanted or ctype.partition("/")[0] in wanted


def _clean(part: Message, rules: Rules, done: list[str], depth: int) -> bool:
    """Filter *part* in place; False when nothing of it is left (the caller drops it)."""
    if depth > MAX_DEPTH:
        done.append(f"{part.get_content_type()} part nested more than {MAX_DEPTH} deep")
        return False
    payload = part._payload   # noqa: SLF001 - get_payload() would transcode 8-bit bodies
    if not isinstance(payload, list):
        if part.get_content_type().startswith("multipart/") or part.get_content_type() == "message/rfc822":
            return True    # a container the parser could not open: one opaque blob, left as it came
        why = rules.why_removed(part)
        if why:
            done.append(why)
            return False
        return True
    kept = [p for p in payload if isinstance(p, Message) and _clean(p, rules, done, depth + 1)]
    if part.get_content_type() == "message/rfc822":
        if kept:
            return True
        done.append("a forwarded message with nothing left in it")
        return False
    if len(kept) != len(payload):
        part.set_payload(kept)
    if not kept:
        return False
    if part.get_content_type() == "multipart/alternative" and rules.collapse:
        done.append(f"multipart/alternative collapsed to its first part ({kept[0].get_content_type()})")
        _become(part, kept[0])
    return True


def _become(part: Message, child: Message) -> None:
    """Give *part* the content of *child* (its Content-* headers and body); other headers stay."""
    for name in _CONTENT_HEADERS:
        del part[name]
    for name, value in child.raw_items():
        if name.lower() in _CONTENT_HEADERS:
            part[name] = value
    part.set_payload(child._payload)   # noqa: SLF001
    part.preamble, part.epilogue = child.preamble, child.epilogue


def _convert_html(part: Message, done: list[str]) -> None:
    payload = part._payload   # noqa: SLF001
    if isinstance(payload, list):
        for child in payload:
            if isinstance(child, Message):
                _convert_html(child, done)
        return
    if part.get_content_type() != "text/html":
        return
    decoded = decode_text(part)
    if decoded is None:
        text, charset, cte = "[An HTML part that could not be decoded was removed.]\n", "us-ascii", "7bit"
        done.append("text/html part that cannot be decoded replaced by a note")
    elif (converted := html_to_text(decoded[0]) if len(decoded[0]) <= HTML_LIMIT else None) is None:
        text, charset, cte = (f"[An HTML part of {len(decoded[0])} characters was removed: too large "
                              f"or too deeply nested to convert to text.]\n", "us-ascii", "7bit")
        done.append("text/html part too large or too deeply nested to convert replaced by a note")
    else:
        text, charset, cte = converted, decoded[1], decoded[2]
        done.append("text/html converted to text/plain")
    had_version = "mime-version" in part
    part.set_type("text/plain")
    if not had_version:
        del part["mime-version"]   # set_type adds one; only the top level carries it
    encode_text(part, text, charset, cte)


class _TooDeep(Exception):
    pass


#: html2text's converter with the depth guard (a subclass made on first use: html2text is imported
#: lazily, for the start-up time of ``mailqctl``).
_converter_class: Any = None


def _bounded_converter() -> Any:
    """``html2text.HTML2Text`` that stops with ``_TooDeep`` once elements nest deeper than its ``max_depth``.

    The depth is judged on the very tags html2text is handling, in the same pass: no second parse
    of the HTML.  Work before the stop is bounded too: what was converted nests at most
    ``max_depth`` deep.
    """
    global _converter_class
    if _converter_class is not None:
        return _converter_class
    import html2text

    class Bounded(html2text.HTML2Text):
        max_depth = HTML_DEPTH

        def __init__(self) -> None:
            super().__init__()
            self.open_tags: list[str] = []

        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag not in _VOID:
                open_tags = self.open_tags
                if tag in _SIBLINGS and open_tags and open_tags[-1] == tag:
                    open_tags.pop()     # <p>a<p>b, <li>a<li>b: the new one closes the open one
                open_tags.append(tag)
                if len(open_tags) > self.max_depth:
                    raise _TooDeep
            super().handle_starttag(tag, attrs)

        def handle_endtag(self, tag: str) -> None:
            open_tags = self.open_tags
            if tag in open_tags:        # close it and whatever was left open inside it
                del open_tags[len(open_tags) - 1 - open_tags[::-1].index(tag):]
            super().handle_endtag(tag)

    _converter_class = Bounded
    return Bounded


def html_to_text(html: str, max_depth: int = HTML_DEPTH) -> str | None:
    """Readable plain text for *html* (html2text: paragraphs, lists, links as text, no markup), or
    None when its elements nest more than *max_depth* deep.

    html2text indents every line by its nesting (lists, quotes), so 45 KB of nested ``<ul><li>``
    would come out as 25 MB of text after seconds of work: such HTML is not converted.  The depth
    is counted while converting (one html.parser pass), void elements (``<br>``) do not nest and a
    ``<p>``/``<li>``/... closes an open one of its kind, as browsers read them.  The caller also
    bounds the size (``HTML_LIMIT``).
    """
    converter = _bounded_converter()()
    converter.max_depth = max_depth
    converter.body_width = 0          # mail programs wrap; a hard wrap would break long links
    converter.unicode_snob = True     # keep non-ASCII letters instead of ASCII look-alikes
    converter.ignore_images = True    # an image's URL is noise in a text post; its alt text stays
    converter.images_to_alt = True
    converter.protect_links = True
    try:
        text = converter.handle(html).strip("\n")
    except _TooDeep:
        return None
    return text + "\n" if text else ""
