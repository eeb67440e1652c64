"""Load test of the release-morning spike (Locust): see loadtest/README.md.

This package's top level holds the scenario's pure helpers, free of Locust
and of the project (a remote load generator needs only Locust, and tests can
import them without gevent's monkey-patching):

- ``national_id`` / ``phone`` / ``person_name``: valid-looking personal data
  (18-character resident IDs with a correct ISO 7064 MOD 11-2 check digit);
- ``ZipfPicker``: doctor popularity (a few famous doctors take most demand);
- ``sign_payment``: the payment side's callback signature;
- ``request_name`` / ``parse_name``: the ``"POST /v1/holds [sold-out]"``
  naming of requests by route and outcome, which is what the CSV and HTML
  reports group by;
- ``build_summary``: the JSON summary read by the demo and CI.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import hmac
import itertools
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

__all__ = [
    "BOT_PREFIX",
    "ZipfPicker",
    "build_summary",
    "check_digit",
    "national_id",
    "parse_name",
    "parse_think",
    "person_name",
    "phone",
    "problem_slug",
    "request_name",
    "sign_payment",
]

T = TypeVar("T")

# --------------------------------------------------------------------------- personal data

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"
#: County-level division codes (GB/T 2260), one or two per province.
REGIONS = (
    "110101", "110105", "110108", "120101", "130102", "140105", "150102", "210102",
    "220102", "230102", "310101", "310104", "310115", "320102", "320505", "330102",
    "330106", "340102", "350102", "360102", "370102", "410102", "420102", "430102",
    "440103", "440304", "440305", "450102", "460105", "500103", "510104", "520102",
    "530102", "540102", "610102", "620102", "630102", "640104", "650102",
)
_BORN_FROM = dt.date(1935, 1, 1)
_BORN_DAYS = (dt.date(2020, 12, 31) - _BORN_FROM).days
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡"
    "余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯"
    "龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
_GIVEN = (
    "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华玉萍红鹏飞建国文斌宇浩凯晨"
    "欣怡子涵梓轩一诺雨桐佳琪思远志华海燕丹婷雪梅俊杰嘉怡"
)


def check_digit(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits of a resident ID."""
    total = sum(int(c) * w for c, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def national_id(rng: random.Random) -> str:
    """A valid 18-character resident ID: region, birth date (1935–2020), sequence, check."""
    born = _BORN_FROM + dt.timedelta(days=rng.randrange(_BORN_DAYS + 1))
    first17 = f"{rng.choice(REGIONS)}{born:%Y%m%d}{rng.randrange(1000):03d}"
    return first17 + check_digit(first17)


def phone(rng: random.Random) -> str:
    """A mainland mobile number (11 digits, 13x–19x)."""
    return f"1{rng.choice('3456789')}{rng.randrange(10**9):09d}"


def person_name(rng: random.Random) -> str:
    return rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2))))


# --------------------------------------------------------------------------- popularity


class ZipfPicker(Generic[T]):
    """Pick items by Zipf's law: rank k (1 = most popular) has weight 1 / k**s.

    With s = 1.2 and 20 doctors the first takes about 30% of the picks and the
    first three about half: a few famous doctors take most of the demand.
    ``exclude`` drops items (sold out) and renormalises over the rest.
    """

    def __init__(self, items: Sequence[T], s: float = 1.2) -> None:
        if s < 0:
            raise ValueError("the Zipf exponent must be >= 0")
        self.items = list(items)
        self.s = s
        self.weights = [1.0 / (k**s) for k in range(1, len(self.items) + 1)]
        self._cum = list(itertools.accumulate(self.weights))

    def __len__(self) -> int:
        return len(self.items)

    def share(self, rank: int) -> float:
        """Expected share of the item at ``rank`` (0-based) with nothing excluded."""
        return self.weights[rank] / self._cum[-1]

    def pick(self, rng: random.Random, exclude: Iterable[T] = ()) -> T | None:
        """One item, or None if every item is excluded (or there are none)."""
        ex = set(exclude)
        if not ex:
            if not self.items:
                return None
            i = bisect.bisect_right(self._cum, rng.random() * self._cum[-1])
            return self.items[min(i, len(self.items) - 1)]
        pool = [(it, w) for it, w in zip(self.items, self.weights, strict=True) if it not in ex]
        if not pool:
            return None
        return rng.choices([it for it, _ in pool], weights=[w for _, w in pool])[0]


# --------------------------------------------------------------------------- payment


def sign_payment(secret: str, timestamp: int | str, body: bytes, *, method: str = "POST",
                 path: str) -> str:
    """``X-Payment-Signature``: hex HMAC-SHA256(secret,
    ``"v2\\n{timestamp}\\n{METHOD}\\n{path}\\n" + raw body``); the path names the hold."""
    msg = f"v2\n{timestamp}\n{method.upper()}\n{path}\n".encode("utf-8", "surrogatepass") + body
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- parameters


def parse_think(text: str | float) -> tuple[float, float]:
    """``"1-3"`` -> (1.0, 3.0); ``"2"`` -> (2.0, 2.0); seconds, low <= high."""
    if isinstance(text, int | float):
        lo = hi = float(text)
    else:
        lo_s, sep, hi_s = str(text).strip().partition("-")
        lo = float(lo_s)
        hi = float(hi_s) if sep else lo
    if lo < 0 or hi < lo:
        raise ValueError("think time must be 'seconds' or 'low-high' with 0 <= low <= high")
    return lo, hi


# --------------------------------------------------------------------------- request names

BOT_PREFIX = "bot "
_NAME_RE = re.compile(r"^(?P<bot>bot )?(?P<method>[A-Z]+) (?P<route>\S+) \[(?P<outcome>[^\]]+)\]$")


def request_name(method: str, route: str, outcome: str, *, bot: bool = False) -> str:
    """``"POST /v1/holds [sold-out]"``; bots' requests get a ``"bot "`` prefix."""
    return f"{BOT_PREFIX if bot else ''}{method} {route} [{outcome}]"


def parse_name(name: str) -> tuple[bool, str, str, str] | None:
    """(bot, method, route, outcome) of a name made by ``request_name``, else None."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return bool(m["bot"]), m["method"], m["route"], m["outcome"]


def problem_slug(body: Any) -> str | None:
    """``"sold-out"`` of a problem+json body ``{"type": "/problems/sold-out", ...}``."""
    if isinstance(body, Mapping):
        t = body.get("type")
        if isinstance(t, str) and t:
            return t.rstrip("/").rsplit("/", 1)[-1] or None
    return None


def is_5xx(outcome: str) -> bool:
    return outcome[:1] == "5" and outcome[:3].isdigit()


# --------------------------------------------------------------------------- summary

#: Outcome names of the scenario's successes (see locustfile).
HELD, BOOKED, RELEASED, CANCELLED = "held", "booked", "released", "cancelled"
TRANSPORT = "transport-error"
HOLDS_ROUTE = "/v1/holds"
CONFIRM_ROUTE = "/v1/holds/{id}/confirm"
RELEASE_ROUTE = "/v1/holds/{id}"
CANCEL_ROUTE = "/v1/bookings/{id}/cancel"
PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def _pct(entry: Any) -> dict[str, int]:
    if not entry.num_requests:
        return {k: 0 for k, _ in PERCENTILES}
    return {k: int(entry.get_response_time_percentile(q)) for k, q in PERCENTILES}


def build_summary(stats: Any, scenario: Mapping[str, int] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's summary from Locust's ``RequestStats`` (duck-typed: ``entries``
    of objects with ``method``, ``name``, ``num_requests``, ``num_failures``,
    ``get_response_time_percentile(q)``; and ``total``).

    ``holds``/``confirms``/``releases``/``cancels`` count successful answers
    (patients and bots); ``net_holds`` = holds - releases - cancels is the
    most units the run can have taken at once, so it must not exceed the
    capacity on offer (units released or cancelled go back and may be held
    again); nor may ``net_bookings`` = confirms - cancels. ``status_5xx`` and
    ``transport_errors`` are the failures that matter; 409 and 429 are
    outcomes, not failures.
    """
    outcomes: dict[str, dict[str, int]] = {}
    by_name: dict[str, dict[str, int]] = {}
    ok_counts = {HELD: 0, BOOKED: 0, RELEASED: 0, CANCELLED: 0}
    key_route = {HELD: HOLDS_ROUTE, BOOKED: CONFIRM_ROUTE, RELEASED: RELEASE_ROUTE,
                 CANCELLED: CANCEL_ROUTE}
    n5xx = transport = unnamed = 0
    bot_requests = 0
    for e in sorted(stats.entries.values(), key=lambda e: (e.name, e.method)):
        if not e.num_requests and not e.num_failures:
            continue
        by_name[e.name] = {"requests": e.num_requests, "failures": e.num_failures, **_pct(e)}
        parsed = parse_name(e.name)
        if parsed is None:
            unnamed += e.num_requests
            continue
        bot, method, route, outcome = parsed
        if bot:
            bot_requests += e.num_requests
        per = outcomes.setdefault(f"{BOT_PREFIX if bot else ''}{method} {route}", {})
        per[outcome] = per.get(outcome, 0) + e.num_requests
        if is_5xx(outcome):
            n5xx += e.num_requests
        elif outcome == TRANSPORT:
            transport += e.num_requests
        elif outcome in ok_counts and key_route[outcome] == route:
            ok_counts[outcome] += e.num_requests
    total = stats.total
    holds, confirms = ok_counts[HELD], ok_counts[BOOKED]
    releases, cancels = ok_counts[RELEASED], ok_counts[CANCELLED]
    out: dict[str, Any] = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "status_5xx": n5xx,
        "transport_errors": transport,
        "unnamed_requests": unnamed,
        "bot_requests": bot_requests,
        "holds": holds,
        "confirms": confirms,
        "releases": releases,
        "cancels": cancels,
        "net_holds": holds - releases - cancels,
        "net_bookings": confirms - cancels,
        **_pct(total),
        "rps": round(float(getattr(total, "total_rps", 0.0) or 0.0), 1),
        "outcomes": outcomes,
        "by_name": by_name,
        "scenario": dict(sorted((scenario or {}).items())),
    }
    if extra:
        out.update(extra)
    return out
