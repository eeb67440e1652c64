"""Personal data (PIPL): validation, masking, field encryption, keyed hashing.

Name, phone and national ID number never leave this module in clear except to
the caller that asked for them:

- ``normalize_national_id`` / ``normalize_phone`` validate and normalise input
  before anything is hashed or stored; their errors never echo the input.
- ``mask_id`` / ``mask_phone`` / ``mask_name`` are what responses show
  (``110***********1234``: the birth date is never shown).
- ``Crypto`` encrypts a field with AES-256-GCM under a versioned key ring,
  the AAD binding the value to its table, column and row; ``id_hash`` is the
  keyed hash (HMAC-SHA256) of a normalised ID: the patient ref in Redis keys,
  streams and bookings. An unkeyed hash of an 18-digit ID is brute-forceable.
- ``redact`` masks anything that looks like an ID or a mobile number in a log
  line; ``redact_processor`` (structlog) and ``RedactingFilter`` (logging)
  apply it to every record.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
import struct
import unicodedata
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "Crypto",
    "CryptoConfigError",
    "DecryptionError",
    "InvalidNationalId",
    "InvalidPhone",
    "RedactingFilter",
    "dev_crypto",
    "is_development",
    "mask_id",
    "mask_name",
    "mask_phone",
    "normalize_national_id",
    "normalize_phone",
    "redact",
    "redact_processor",
    "worker_crypto",
]

# --------------------------------------------------------------------------- validation


class InvalidNationalId(ValueError):
    """The input is not a valid 18-character resident ID. Never carries the input."""


class InvalidPhone(ValueError):
    """The input is not a mainland mobile number. Never carries the input."""


#: China Standard Time: birth dates and "today" are judged on the local calendar.
CST = dt.timezone(dt.timedelta(hours=8), "CST")
_ID_RE = re.compile(r"[0-9]{17}[0-9X]", re.ASCII)
_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"
_PHONE_RE = re.compile(r"1[3-9][0-9]{9}", re.ASCII)
_PHONE_SEPARATORS = re.compile(r"[\s\-()]")


def check_digit(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits."""
    total = sum(int(c) * w for c, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def normalize_national_id(raw: str, *, today: dt.date | None = None) -> str:
    """Validate a Chinese resident ID number and return its canonical form.

    NFKC (full-width digits and letters become ASCII), whitespace removed,
    ``x`` upper-cased. Then: 17 digits and a check digit (0-9 or X) that
    satisfies ISO 7064 MOD 11-2, a real birth date ``YYYYMMDD`` from 1900
    and not after today (China Standard Time). 15-digit legacy numbers are
    refused. Raises ``InvalidNationalId``; the message never echoes the input.
    """
    if not isinstance(raw, str):
        raise InvalidNationalId("national ID must be a string")
    s = "".join(unicodedata.normalize("NFKC", raw).split()).upper()
    if len(s) == 15 and s.isascii() and s.isdigit():
        raise InvalidNationalId(
            "15-digit legacy national ID numbers are not accepted; use the 18-character number"
        )
    if _ID_RE.fullmatch(s) is None:
        raise InvalidNationalId(
            "national ID must be 18 characters: 17 digits and a check digit (0-9 or X)"
        )
    try:
        born = dt.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        raise InvalidNationalId("national ID has an invalid birth date") from None
    if born.year < 1900:
        raise InvalidNationalId("national ID has an invalid birth date (before 1900)")
    if born > (today or dt.datetime.now(CST).date()):
        raise InvalidNationalId("national ID has an invalid birth date (in the future)")
    if check_digit(s[:17]) != s[17]:
        raise InvalidNationalId("national ID check digit does not match")
    return s


def normalize_phone(raw: str) -> str:
    """A mainland mobile number as 11 digits (``+86``, ``0086``, spaces, dashes allowed)."""
    if not isinstance(raw, str):
        raise InvalidPhone("phone number must be a string")
    s = _PHONE_SEPARATORS.sub("", unicodedata.normalize("NFKC", raw))
    for prefix in ("+86", "0086"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    else:
        if len(s) == 13 and s.startswith("86"):
            s = s[2:]
    if _PHONE_RE.fullmatch(s) is None:
        raise InvalidPhone("phone must be a mainland mobile number: 11 digits starting with 1")
    return s


# --------------------------------------------------------------------------- masking


def _mask_middle(s: str, head: int, tail: int) -> str:
    if len(s) <= head + tail:
        return "*" * len(s)
    return s[:head] + "*" * (len(s) - head - tail) + s[len(s) - tail :]


def mask_id(national_id: str) -> str:
    """``110101199003071234`` -> ``110***********1234`` (3 + stars + 4)."""
    return _mask_middle(national_id, 3, 4)


def mask_phone(phone: str) -> str:
    """``13812341234`` -> ``138****1234``."""
    return _mask_middle(phone, 3, 4)


def mask_name(name: str) -> str:
    """``张三丰`` -> ``张*丰``, ``张三`` -> ``张*``, ``欧阳娜娜`` -> ``欧**娜``."""
    name = name.strip()
    if len(name) <= 1:
        return "*" * len(name)
    if len(name) == 2:
        return name[0] + "*"
    return name[0] + "*" * (len(name) - 2) + name[-1]


# --------------------------------------------------------------------------- log redaction

_D = "[0-9\uff10-\uff19]"  # ASCII and full-width digits
_REDACT_ID = re.compile(
    rf"(?<!{_D}){_D}{{17}}(?:{_D}|[XxＸｘ])(?!{_D})"  # 18 characters
    rf"|(?<!{_D}){_D}{{15}}(?!{_D})"  # legacy 15 digits
)
_REDACT_PHONE = re.compile(
    rf"(?<!{_D})(?:(?:\+|00)?86[\s-]?)?[1１]{_D}{_D}[\s-]?{_D}{{4}}[\s-]?{_D}{{4}}(?!{_D})"
)


def _mask_found_phone(m: re.Match[str]) -> str:
    digits = [c for c in unicodedata.normalize("NFKC", m.group(0)) if c.isdigit()]
    return mask_phone("".join(digits[-11:]))


def redact(text: str) -> str:
    """Mask every 18- (or legacy 15-) character ID and mainland mobile number in ``text``.

    Digit runs are matched only whole (not inside a longer run of digits);
    a hex hash that happens to hold 11 digits in a row gets masked too: we
    err on the side of hiding.
    """
    text = _REDACT_ID.sub(lambda m: mask_id(m.group(0)), text)
    return _REDACT_PHONE.sub(_mask_found_phone, text)


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        text = str(value)
        red = redact(text)
        return value if red == text else red
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    red = redact(str(value))
    return value if red == str(value) else red


def redact_processor(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact every value of the event (put it last before rendering)."""
    return {k: _redact_value(v) for k, v in event_dict.items()}


class RedactingFilter(logging.Filter):
    """``logging`` filter: the formatted message and exception text are redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


# --------------------------------------------------------------------------- encryption


class CryptoConfigError(ValueError):
    """The key configuration is missing or malformed (never carries key material)."""


class DecryptionError(ValueError):
    """A blob does not decrypt: wrong row/column (AAD), unknown key, or tampered."""


_VERSION = 1
_KID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
_NONCE = 12
_TAG = 16


def _aad(header: bytes, table: str, column: str, row_id: str) -> bytes:
    out = bytearray(header)
    for part in (table, column, row_id):
        if not part:
            raise ValueError("table, column and row_id are required for encryption")
        b = part.encode()
        out += struct.pack(">H", len(b)) + b
    return bytes(out)


class Crypto:
    """Field encryption (AES-256-GCM, versioned key ring) and keyed hashing.

    Blob format: ``0x01 | len(key_id) | key_id | nonce(12) | ciphertext+tag``.
    The AAD is the header plus table, column and row id (length-prefixed), so
    a blob copied to another row or column, or relabelled with another key
    id, fails to decrypt. Rotation: add a new key to the ring and make it
    active; old blobs still decrypt by their embedded key id. The HMAC key is
    separate and does not rotate with the data keys (it names patients).
    """

    __slots__ = ("_active", "_aead", "_hmac_key", "_raw", "dev")

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active: str,
        hmac_key: bytes,
        *,
        dev: bool = False,
    ) -> None:
        if not keys:
            raise CryptoConfigError("at least one data key is required")
        aead: dict[str, AESGCM] = {}
        for kid, key in keys.items():
            if _KID_RE.fullmatch(kid) is None:
                raise CryptoConfigError("key ids must match [A-Za-z0-9_-]{1,32}")
            if len(key) != 32:
                raise CryptoConfigError(f"data key {kid} must be 32 bytes (AES-256)")
            aead[kid] = AESGCM(key)
        if active not in aead:
            raise CryptoConfigError(f"active key {active!r} is not in the key ring")
        if len(hmac_key) < 32:
            raise CryptoConfigError("the HMAC key must be at least 32 bytes")
        self._aead = aead
        self._raw = {kid: bytes(key) for kid, key in keys.items()}
        self._active = active
        self._hmac_key = bytes(hmac_key)
        #: True for throwaway keys from ``generate_dev``: never for real data.
        self.dev = dev

    def __repr__(self) -> str:
        return f"Crypto(active={self._active!r}, keys={sorted(self._aead)!r}, dev={self.dev})"

    def weak_keys(self) -> list[tuple[str, str]]:
        """(which key, what is wrong) for every key unfit for production (never the key)."""
        from engine.secret_strength import key_problem

        out = []
        for kid, key in self._raw.items():
            why = key_problem(key)
            if why is not None:
                out.append((f"data key {kid}", why))
        why = key_problem(self._hmac_key)
        if why is not None:
            out.append(("HMAC key", why))
        return out

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._aead)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Crypto:
        """Keys from ``HAOYUAN_DATA_KEYS`` (``kid1:base64,kid2:base64``),
        ``HAOYUAN_ACTIVE_KEY`` (default: the last key listed) and
        ``HAOYUAN_HMAC_KEY`` (base64, at least 32 bytes)."""
        env = os.environ if environ is None else environ
        spec = env.get("HAOYUAN_DATA_KEYS", "").strip()
        if not spec:
            raise CryptoConfigError("HAOYUAN_DATA_KEYS is not set")
        keys: dict[str, bytes] = {}
        for item in spec.split(","):
            kid, sep, b64 = item.strip().partition(":")
            if not sep or not kid:
                raise CryptoConfigError("HAOYUAN_DATA_KEYS entries must be key_id:base64")
            if kid in keys:
                raise CryptoConfigError(f"data key {kid} is listed twice")
            keys[kid] = _b64(b64, f"data key {kid}")
        active = env.get("HAOYUAN_ACTIVE_KEY", "").strip() or list(keys)[-1]
        hmac_b64 = env.get("HAOYUAN_HMAC_KEY", "").strip()
        if not hmac_b64:
            raise CryptoConfigError("HAOYUAN_HMAC_KEY is not set")
        return cls(keys, active, _b64(hmac_b64, "HMAC key"))

    @classmethod
    def generate_dev(cls) -> Crypto:
        """Random throwaway keys for demos and tests (key id ``dev``, ``dev=True``)."""
        return cls({"dev": AESGCM.generate_key(256)}, "dev", secrets.token_bytes(32), dev=True)

    def with_active(self, key_id: str, key: bytes | None = None) -> Crypto:
        """A copy with ``key_id`` (added when ``key`` is given) as the active key."""
        keys = dict(self._raw)
        if key is not None:
            keys[key_id] = key
        return Crypto(keys, key_id, self._hmac_key, dev=self.dev)

    # ---------------------------------------------------------------- encryption

    def encrypt(self, value: str, *, table: str, column: str, row_id: str) -> bytes:
        kid = self._active.encode()
        header = bytes((_VERSION, len(kid))) + kid
        nonce = os.urandom(_NONCE)
        ct = self._aead[self._active].encrypt(
            nonce, value.encode(), _aad(header, table, column, row_id)
        )
        return header + nonce + ct

    def decrypt(self, blob: bytes, *, table: str, column: str, row_id: str) -> str:
        blob = bytes(blob)
        if len(blob) < 2 or blob[0] != _VERSION:
            raise DecryptionError("not an encrypted field (unknown format version)")
        end = 2 + blob[1]
        kid = blob[2:end].decode("ascii", "replace")
        aead = self._aead.get(kid)
        if aead is None:
            raise DecryptionError(f"unknown data key {kid!r}")
        if len(blob) < end + _NONCE + _TAG:
            raise DecryptionError("encrypted field is truncated")
        nonce = blob[end : end + _NONCE]
        try:
            pt = aead.decrypt(nonce, blob[end + _NONCE :], _aad(blob[:end], table, column, row_id))
        except InvalidTag:
            raise DecryptionError(
                "encrypted field does not authenticate (wrong row or column, or tampered)"
            ) from None
        return pt.decode()

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        """The key id a blob was encrypted under (for rotation jobs)."""
        if len(blob) < 2 or blob[0] != _VERSION:
            raise DecryptionError("not an encrypted field (unknown format version)")
        return bytes(blob[2 : 2 + blob[1]]).decode("ascii", "replace")

    # ---------------------------------------------------------------- keyed hashes

    def _hmac(self, domain: str, value: str) -> str:
        msg = f"haoyuan:{domain}:v1\x00{value}".encode()
        return hmac.new(self._hmac_key, msg, hashlib.sha256).hexdigest()

    def id_hash(self, national_id: str) -> str:
        """The patient ref: HMAC-SHA256 (hex) of the normalised national ID.

        The input is normalised first (raises ``InvalidNationalId``), so
        ``11010119900307123x`` and ``11010119900307123X`` name one patient.
        """
        return self._hmac("national-id", normalize_national_id(national_id))

    def client_hash(self, address: str) -> str:
        """Keyed hash of a client address (per-client limits; never the address itself)."""
        return self._hmac("client", address)[:32]

    def openid_hash(self, openid: str) -> str:
        """Keyed hash of a WeChat openid (accounts are looked up by it)."""
        if not openid:
            raise ValueError("openid is required")
        return self._hmac("openid", openid)


def dev_crypto() -> Crypto:
    """Fixed development keys, the same in every process (never for real data)."""
    data = hashlib.sha256(b"haoyuan development data key").digest()
    mac = hashlib.sha256(b"haoyuan development hmac key").digest()
    return Crypto({"dev": data}, "dev", mac, dev=True)


#: What a development instance says in every start-up log and in /readyz.
DEV_WARNING = ("development mode: development secrets, development data keys and dev-<openid>"
               " logins are enabled; never run it with real patients or payments")


def is_development(environ: Mapping[str, str] | None = None) -> bool:
    """``HAOYUAN_ENV`` is ``development`` (or ``dev``): production unless so."""
    env = os.environ if environ is None else environ
    return env.get("HAOYUAN_ENV", "").strip().lower() in ("development", "dev")


def worker_crypto(environ: Mapping[str, str] | None = None, *, worker: str) -> Crypto:
    """The patient data keys of a background worker that decrypts (the HIS
    forwarder): ``HAOYUAN_DATA_KEYS`` and ``HAOYUAN_HMAC_KEY``. A production
    worker refuses missing, development or weak keys, naming each problem
    (``engine.config.ConfigError``; never a key); a development one without
    keys uses the development keys."""
    from engine.config import ConfigError

    env = os.environ if environ is None else environ
    dev = is_development(env)
    if dev and not env.get("HAOYUAN_DATA_KEYS") and not env.get("HAOYUAN_HMAC_KEY"):
        return dev_crypto()
    try:
        crypto = Crypto.from_env(env)
    except CryptoConfigError as exc:
        raise ConfigError(f"haoyuan {worker} refuses to start: {exc}") from None
    if not dev:
        problems = [f"{'HAOYUAN_HMAC_KEY' if w == 'HMAC key' else 'HAOYUAN_DATA_KEYS'}: {w}: {why}"
                    for w, why in crypto.weak_keys()]
        if problems:
            raise ConfigError(f"haoyuan {worker} refuses to start (production: HAOYUAN_ENV is"
                              " not development): weak patient data keys:\n  - "
                              + "\n  - ".join(problems))
    return crypto


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CryptoConfigError(f"{what} is not valid base64") from None
