"""What mail-in refuses before queueing: over-long header lines and too deep MIME nesting (issue 10).

Both are messages one stranger can send to make a runner slow or fail later: a 20 MB single-line
Subject costs the ``in`` runner minutes and hundreds of MB while it builds a notice; a message
nested 300 MIME levels deep makes the email generator raise RecursionError. So ``mailq-deliver``
(exit 65) and LMTP (``554 5.6.0``) refuse them with the reason, and nothing is queued.

* :data:`MAX_HEADER_LINE`: RFC 5322 2.1.1's limit, 998 characters per line, CRLF excluded; only
  the header section is checked (body lines are the transport's business).
* :data:`MAX_DEPTH`: MIME levels (multipart or message/rfc822 inside one another), like Postfix's
  ``mime_nesting_limit``; far above real mail, far below what the generator handles.

No imports at module level: ``mailq-deliver`` runs this for every message and must start fast. The
depth check parses the message only when it could be that deep (as many ``--`` delimiter lines or
``822`` mentions as levels), which real mail almost never is.  Not even ``__future__`` (``str | None``
needs none on 3.10+).
"""
MAX_HEADER_LINE = 998
MAX_DEPTH = 50


def header_problem(msg: bytes) -> str | None:
    """Why the header section of *msg* is refused (a line over MAX_HEADER_LINE), or None."""
    end = len(msg)
    for blank in (b"\n\n", b"\n\r\n"):
        at = msg.find(blank)
        if 0 <= at < end:
            end = at
    start = 0
    number = 0
    while start <= end:
        nl = msg.find(b"\n", start, end + 1)
        stop = end if nl < 0 else nl
        length = stop - start - (1 if stop > start and msg[stop - 1:stop] == b"\r" else 0)
        number += 1
        if length > MAX_HEADER_LINE:
            return (f"header line {number} is {length} characters long, over the limit of {MAX_HEADER_LINE} "
                    f"(RFC 5322 2.1.1)")
        if nl < 0:
            break
        start = nl + 1
    return None


def depth_problem(msg: bytes) -> str | None:
    """Why *msg* is refused for its MIME nesting (deeper than MAX_DEPTH, or unparseable so), or None."""
    if msg.count(b"\n--") < MAX_DEPTH and msg.count(b"822") < MAX_DEPTH:
        return None     # each level needs a delimiter line or a message/rfc822 header: cannot be that deep
    from email import message_from_bytes, policy

    try:
        root = message_from_bytes(msg, policy=policy.compat32)
        stack = [(root, 1)]
        while stack:
            part, depth = stack.pop()
            if depth > MAX_DEPTH:
                return f"MIME parts nested more than {MAX_DEPTH} levels deep"
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((child, depth + 1) for child in payload if hasattr(child, "get_payload"))
    except RecursionError:
        return f"MIME parts nested more than {MAX_DEPTH} levels deep"
    return None


def mime_problem(msg: bytes) -> str | None:
    """Why mail-in refuses *msg* (header line length, MIME depth), or None."""
    return header_problem(msg) or depth_problem(msg)
