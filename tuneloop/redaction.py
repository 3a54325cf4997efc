"""Credentials kept out of messages and logs: the one place URLs (and URLs inside texts) are redacted.

A URL may name a service in an error, a log line or a summary, but never the credentials that reach
it: ``user:password@`` becomes ``***@``, and the value of every query (or fragment) parameter whose
name looks secret (``token``, ``password``, ``user``, ``api_key``, ``X-Amz-Signature``...) becomes ``***``.
Everything else, path and harmless parameters included, is kept as written.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "***"
"""What stands in place of a hidden credential."""

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|sig|credential|auth|session|cookie|user", re.IGNORECASE)


def is_secret_parameter(name: str) -> bool:
    """Whether a query parameter called ``name`` probably carries a credential (matched loosely:
    hiding a harmless value costs less than showing a secret)."""
    return bool(_SECRET_NAME.search(unquote_plus(name)))


def redact_url(url: str) -> str:
    """``url`` safe for messages and logs.

    ``scheme://user:password@host:port/path?token=abc&db=2`` becomes
    ``scheme://***@host:port/path?token=***&db=2``. A URL without credentials comes back unchanged,
    character for character (``sqlite:////abs/state.db`` keeps its slashes), and so does a string
    that is not a URL with a scheme (a local path, ``host:port``).
    """
    match = _SCHEME.match(url)
    if not match:
        return url
    rest = url[match.end():]
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    tail, hash_mark, fragment = tail.partition("#")
    path, question_mark, query = tail.partition("?")
    return (match.group(0) + authority + path + question_mark + _masked_parameters(query) + hash_mark
            + _masked_parameters(fragment))


def redact_urls(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url` (error texts may quote a
    request URL)."""
    return _URL_IN_TEXT.sub(lambda found: redact_url(found.group(0)), str(text))


def _masked_parameters(parameters: str) -> str:
    """``a=1&token=x`` with the value of each secret-looking parameter replaced by ``***``."""
    if "=" not in parameters:
        return parameters
    pieces = []
    for piece in parameters.split("&"):
        name, equals, value = piece.partition("=")
        pieces.append(f"{name}={MASK}" if equals and value and is_secret_parameter(name) else piece)
    return "&".join(pieces)
