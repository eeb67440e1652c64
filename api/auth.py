"""Who is calling: account tokens, WeChat login, admin token, payment signatures.

- Accounts log in with a WeChat one-time code. A ``CodeVerifier`` turns it
  into an openid: ``Code2SessionVerifier`` calls WeChat's ``auth.code2Session``
  (the session key never leaves this module), ``DevCodeVerifier`` accepts
  ``dev-<openid>`` for tests and the demo. The API never trusts an openid or
  account id sent by a client.
- Our own bearer token: ``<account id>.<expiry s>.<base64url HMAC-SHA256>``,
  short-lived, checked in constant time.
- Admin routes take a staff member's token (``hys_...``, see
  ``engine.store.staff``), or the shared ``HAOYUAN_ADMIN_TOKEN`` where it is
  enabled (``api.guards.staff_required``).
- Account tokens can be revoked before they expire (logout, an operator):
  ``Bearer`` names a verified token by its account, id and expiry, and every
  request checks Redis for its revocation (``Engine.access``).
- The payment callback is signed by the payment side: ``X-Payment-Timestamp``
  (unix seconds) and ``X-Payment-Signature`` = hex HMAC-SHA256(secret,
  ``"v2\n{timestamp}\n{METHOD}\n{path}\n" + raw body``), the path being
  ``/v1/holds/{hold id}/confirm``: a signature is good for one hold only.
  Stale, malformed or wrong signatures are refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Any, NamedTuple, Protocol

import httpx
import msgspec

__all__ = [
    "Bearer",
    "Code2SessionVerifier",
    "CodeVerifier",
    "DevCodeVerifier",
    "InvalidLoginCode",
    "LoginUnavailable",
    "TokenSigner",
    "bearer",
    "check_admin",
    "client_address",
    "sign_payment",
    "verified_bearer",
    "verify_payment",
]

_OPENID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,12}", re.ASCII)
_HEX = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)


class InvalidLoginCode(Exception):
    """The code was refused (unknown, used, expired, forged)."""


class LoginUnavailable(Exception):
    """The code could not be checked now (WeChat unreachable or busy)."""


class CodeVerifier(Protocol):
    async def openid(self, code: str) -> str:
        """The openid the code belongs to; raises InvalidLoginCode or LoginUnavailable."""
        ...

    async def aclose(self) -> None: ...


class DevCodeVerifier:
    """Development and tests: ``dev-<openid>`` logs in as ``<openid>``; nothing else does."""

    async def openid(self, code: str) -> str:
        if not code.startswith("dev-") or not _OPENID_RE.fullmatch(code[4:]):
            raise InvalidLoginCode("not a development login code")
        return code[4:]

    async def aclose(self) -> None:
        return None


class _C2S(msgspec.Struct):
    openid: str | None = None
    session_key: str | None = None
    errcode: int = 0
    errmsg: str = ""


# errcodes that mean "this code is no good" (invalid, already used, blocked user)
_REFUSED = {40029, 40163, 40226, 41008}


class Code2SessionVerifier:
    """WeChat ``auth.code2Session`` over httpx. Only the openid is kept."""

    def __init__(
        self,
        url: str,
        appid: str,
        secret: str,
        *,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self._appid = appid
        self._secret = secret
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._own = client is None

    async def openid(self, code: str) -> str:
        params = {"appid": self._appid, "secret": self._secret, "js_code": code,
                  "grant_type": "authorization_code"}
        try:
            resp = await self._client.get(self.url, params=params)
        except httpx.HTTPError:
            raise LoginUnavailable("code2Session unreachable") from None
        if resp.status_code != 200:
            raise LoginUnavailable("code2Session answered badly")
        try:
            got = msgspec.json.decode(resp.content, type=_C2S)
        except msgspec.DecodeError:
            raise LoginUnavailable("code2Session answered badly") from None
        if got.errcode in _REFUSED:
            raise InvalidLoginCode("login code refused")
        if got.errcode != 0 or not got.openid:
            raise LoginUnavailable("code2Session refused to answer now")
        if not _OPENID_RE.fullmatch(got.openid):
            raise LoginUnavailable("code2Session answered an odd openid")
        return got.openid  # the session key is dropped here, never stored or returned

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenSigner:
    """Mints and checks our short-lived account tokens.

    Verified tokens are remembered (bounded) so the hot path does one dict
    lookup, not one HMAC, per request; expiry is still checked every time.
    """

    def __init__(self, secret: str | bytes, ttl_s: int) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        self._key = hashlib.sha256(b"haoyuan account token v1\x00" + key).digest()
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[str, int]] = {}

    def _sig(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def mint(self, account_id: str, now: float | None = None) -> tuple[str, int]:
        if not _ACCOUNT_RE.fullmatch(account_id):
            raise ValueError("malformed account id")
        exp = int(now if now is not None else time.time()) + self.ttl_s
        payload = f"{account_id}.{exp}"
        return f"{payload}.{self._sig(payload)}", exp

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The account id of a valid, unexpired token; None otherwise."""
        t = now if now is not None else time.time()
        hit = self._seen.get(token)
        if hit is not None:
            return hit[0] if hit[1] > t else None
        if len(token) > 200 or not token.isascii():
            return None
        parts = token.split(".")
        if (len(parts) != 3 or not _DIGITS.fullmatch(parts[1])
                or not _ACCOUNT_RE.fullmatch(parts[0])):
            return None
        if not hmac.compare_digest(self._sig(f"{parts[0]}.{parts[1]}").encode(),
                                   parts[2].encode()):
            return None
        exp = int(parts[1])
        if exp <= t:
            return None
        if len(self._seen) >= 100_000:
            self._seen.clear()
        self._seen[token] = (parts[0], exp)
        return parts[0]


def bearer(headers: Any) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    value = headers.get("authorization")
    if not value or len(value) < 8 or value[:7].lower() != "bearer ":
        return None
    return str(value[7:].strip()) or None


def check_admin(headers: Any, admin_token: str) -> bool:
    token = bearer(headers)
    if token is None:
        return False
    return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), admin_token.encode())


def sign_payment(secret: str, timestamp: int | str, body: bytes, *, method: str = "POST",
                 path: str) -> str:
    """The signature the payment side puts in X-Payment-Signature (scheme v2)."""
    msg = f"v2\n{timestamp}\n{method.upper()}\n{path}\n".encode("utf-8", "surrogatepass") + body
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def verify_payment(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    method: str,
    path: str,
    max_skew_s: int = 300,
    now: float | None = None,
) -> bool:
    """A fresh, well-formed signature of this method, path, timestamp and body."""
    if timestamp is None or signature is None or not _DIGITS.fullmatch(timestamp):
        return False
    signature = signature.strip()
    if not _HEX.fullmatch(signature):
        return False
    t = now if now is not None else time.time()
    if abs(t - int(timestamp)) > max_skew_s:
        return False
    expected = sign_payment(secret, timestamp, body, method=method, path=path)
    return hmac.compare_digest(expected.encode(), signature.lower().encode())


class Bearer(NamedTuple):
    """A verified account token: its account, its id (for a revocation) and expiry (unix s)."""

    account: str
    token_id: str
    exp: int


def verified_bearer(tokens: TokenSigner, token: str) -> Bearer | None:
    """The token's ``Bearer`` if its signature and expiry check out (not its revocation)."""
    account = tokens.verify(token)
    if account is None:
        return None
    _, exp, sig = token.split(".")
    return Bearer(account, sig[:22], int(exp))


def client_address(scope: Any, header: str = "") -> str:
    """The caller's address: the peer, or the first address of ``header`` (set
    by a reverse proxy you trust) when one is configured."""
    if header:
        name = header.lower().encode("latin-1")
        for k, v in scope.get("headers", ()):
            if k == name:
                first: str = v.decode("latin-1").split(",")[0].strip()
                if first:
                    return first[:64]
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
