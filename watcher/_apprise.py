"""The optional Apprise library, at arm's length: loading it, opening one URL as a service, sending
to it and saying why a send failed, and registering every secret the URL holds.

Apprise is an extra (``pip install 'metronome-watcher[apprise]'``). Nothing imports it until a
config names an ``apprise`` sink, and its absence is one line saying what to install
(:data:`MISSING`).

Apprise logs through the standard ``logging`` module, under the ``apprise`` logger; those records
reach the same handler, processors and redactor as every other library's (``watcher._logging``).
While one of our calls into Apprise runs, a handler also collects that call's warnings and errors
(by context, not by thread: sinks send in parallel, and Apprise 2 sends from threads of its own),
because Apprise answers a send with one true or false, and its log lines are the only reason it
gives.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from ._secrets import redact, register

__all__ = [
    "LOGGER",
    "MISSING",
    "Service",
    "installed",
    "open_service",
    "register_url",
    "scheme_of",
    "service_scheme",
]

LOGGER = "apprise"
MISSING = (
    "the apprise sink needs the Apprise library, which is not installed: "
    "pip install 'metronome-watcher[apprise]'"
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: What separates the parts of a URL's path and query.
_PARTS = re.compile(r"[/:@?&=#,;]+")


def scheme_of(url: str) -> str | None:
    """``msteams`` for ``msteams://...``; None when ``url`` is not ``scheme://...``."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else None


def installed() -> bool:
    """Whether Apprise can be imported here."""
    try:
        import apprise  # noqa: F401
    except ImportError:
        return False
    return True


def _apprise() -> Any:
    try:
        import apprise
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    logger = logging.getLogger(LOGGER)
    if _collector not in logger.handlers:
        logger.addHandler(_collector)
    return apprise


# -- the secrets a URL holds ------------------------------------------------------------------------


def _looks_like_a_token(part: str) -> bool:
    """Long enough not to be an ordinary word, and not plainly one: a token, a key, an address."""
    return len(part) >= 8 and (any(c.isdigit() for c in part) or len(part) >= 16)


def _forms(part: str) -> set[str]:
    return {part, unquote(part)}


def register_url(url: str, plugin: Any = None) -> None:
    """Register ``url`` as a secret, whole and in its parts, so that no log line, error or stored
    text shows it or the tokens in it.

    The parts: the password, and every user name, host with no dot in it (where Telegram and
    PagerDuty keep a key), path segment or query value that looks like a token (at least 8
    characters with a digit, or 16 without), as written and percent-decoded. Shorter plain words
    are left alone, or every log line saying "hook" or "markdown" would be cut. Once Apprise has
    read the URL (``plugin``), the URL as Apprise writes it out in full is registered too.
    """
    register(url)
    rest = url.split("://", 1)[-1]
    netloc = re.match(r"[^/?#]*", rest).group(0)  # type: ignore[union-attr]  # always matches
    userinfo, _, hostport = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        host = hostport
    for secret in _forms(password):
        register(secret)
    keys = [host, *host.split(":")] if "." not in host else []  # Telegram's is "{bot id}:{secret}"
    candidates = [user, *keys, *_PARTS.split(rest[len(netloc) :])]
    for part in candidates:
        for form in _forms(part):
            if _looks_like_a_token(form):
                register(form)
    if plugin is not None:
        # A plugin that cannot write itself out leaves nothing more to hide.
        with contextlib.suppress(Exception):
            register(plugin.url(privacy=False))


# -- Apprise's log lines as the reason for a failure ----------------------------------------------

#: The lines collected for the call into Apprise running in this context. Apprise 2 sends from its
#: own worker threads with a copy of the caller's context, so this follows the send there, and
#: sinks sending in parallel each get their own lines.
_lines: ContextVar[list[str] | None] = ContextVar("watcher_apprise_lines", default=None)


class _Collect(logging.Handler):
    """On the ``apprise`` logger for good: adds each warning or error to the current call's lines.

    Being a handler there, it also keeps Python's last-resort handler from printing Apprise's
    lines on stderr before logging is set up (while the config is read), where no redactor runs.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        lines = _lines.get()
        if lines is None:
            return
        try:
            lines.append(record.getMessage())
        except Exception:  # a malformed record must not break a send
            lines.append(str(record.msg))


_collector = _Collect()


@contextmanager
def _collected() -> Iterator[list[str]]:
    lines: list[str] = []
    token = _lines.set(lines)
    try:
        yield lines
    finally:
        _lines.reset(token)


def _reason(lines: list[str]) -> str:
    # One line: Apprise's lines joined, each stripped of the line breaks some services put in them.
    said = "; ".join(" ".join(line.split()) for line in dict.fromkeys(lines) if line.strip())
    # Redacted before it is cut: a cut through a secret would leave part of it unrecognised.
    return redact(said)[:800] if said else "Apprise gave no reason (its warnings may be switched off)"


# -- one URL as a service ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Service:
    """One Apprise URL, read and ready to send to. Holds no URL in its repr."""

    scheme: str
    #: Apprise's name for the service ("E-Mail", "Pager Duty", "Discord").
    name: str
    #: What the service takes: Markdown; HTML, which Apprise makes from the Markdown we send; or
    #: plain text only (then we send plain text, not Markdown that would show as stray asterisks).
    markup: Literal["markdown", "html", "text"]
    #: Longest title the service takes; 0 when it has none (Apprise puts the title in the body).
    title_limit: int
    #: Longest body the service takes; 0 when Apprise knows no limit.
    body_limit: int
    _apprise: Any
    _markdown_format: Any
    _text_format: Any

    def __repr__(self) -> str:
        return f"Service(scheme={self.scheme!r}, name={self.name!r})"

    def send(self, title: str, body: str, *, markdown: bool, notify_type: str) -> str | None:
        """Send one message. None when the service took it; else why not, redacted.

        Never raises for the service's trouble: Apprise catches its own, and anything that escapes
        it is a failure with its type and message as the reason.
        """
        body_format = self._markdown_format if markdown else self._text_format
        with _collected() as lines:
            try:
                ok = bool(
                    self._apprise.notify(
                        body=body, title=title, body_format=body_format, notify_type=notify_type
                    )
                )
            except Exception as exc:
                return redact(f"{type(exc).__name__}: {exc}")[:800]
        return None if ok else _reason(lines)


def _markup(plugin: Any, markdown: Any) -> Literal["markdown", "html", "text"]:
    """What the service makes of the Markdown we would send: Markdown, HTML or plain text.

    Apprise 2 resolves it per send (a URL's ``?format=`` first, then the format given, then the
    service's preferred one); Apprise 1 has one format per service (``?format=`` sets it).
    """
    resolve = getattr(plugin, "resolve_format", None)
    chosen = resolve(markdown) if callable(resolve) else plugin.notify_format
    name = str(getattr(chosen, "value", chosen)).lower()
    return "markdown" if name == "markdown" else "html" if name == "html" else "text"


def _read(apprise: Any, url: str) -> Any:
    """Apprise's plugin for ``url``, or None; the URL's secrets are registered first."""
    register_url(url)
    with _collected():  # Apprise logs why it cannot read a URL, with parts of it: kept out of sight
        return apprise.Apprise.instantiate(url, asset=apprise.AppriseAsset(storage_mode="memory"))


def _scheme(url: str, plugin: Any) -> str | None:
    """The scheme as written, except for a service's own ``https://`` URL (a Teams workflow's, a
    Discord webhook's), which Apprise reads as that service: then the service's scheme."""
    scheme = scheme_of(url)
    if scheme not in ("http", "https") or plugin is None:
        return scheme
    for attr in ("secure_protocol", "protocol"):
        value = getattr(plugin, attr, None)
        names = [value] if isinstance(value, str) else list(value or ())
        if names and names[0]:
            return str(names[0]).lower()
    return scheme


def service_scheme(url: str) -> str | None:
    """The scheme Apprise files ``url`` under (see :func:`_scheme`); None for no ``scheme://``."""
    if scheme_of(url) is None:
        return None
    return _scheme(url, _read(_apprise(), url))


def open_service(url: str) -> Service:
    """Read ``url`` with Apprise, registering its secrets first.

    Raises ImportError (:data:`MISSING`) without Apprise, and ValueError, naming only the scheme,
    for a URL Apprise cannot use.
    """
    apprise = _apprise()
    plugin = _read(apprise, url)
    scheme = _scheme(url, plugin)
    if scheme is None:
        raise ValueError("not an Apprise URL (expected scheme://...)")
    if plugin is None and scheme in ("http", "https"):
        raise ValueError(
            f"Apprise reads an {scheme}:// URL only as a service's own (a Teams workflow's, a Discord "
            "webhook's); for any other endpoint write json://, form:// or xml://, or use the http sink"
        )
    if plugin is None:
        raise ValueError(
            f"Apprise cannot use this {scheme}:// URL: an unknown service, or a token or option "
            "missing or malformed (see Apprise's page for the service)"
        )
    register_url(url, plugin)
    sender = apprise.Apprise(asset=plugin.asset)
    sender.add(plugin)
    return Service(
        scheme=scheme,
        name=str(getattr(plugin, "service_name", scheme)),
        markup=_markup(plugin, apprise.NotifyFormat.MARKDOWN),
        title_limit=max(0, int(getattr(plugin, "title_maxlen", 0) or 0)),
        body_limit=max(0, int(getattr(plugin, "body_maxlen", 0) or 0)),
        _apprise=sender,
        _markdown_format=apprise.NotifyFormat.MARKDOWN,
        _text_format=apprise.NotifyFormat.TEXT,
    )
