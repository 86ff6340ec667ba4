"""Who may see the pages: nobody needs to log in while the web listens on
loopback with no login configured; once ``web.users`` (names and password
hashes) or ``web.token`` is set, every page but the login form and the
static files needs a session (a signed cookie, after logging in) or the
token (``Authorization: Bearer TOKEN``, for scripts, the API and a
Prometheus scrape).

Passwords are stored as scrypt hashes from the standard library
(``hash_password``; `tinyci web --hash-password` prints one). A session
cookie is ``user:expiry:hmac`` under a key made at start-up, so a restart
logs everyone out; it is HttpOnly and SameSite=Strict. Forms that change
something (log in, log out, the actions) carry a CSRF token bound to the
session, and their Origin, when the browser sends one, must be this site.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
COOKIE = "tinyci_session"
LOGIN_CSRF_COOKIE = "tinyci_login"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (a ``hash_password`` string); False for any malformed hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(_unb64(digest)), maxmem=128 * int(r) * int(n) * 2 + (1 << 20))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


def same_origin(origin: str | None, host: str) -> bool:
    """A form posted from a page of this site: its Origin (when the browser sends one) is ours."""
    if origin is None:
        return True
    return origin.split("://", 1)[-1].rstrip("/") == host


def well_formed(stored: str) -> bool:
    parts = stored.split("$")
    return len(parts) == 6 and parts[0] == "scrypt" and all(x.isdigit() for x in parts[1:4])


class Gate:
    """The login configuration of one web process."""

    def __init__(self, users: dict[str, str], token: str = "", session_seconds: float = 12 * 3600):
        self.users = dict(users)            # name -> hash_password string
        self.token = token
        self.session_seconds = session_seconds
        self.key = secrets.token_bytes(32)  # signs sessions and CSRF tokens; new at every start

    @property
    def required(self) -> bool:
        return bool(self.users or self.token)

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self.key, text.encode(), hashlib.sha256).digest())

    def login(self, user: str, password: str) -> str | None:
        """A session cookie value for a right name and password; else None.
        A wrong name costs the same scrypt as a wrong password."""
        stored = self.users.get(user)
        good = check_password(password, stored if stored else hash_password("", b"\0" * 16))
        if not (good and stored):
            return None
        body = f"{_b64(user.encode())}:{int(time.time() + self.session_seconds)}"
        return f"{body}:{self._mac(body)}"

    def session_user(self, cookie: str | None) -> str | None:
        if not cookie or cookie.count(":") != 2:
            return None
        name, expiry, mac = cookie.split(":")
        if not hmac.compare_digest(mac.encode(), self._mac(f"{name}:{expiry}").encode()):
            return None
        try:
            if int(expiry) < time.time():
                return None
            user = _unb64(name).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return user if user in self.users else None

    def token_ok(self, header: str | None) -> bool:
        if not self.token or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())

    def csrf(self, session: str) -> str:
        """The form token for ``session`` (a cookie value, or the login form's own nonce)."""
        return self._mac("csrf:" + session)

    def csrf_ok(self, session: str | None, token: str | None) -> bool:
        return bool(session and token) and hmac.compare_digest(token.encode(), self.csrf(session).encode())
