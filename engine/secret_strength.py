"""Is a secret strong enough to run with? One place for every process that holds one.

``secret_problem(text)`` and ``key_problem(raw bytes)`` answer None for a
secret fit for production, else a short reason that never contains the value.
They refuse:

- known development values (the ones published in this repository) and
  anything built from them;
- short ones: fewer than 32 characters (text) or 32 bytes (keys);
- trivial ones: one character or byte repeated, all-zero keys, few distinct
  characters, a short pattern repeated (a period), long ascending or
  descending runs (``abcdef…``, ``0123…``), the same pieces again and again
  (more than a quarter of its 4-grams seen before);
- low estimated entropy: the empirical Shannon entropy of the value times its
  length, which underestimates a random value (a 43-character
  ``secrets.token_urlsafe(32)`` scores about 200 bits) and is far below the
  bar for anything a person types.

Generate secrets with ``python -c 'import secrets; print(secrets.token_urlsafe(32))'``
and keys with ``python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "DEV_KEY_MATERIAL",
    "DEV_SECRETS",
    "MIN_KEY_BYTES",
    "MIN_SECRET_CHARS",
    "key_problem",
    "secret_problem",
]

MIN_SECRET_CHARS = 32
MIN_KEY_BYTES = 32
MIN_DISTINCT_CHARS = 8
MIN_DISTINCT_BYTES = 16
#: Estimated bits (empirical Shannon entropy x length); 32 random hex digits score ~110.
MIN_BITS = 90.0

#: Development values published in this repository: never valid in production.
DEV_SECRETS: dict[str, str] = {
    "admin_token": "dev-admin-token",
    "payment_secret": "dev-payment-secret",
    "token_secret": "dev-token-secret",
    "ops_token": "dev-ops-token",
}
#: The development data and HMAC keys (``api.settings.dev_crypto``).
DEV_KEY_MATERIAL: tuple[bytes, ...] = (
    hashlib.sha256(b"haoyuan development data key").digest(),
    hashlib.sha256(b"haoyuan development hmac key").digest(),
)
_DEV_WORDS = ("development", "changeme", "password", "secret123", "example")


def _bits(values: Sequence[int] | str) -> float:
    n = len(values)
    counts = Counter(values)
    return -sum(c * math.log2(c / n) for c in counts.values())


def _period(values: Sequence[int] | str) -> int:
    """The shortest p such that the value repeats itself every p items."""
    n = len(values)
    for p in range(1, n // 2 + 1):
        if all(values[i] == values[i - p] for i in range(p, n)):
            return p
    return n


def _run_share(codes: Sequence[int]) -> float:
    """Share of neighbours that step by -1, 0 or +1 (``aaaa``, ``abcd``, ``4321``)."""
    if len(codes) < 2:
        return 1.0
    steps = sum(1 for a, b in itertools.pairwise(codes) if abs(a - b) <= 1)
    return steps / (len(codes) - 1)


def _repeated_share(values: bytes | str, n: int = 4) -> float:
    """Share of the n-grams that occurred before (random values: almost none)."""
    grams = [values[i:i + n] for i in range(len(values) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _trivial(values: bytes | str, codes: Sequence[int], min_distinct: int) -> str | None:
    distinct = len(set(values))
    if distinct == 1:
        return "one character repeated"
    if distinct < min_distinct:
        return f"only {distinct} distinct characters (at least {min_distinct})"
    if _period(values) < len(values):
        return "a short pattern repeated"
    if _run_share(codes) > 0.5:
        return "mostly a run of neighbouring characters"
    if _repeated_share(values) > 0.25:
        return "repetitive (the same pieces again and again)"
    return None


def secret_problem(value: str) -> str | None:
    """What is wrong with a text secret (a token, a signing secret), or None."""
    if not value:
        return "not set"
    low = value.lower()
    if any(low == d or d in low for d in DEV_SECRETS.values()) or any(
            w in low for w in _DEV_WORDS):
        return "a development or placeholder value"
    if len(value) < MIN_SECRET_CHARS:
        return f"too short ({len(value)} characters; at least {MIN_SECRET_CHARS})"
    codes = [ord(c) for c in value]
    why = _trivial(value, codes, MIN_DISTINCT_CHARS)
    if why is not None:
        return f"trivial ({why})"
    if _bits(value) < MIN_BITS:
        return "too little entropy"
    return None


def key_problem(key: bytes, *, min_bytes: int = MIN_KEY_BYTES) -> str | None:
    """What is wrong with raw key material (a data key, the HMAC key), or None."""
    if not key:
        return "not set"
    if len(key) < min_bytes:
        return f"too short ({len(key)} bytes; at least {min_bytes})"
    if any(d in key for d in DEV_KEY_MATERIAL):
        return "a development key"
    why = _trivial(key, list(key), MIN_DISTINCT_BYTES)
    if why is not None:
        return f"trivial ({why.replace('characters', 'bytes').replace('character', 'byte')})"
    if _bits(key) < MIN_BITS:
        return "too little entropy"
    return None
