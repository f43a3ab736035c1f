"""Who may see the dashboard, and proof that a POST came from its own pages.

- ``auth``: the user's callable decides who is let in (their session, SSO,
  a reverse proxy's header...). :func:`basic_auth` and :func:`no_auth` are the
  two ready-made ones; there is no default, so an open dashboard is a choice
  someone wrote down.
- CSRF: every form carries a token that is an HMAC of a random cookie under
  the dashboard's secret. A forged form from another site cannot read the
  cookie, and a cookie planted by a sibling subdomain has no valid HMAC. The
  ``Origin`` header, when the browser sends one, must name this host too.
- Headers: a Content-Security-Policy with no inline script or style, no
  framing, no sniffing; pages are never cached.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request

#: Decides who may use the dashboard: returns the user (anything but None,
#: shown in the page header) or None to refuse. May be a coroutine function.
Auth = Callable[[Request], Any | Awaitable[Any]]

CSRF_COOKIE = "taskq_csrf"
CSRF_FIELD = "csrf_token"

SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}


def basic_auth(username: str, password: str, *, realm: str = "taskq") -> Auth:
    """HTTP basic authentication with one user name and password.

    The browser asks for them (the 401 response carries the challenge). Use it
    behind HTTPS: basic authentication sends the password with every request.
    """
    if not username or not password:
        raise ValueError("basic_auth needs a user name and a non-empty password")
    if '"' in realm or "\\" in realm:
        raise ValueError("the realm cannot contain quotes or backslashes")
    want = hashlib.sha256(f"{username}:{password}".encode()).digest()

    def check(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            given = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        # Compare digests: the time taken says nothing about the password.
        if hmac.compare_digest(hashlib.sha256(given.encode()).digest(), want):
            return username
        return None

    check.www_authenticate = f'Basic realm="{realm}", charset="UTF-8"'  # type: ignore[attr-defined]
    return check


def no_auth(request: Request) -> str:
    """Let everyone in: for a dashboard that only trusted people can reach
    (a private network, or behind a proxy that authenticates). Say so
    explicitly with ``auth=taskq.dashboard.no_auth``."""
    return "anonymous"


async def authenticate(auth: Auth, request: Request) -> Any:
    """The user ``auth`` returns for ``request``, or None."""
    user = auth(request)
    if inspect.isawaitable(user):
        user = await user
    return user


def challenge(auth: Auth) -> str | None:
    """The ``WWW-Authenticate`` header for a refused request, if ``auth`` has one."""
    value = getattr(auth, "www_authenticate", None)
    return value if isinstance(value, str) else None


class Csrf:
    """Issues and checks the anti-forgery token of the dashboard's forms."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(32)

    def token(self, cookie: str) -> str:
        return hmac.new(self._secret, cookie.encode(), hashlib.sha256).hexdigest()

    def refusal(self, request: Request, form: Mapping[str, str]) -> str | None:
        """Why a POST is refused, or None when it carries a valid token."""
        origin = request.headers.get("origin")
        if origin is not None and origin != "null":
            host = request.headers.get("host", "")
            if urlsplit(origin).netloc != host:
                return f"the request came from another site ({origin})"
        cookie = request.cookies.get(CSRF_COOKIE)
        given = form.get(CSRF_FIELD)
        if not cookie or not given:
            return "the form's security token is missing: reload the page and try again"
        if not hmac.compare_digest(self.token(cookie), given):
            return "the form's security token is wrong: reload the page and try again"
        return None


def secret_bytes(secret: str | bytes | None) -> bytes:
    """The CSRF secret: the given one, else a random one for this process.

    Several processes behind one address need the same secret (a form made by
    one is posted to another): pass ``secret=``.
    """
    if secret is None:
        return secrets.token_bytes(32)
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(data) < 16:
        raise ValueError("the dashboard secret must be at least 16 bytes")
    return data
