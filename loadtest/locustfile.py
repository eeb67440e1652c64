"""Release morning, as patients and bots live it (Locust, FastHttpUser).

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --csv reports/spike --html reports/spike.html --hy-summary reports/spike.json

Each ``Patient`` is one WeChat account (a unique ``dev-<openid>`` login
code) that binds one real-name patient with a generated valid national ID,
then lives one release morning:

1. browse the sessions of ``--hy-date`` (or, without a date, of the next 31
   days, keeping the next release batch) and pick a doctor by popularity
   (Zipf, ``--hy-skew``; doctors ranked by fee, then id: the famous ones
   charge more), one of the doctor's sessions and a slot;
2. the refresh storm: read the session's availability every
   ``--hy-refresh`` seconds until the release instant (learnt from the
   session list, the availability answer or a not-open answer; clocks are
   aligned on the ``server_ms`` the API reports); ``--hy-eager`` of them
   start pressing "book" two seconds early and get not-open answers;
3. grab at the instant (plus a human reaction time): POST /v1/holds with an
   Idempotency-Key (kept across retries of the same press); on 429 wait the
   Retry-After; on sold-out read the department-day availability and fall
   back to another slot, another session of the doctor, or another doctor
   of the department (Zipf again), at most ``--hy-fallbacks`` times; users
   who lose keep checking every few seconds for a unit coming back;
4. think (``--hy-think``), then pay: the payment side's signed callback
   (``X-Payment-Signature``); or abandon (``--hy-abandon``): half release the
   hold, half walk away and let it expire;
5. some cancel later (``--hy-cancel``); everyone looks at their bookings now
   and then.

``Bot`` accounts (``--hy-bots`` of the users) bind three patients and
hammer POST /v1/holds on the most popular doctors without think time or
respect for Retry-After (``--hy-bot-pause`` throttles them): what the
per-account and per-patient rate limits are for. Their requests are named
``bot POST /v1/holds [...]``.

Every request is named by route and outcome (``POST /v1/holds [sold-out]``),
so the CSV and HTML reports give p50/p95/p99 per endpoint and outcome. 409
and 429 answers are outcomes, not failures; 5xx, transport errors and
answers the scenario does not expect (401, 422, ...) are failures. At test
stop and at exit the master (or the single process) writes a JSON summary
to ``--hy-summary``: see ``loadtest.build_summary``.

The load shape is ``SpikeShape`` (loadtest/shapes.py): quiet, a steep ramp
ending at the release instant, a plateau, a decay; the run ends by itself
after ``--hy-total-s``. ``HAOYUAN_LOAD_SHAPE=off`` drops it, so that
``--users``/``--spawn-rate``/``--run-time`` apply instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, LoadTestShape, events, task
from locust.runners import MasterRunner, WorkerRunner

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `locust -f loadtest/locustfile.py` from anywhere
    sys.path.insert(0, _ROOT)

from loadtest import (  # noqa: E402
    CANCEL_ROUTE,
    CONFIRM_ROUTE,
    HOLDS_ROUTE,
    RELEASE_ROUTE,
    TRANSPORT,
    ZipfPicker,
    build_summary,
    national_id,
    parse_think,
    person_name,
    phone,
    problem_slug,
    request_name,
    sign_payment,
)
from loadtest.shapes import SpikeParams, SpikeShapeMixin  # noqa: E402

log = logging.getLogger("haoyuan.loadtest")
CST = dt.timezone(dt.timedelta(hours=8), "CST")

# --------------------------------------------------------------------------- options


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    env = os.environ.get
    add = parser.add_argument
    add("--hy-date", default=env("HAOYUAN_LOAD_DATE", ""),
        help="date whose sessions are booked, YYYY-MM-DD (env HAOYUAN_LOAD_DATE); "
             "empty: the next release batch of the coming 31 days")
    add("--hy-dept", default=env("HAOYUAN_LOAD_DEPT", ""),
        help="only this department's sessions (empty: all)")
    add("--hy-release-in", type=float, default=10.0,
        help="seconds from the start of the run to the release instant (the shape's ramp "
             "ends there; users use it only if the API does not tell them)")
    add("--hy-release-at-ms", type=int, default=0,
        help="the release instant as epoch ms (overrides --hy-release-in for the shape)")
    # No default value here: Locust's web UI ships defaults inside its page.
    add("--hy-payment-secret", default="", is_secret=True,
        help="payment callback HMAC secret (default: env HAOYUAN_PAYMENT_SECRET, else the "
             "API's development secret)")
    add("--hy-pay-url", default=env("HAOYUAN_LOAD_PAY_URL", ""),
        help="pay through this WeChat Pay simulator (engine.testing.payment_simulator): it "
             "POSTs the signed notification to the API's /v1/payments/wechat/notify (env "
             "HAOYUAN_LOAD_PAY_URL); empty: the generic signed callback")
    add("--hy-abandon", type=float, default=0.1, help="fraction of holds abandoned")
    add("--hy-cancel", type=float, default=0.05, help="fraction of bookings cancelled later")
    add("--hy-bots", type=float, default=0.05, help="fraction of users that are bots")
    add("--hy-bot-pause", type=float, default=0.0,
        help="seconds between a bot's requests (0: hammer)")
    add("--hy-think", default="1-3", help="seconds between hold and payment, 'low-high' or 's'")
    add("--hy-refresh", default="0.5-1.5",
        help="seconds between availability refreshes before the instant")
    add("--hy-skew", type=float, default=1.2, help="Zipf exponent of doctor popularity")
    add("--hy-eager", type=float, default=0.2,
        help="fraction of patients who press 'book' before the instant")
    add("--hy-fallbacks", type=int, default=5, help="fallback grabs after a sold-out")
    add("--hy-seed", type=int, default=0, help="random seed of the users' choices (0: random)")
    add("--hy-summary", default=env("HAOYUAN_LOAD_SUMMARY", ""),
        help="write the JSON summary here at test stop and exit")
    d = SpikeParams()
    add("--hy-quiet-users", type=int, default=d.quiet_users, help="shape: users before and after")
    add("--hy-peak-users", type=int, default=d.peak_users, help="shape: users at the peak")
    add("--hy-ramp-s", type=float, default=d.ramp_s,
        help="shape: seconds of the ramp, ending at the release instant")
    add("--hy-hold-s", type=float, default=d.hold_s, help="shape: seconds at the peak")
    add("--hy-decay-s", type=float, default=d.decay_s, help="shape: seconds of the decay")
    add("--hy-total-s", type=float, default=d.total_s,
        help="shape: the run ends after this many seconds")


@dataclass(slots=True)
class Config:
    date: str = ""
    dept: str = ""
    release_in_s: float = 10.0
    release_at_ms: int = 0
    payment_secret: str = "dev-payment-secret"
    pay_url: str = ""
    abandon: float = 0.1
    cancel: float = 0.05
    bots: float = 0.05
    bot_pause: float = 0.0
    think: tuple[float, float] = (1.0, 3.0)
    refresh: tuple[float, float] = (0.5, 1.5)
    skew: float = 1.2
    eager: float = 0.2
    fallbacks: int = 5
    seed: int = 0
    summary: str = ""

    @classmethod
    def from_options(cls, o: Any) -> Config:
        if o is None:
            return cls()
        g = getattr
        return cls(
            date=str(g(o, "hy_date", "") or "").strip(),
            dept=str(g(o, "hy_dept", "") or "").strip(),
            release_in_s=float(g(o, "hy_release_in", 10.0)),
            release_at_ms=int(g(o, "hy_release_at_ms", 0) or 0),
            payment_secret=str(g(o, "hy_payment_secret", "") or "")
            or os.environ.get("HAOYUAN_PAYMENT_SECRET", "") or "dev-payment-secret",
            pay_url=str(g(o, "hy_pay_url", "") or "").rstrip("/"),
            abandon=_fraction(g(o, "hy_abandon", 0.1)),
            cancel=_fraction(g(o, "hy_cancel", 0.05)),
            bots=_fraction(g(o, "hy_bots", 0.05)),
            bot_pause=max(0.0, float(g(o, "hy_bot_pause", 0.0))),
            think=parse_think(g(o, "hy_think", "1-3")),
            refresh=parse_think(g(o, "hy_refresh", "0.5-1.5")),
            skew=float(g(o, "hy_skew", 1.2)),
            eager=_fraction(g(o, "hy_eager", 0.2)),
            fallbacks=max(0, int(g(o, "hy_fallbacks", 5))),
            seed=int(g(o, "hy_seed", 0) or 0),
            summary=str(g(o, "hy_summary", "") or ""),
        )

    def public(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__ if k != "payment_secret"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _fraction(v: Any) -> float:
    f = float(v)
    if not 0.0 <= f <= 1.0:
        raise ValueError("fractions must be within 0..1")
    return f


# --------------------------------------------------------------------------- run state


@dataclass(slots=True)
class Session:
    session_id: str
    dept: str
    doctor: str
    date: str
    fee: int
    release_at_ms: int
    slots: list[tuple[str, int]]  # (slot id, capacity)
    status: str = "open"


@dataclass(slots=True)
class Catalog:
    """The target sessions of the run, as the first browse of this process saw them."""

    sessions: dict[str, Session]
    by_doctor: dict[str, list[Session]]
    popularity: ZipfPicker[str]  # doctors, most popular first
    rank: dict[str, int]  # doctor -> 1-based popularity rank
    capacity: int

    @classmethod
    def build(cls, sessions: list[Session], skew: float) -> Catalog:
        by_doctor: dict[str, list[Session]] = {}
        fee: dict[str, int] = {}
        for s in sessions:
            by_doctor.setdefault(s.doctor, []).append(s)
            fee[s.doctor] = max(fee.get(s.doctor, 0), s.fee)
        ranked = sorted(by_doctor, key=lambda d: (-fee[d], d))
        return cls(
            sessions={s.session_id: s for s in sessions},
            by_doctor=by_doctor,
            popularity=ZipfPicker(ranked, skew),
            rank={d: i for i, d in enumerate(ranked, 1)},
            capacity=sum(c for s in sessions for _, c in s.slots),
        )


@dataclass(slots=True)
class Run:
    """Per-process state of the current run (reset at every test start)."""

    cfg: Config = field(default_factory=Config)
    started_ms: float = field(default_factory=lambda: time.time() * 1000)
    counters: Counter[str] = field(default_factory=Counter)
    catalog: Catalog | None = None
    #: Server clock minus local clock, from the ``server_ms`` of fast answers.
    offset_ms: float = 0.0
    clock_known: bool = False
    seeds: random.Random = field(default_factory=random.Random)
    warned: set[str] = field(default_factory=set)
    #: What the catalogue offers (for the summary; workers report it to the master).
    target: dict[str, Any] | None = None

    def reset(self, options: Any) -> None:
        self.cfg = Config.from_options(options)
        self.started_ms = time.time() * 1000
        self.counters.clear()
        self.catalog = None
        self.offset_ms = 0.0
        self.clock_known = False
        self.seeds = random.Random(self.cfg.seed or None)
        self.warned.clear()
        self.target = None

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] += n

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(msg, *args)

    def now_ms(self) -> float:
        """The API's clock, as estimated here."""
        return time.time() * 1000 + self.offset_ms

    def learn_clock(self, server_ms: int) -> None:
        """A ``server_ms`` was stamped before the answer travelled, maybe cached a
        few hundred ms: every sample is at most the true server time, so the
        largest offset seen is the best estimate."""
        seen = server_ms - time.time() * 1000
        if not self.clock_known or seen > self.offset_ms:
            self.offset_ms = seen
            self.clock_known = True

    def fallback_release_ms(self) -> float:
        if self.cfg.release_at_ms > 0:
            return float(self.cfg.release_at_ms)
        return self.started_ms + self.cfg.release_in_s * 1000


RUN = Run()


# --------------------------------------------------------------------------- users


@dataclass(slots=True)
class Answer:
    status: int
    outcome: str
    body: Any
    headers: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default) if isinstance(self.body, dict) else default

    def retry_after_s(self, default: float = 1.0) -> float:
        ms = self.get("retry_after_ms")
        if isinstance(ms, int | float) and ms > 0:
            return ms / 1000
        try:
            return float((self.headers or {}).get("retry-after") or default)
        except (TypeError, ValueError):
            return default

    @property
    def transient(self) -> bool:
        """Worth retrying with the same idempotency key: transport error or 5xx."""
        return self.status == 0 or self.status >= 500


_JSON = "application/json"
PAY_ROUTE = "POST WeChat Pay (simulator -> /v1/payments/wechat/notify)"
#: The report's name of a payment: the API's answer to WeChat Pay's notification.
PAY_NAME = "/v1/payments/wechat/notify(wechatpay)"
HOLD_ROUTE = "/v1/holds/{id}"
_SESSIONS = "/v1/sessions"
_SESSION_AVAIL = "/v1/sessions/{id}/availability"
_DEPT_AVAIL = "/v1/departments/{dept}/days/{date}/availability"
_BOOKINGS = "/v1/bookings"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class HaoyuanUser(FastHttpUser):
    """Shared plumbing: named calls, login, binding, browsing. Not run itself."""

    abstract = True
    host = os.environ.get("HAOYUAN_LOAD_HOST", "http://127.0.0.1:8000")
    network_timeout = 30.0
    connection_timeout = 10.0
    bot = False

    def on_start(self) -> None:
        self.cfg = RUN.cfg
        self.rng = random.Random(RUN.seeds.getrandbits(64))
        self.openid = f"lt{uuid.UUID(int=self.rng.getrandbits(128)).hex[:24]}"
        self.token: str | None = None
        self.patients: list[str] = []
        RUN.count("bots" if self.bot else "accounts")

    # ------------------------------------------------------------------ requests
    def call(
        self,
        method: str,
        route: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        expected: tuple[int, ...] = (409, 429),
        ok: str = "ok",
    ) -> Answer:
        """One request, reported as ``"<METHOD> <route> [<outcome>]"``.

        The outcome is ``ok`` (or ``ok``'s value) for 2xx, the problem type's
        slug for 4xx/5xx problems (``sold-out``, ``rate-limited``), prefixed
        by the status for 5xx (``503 unavailable``), ``transport-error`` when
        no answer came. Statuses in ``expected`` are successes in Locust's
        books; 5xx, transport errors and other 4xx are failures.
        """
        h = {"Accept": _JSON}
        if auth and self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if headers:
            h.update(headers)
        data = raw if raw is not None else (None if body is None else _dumps(body))
        if data is not None:
            h["Content-Type"] = _JSON
        with self.client.request(method, path, data=data, headers=h, name=route,
                                 catch_response=True) as r:
            status = int(r.status_code or 0)
            parsed: Any = None
            if status and r.content:
                try:
                    parsed = json.loads(r.content)
                except ValueError:
                    parsed = None
            slug = problem_slug(parsed) if status >= 400 else None
            if status == 0:
                outcome = TRANSPORT
                err = getattr(r, "error", None)
                r.failure(f"no answer: {type(err).__name__ if err else 'error'}")
            elif 200 <= status < 300:
                outcome = ok
                r.success()
            elif status >= 500:
                outcome = f"{status} {slug}" if slug else str(status)
                r.failure(f"server error {outcome}")
            elif status in expected:
                outcome = slug or f"http-{status}"
                r.success()
            else:
                outcome = slug or f"http-{status}"
                r.failure(f"unexpected {status} {outcome}")
            r.request_meta["name"] = request_name(method, route, outcome, bot=self.bot)
            headers_out = r.headers
        if isinstance(parsed, dict) and isinstance(parsed.get("server_ms"), int):
            RUN.learn_clock(parsed["server_ms"])
        if status == 401 and auth:
            self.token = None  # log in again on the next step
        return Answer(status, outcome, parsed, headers_out)

    def pause(self, seconds: float) -> None:
        if seconds > 0:
            gevent.sleep(seconds)

    # ------------------------------------------------------------------ setup
    def login(self) -> bool:
        for attempt in range(4):
            a = self.call("POST", "/v1/auth/wechat", "/v1/auth/wechat",
                          body={"code": f"dev-{self.openid}"}, auth=False, expected=(429,))
            if a.ok and a.get("token"):
                self.token = a.get("token")
                return True
            if a.status == 429 or a.transient:
                self.pause(a.retry_after_s(0.5 * (attempt + 1)))
                continue
            break
        RUN.count("login_failed")
        return False

    def bind_patient(self) -> bool:
        body = {"name": person_name(self.rng), "phone": phone(self.rng),
                "national_id": national_id(self.rng)}
        for attempt in range(4):
            a = self.call("POST", "/v1/patients", "/v1/patients", body=body,
                          expected=(409, 429), ok="created")
            pid = a.get("patient_id")
            if a.ok and isinstance(pid, str):
                self.patients.append(pid)
                RUN.count("patients_bound")
                return True
            if a.status == 429 or a.transient:
                self.pause(a.retry_after_s(0.5 * (attempt + 1)))
                continue
            break
        RUN.count("bind_failed")
        return False

    def ready(self, patients: int = 1) -> bool:
        """Logged in with ``patients`` bound (retried on the next step if not)."""
        if self.token is None and not self.login():
            return False
        while len(self.patients) < patients:
            if not self.bind_patient():
                return False
        return True

    def browse(self) -> Catalog | None:
        """GET /v1/sessions of the date; the first answer of the process is the catalogue."""
        cfg = self.cfg
        if cfg.date:
            first = last = cfg.date
        else:
            today = dt.datetime.now(CST).date()
            first, last = today.isoformat(), (today + dt.timedelta(days=30)).isoformat()
        path = f"{_SESSIONS}?from={first}&to={last}" + (f"&dept={cfg.dept}" if cfg.dept else "")
        a = self.call("GET", _SESSIONS, path, expected=(429,))
        if not a.ok or not isinstance(a.body, list):
            if a.status == 429:
                self.pause(a.retry_after_s())
            return RUN.catalog
        if RUN.catalog is not None:
            return RUN.catalog
        sessions = _parse_sessions(a.body, dated=bool(cfg.date), now_ms=RUN.now_ms())
        if not sessions:
            RUN.count("no_sessions")
            RUN.warn_once("empty", "no open session to book for %s..%s (dept %r): import a "
                          "schedule first, or pass --hy-date", first, last, cfg.dept or "*")
            return None
        RUN.catalog = Catalog.build(sessions, cfg.skew)
        RUN.target = {
            "sessions": len(sessions), "doctors": len(RUN.catalog.by_doctor),
            "capacity": RUN.catalog.capacity,
            "release_at_ms": min(s.release_at_ms for s in sessions),
        }
        log.info("target: %d sessions, %d doctors, %d units, release at %s",
                 len(sessions), len(RUN.catalog.by_doctor), RUN.catalog.capacity,
                 dt.datetime.fromtimestamp(sessions[0].release_at_ms / 1000, CST).isoformat())
        return RUN.catalog

    def release_ms(self, s: Session) -> float:
        return float(s.release_at_ms) if s.release_at_ms > 0 else RUN.fallback_release_ms()

    # ------------------------------------------------------------------ booking steps
    def hold(self, s: Session, slot: str, patient: str, key: str) -> Answer:
        headers = {"Idempotency-Key": key}
        ticket = getattr(self, "ticket", None)
        if ticket:  # the waiting room's ticket, as the mini-program sends it back
            headers["X-Waiting-Ticket"] = ticket
        a = self.call("POST", HOLDS_ROUTE, HOLDS_ROUTE,
                      body={"session_id": s.session_id, "slot_id": slot, "patient_id": patient},
                      headers=headers, expected=(403, 404, 409, 429), ok="held")
        if a.outcome == "waiting-room" and isinstance(a.get("ticket"), str):
            self.ticket = a.get("ticket")
            RUN.count("waiting_room")
        return a

    def confirm(self, hold_id: str, fee: int) -> Answer:
        """The payment side's callback: signed, retried with the same payment ref."""
        if self.cfg.pay_url:
            return self.pay_wechat(hold_id, fee)
        raw = _dumps({"payment_ref": f"pay-{uuid.uuid4().hex}", "amount": fee})
        a = Answer(0, TRANSPORT, None, None)
        path = f"/v1/holds/{hold_id}/confirm"
        for attempt in range(4):
            ts = int(time.time())
            sig = sign_payment(self.cfg.payment_secret, ts, raw, path=path)
            a = self.call("POST", CONFIRM_ROUTE, path, raw=raw,
                          auth=False, expected=(409, 429), ok="booked",
                          headers={"X-Payment-Timestamp": str(ts), "X-Payment-Signature": sig})
            if a.status == 401:
                RUN.warn_once("sig", "payment callbacks are refused (401): is "
                              "--hy-payment-secret the API's HAOYUAN_PAYMENT_SECRET?")
            if a.ok or not (a.status == 429 or a.transient):
                return a
            self.pause(a.retry_after_s(0.3 * (attempt + 1)))
        return a

    def pay_wechat(self, hold_id: str, fee: int) -> Answer:
        """The patient pays in WeChat Pay (the simulator), which notifies the API;
        then the mini-program looks at the hold to see it booked.

        Reported as ``"POST /v1/payments/wechat/notify(wechatpay) [<outcome>]"``
        with the API's answer to the first notification: ``notified`` (204) or
        ``<status> FAIL``. A 5xx (a backing service failing over) is retried
        by WeChat Pay itself, so the patient's page keeps looking at the hold
        for a while, as the mini-program does after paying."""
        notify = f"{self.host.rstrip('/')}/v1/payments/wechat/notify"
        body = _dumps({"hold_id": hold_id, "amount": fee, "notify_url": notify})
        with self.client.request("POST", f"{self.cfg.pay_url}/_sim/pay", data=body,
                                 headers={"Content-Type": _JSON}, name=PAY_ROUTE,
                                 catch_response=True) as r:
            got: Any = None
            try:
                got = json.loads(r.content) if r.content else None
            except ValueError:
                got = None
            code = int(got.get("status_code", 0)) if isinstance(got, dict) else 0
            if code == 204:
                outcome = "notified"
                r.success()
            elif code >= 500:
                outcome = f"{code} FAIL"
                r.failure(f"the notification was answered {code}")
            else:
                outcome = f"http-{code}" if code else TRANSPORT
                r.failure(f"the notification was answered {code}")
            r.request_meta["name"] = request_name("POST", PAY_NAME, outcome, bot=self.bot)
        if code != 204 and code < 500:
            return Answer(code or 0, TRANSPORT if not code else f"{code} notify", got, None)
        # Redelivered at 0.5, 1, 2, 4, 8 s after a FAIL: look for up to 16 s.
        waits = (0.0,) if code == 204 else (0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0, 4.0)
        a = Answer(0, TRANSPORT, None, None)
        for wait in waits:
            self.pause(wait)
            a = self.call("GET", HOLD_ROUTE, f"/v1/holds/{hold_id}", expected=(404, 429))
            if a.get("state") == "booked":
                return Answer(200, "booked", {"booking_id": hold_id}, None)
            if a.ok and a.get("state") not in ("held", None):
                break
        state = a.get("state")
        return Answer(409, str(state or a.outcome), a.body, a.headers)

    def availability(self, route: str, path: str) -> list[dict[str, Any]] | None:
        """The ``sessions`` of an availability answer (one wait on 429), or None."""
        for _ in range(2):
            a = self.call("GET", route, path, expected=(404, 429))
            if a.ok and isinstance(a.get("sessions"), list):
                return [x for x in a.get("sessions") if isinstance(x, dict)]
            if a.status != 429:
                return None
            self.pause(a.retry_after_s())
        return None


def _parse_sessions(body: list[Any], *, dated: bool, now_ms: float) -> list[Session]:
    out: list[Session] = []
    for x in body:
        if not isinstance(x, dict) or x.get("status", "open") != "open":
            continue
        slots = [(str(s["slot_id"]), int(s.get("capacity", 0))) for s in x.get("slots") or []
                 if isinstance(s, dict) and "slot_id" in s]
        if not slots:
            continue
        out.append(Session(
            session_id=str(x["session_id"]), dept=str(x.get("dept_id", "")),
            doctor=str(x.get("doctor_id", "")), date=str(x.get("date", "")),
            fee=int(x.get("fee", 0)), release_at_ms=int(x.get("release_at_ms", 0) or 0),
            slots=slots))
    if dated or not out:
        return out
    # No date given: the next release batch (or, if all are open, the latest one).
    upcoming = [s.release_at_ms for s in out if s.release_at_ms >= now_ms - 60_000]
    batch = min(upcoming) if upcoming else max(s.release_at_ms for s in out)
    return [s for s in out if abs(s.release_at_ms - batch) <= 1000]


def _free_slots(sessions: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(session id, slot id, free) of every slot with a free unit in open sessions."""
    out = []
    for s in sessions:
        if s.get("status", "open") != "open":
            continue
        for sl in s.get("slots") or []:
            free = int(sl.get("free", 0))
            if free > 0:
                out.append((str(s.get("session_id")), str(sl.get("slot_id")), free))
    return out


class Patient(HaoyuanUser):
    """One account, one patient, one release morning (see the module docstring)."""

    weight = 95

    def on_start(self) -> None:
        super().on_start()
        self.phase = "journey"
        self.target: Session | None = None
        self.booking: str | None = None
        self.cancel_at: float | None = None
        self.eager = self.rng.random() < self.cfg.eager
        if self.eager:
            RUN.count("eager")

    def wait_time(self) -> float:
        if self.phase == "booked" and self.cancel_at is not None:
            return max(0.0, self.cancel_at - time.time())
        return self.rng.uniform(3.0, 8.0)

    @task
    def step(self) -> None:
        if not self.ready():
            return
        if self.phase == "journey":
            self.journey()
        elif self.phase == "booked":
            self.after_booking()
        elif self.phase == "lost":
            self.waitlist()
        else:
            self.call("GET", _BOOKINGS, _BOOKINGS, expected=(429,))

    # ------------------------------------------------------------------ the journey
    def journey(self) -> None:
        cat = self.browse()
        if cat is None:
            self.pause(2.0)
            return
        doctor = cat.popularity.pick(self.rng)
        if doctor is None:
            return
        RUN.count(f"first_choice_rank_{cat.rank[doctor]:02d}")
        s = self.rng.choice(cat.by_doctor[doctor])
        self.target = s
        slot = self.rng.choices([x for x, _ in s.slots],
                                weights=[max(c, 1) for _, c in s.slots])[0]
        release = self.release_ms(s)
        if RUN.now_ms() >= release:
            RUN.count("late_arrivals")
        else:
            release = self.refresh_storm(s, release)
        hold = self.grab(cat, s, slot, eager=self.eager)
        if hold is None:
            self.phase = "lost"
            return
        self.pay_or_abandon(*hold)

    def refresh_storm(self, s: Session, release: float) -> float:
        """Refresh the session's availability until the instant; returns the instant."""
        path = _SESSION_AVAIL.replace("{id}", s.session_id)
        while True:
            left = release - RUN.now_ms()
            if left <= 0:
                break
            if self.eager and left <= 2000:
                return release  # start pressing: not-open answers until the instant
            got = self.availability(_SESSION_AVAIL, path)
            if got and int(got[0].get("release_at_ms", 0) or 0) > 0:
                release = float(got[0]["release_at_ms"])
            left = release - RUN.now_ms()
            self.pause(min(self.rng.uniform(*self.cfg.refresh), max(0.0, left / 1000)))
        # a human's reaction time after the clock turns
        self.pause(max(0.0, (release - RUN.now_ms()) / 1000) + self.rng.uniform(0.02, 0.3))
        return release

    def grab(self, cat: Catalog, s: Session, slot: str, *, eager: bool = False,
             budget: int | None = None) -> tuple[str, Session] | None:
        """Hold a unit of ``slot`` or, after sold-outs, of a fallback. (hold id, session)."""
        patient = self.patients[0]
        key = uuid.uuid4().hex
        fallbacks = self.cfg.fallbacks if budget is None else budget
        transient = 0
        while True:
            a = self.hold(s, slot, patient, key)
            if a.status == 201 and a.get("hold_id"):
                RUN.count("replayed_holds" if a.get("replay") else "fresh_holds")
                return str(a.get("hold_id")), s
            o = a.outcome
            if o == "not-open":
                RUN.count("not_open")
                rel, now = a.get("release_at_ms"), a.get("server_ms")
                wait = (rel - now) / 1000 if isinstance(rel, int) and isinstance(now, int) else 0.5
                if eager:  # keep pressing
                    wait = min(wait, self.rng.uniform(0.2, 0.6))
                self.pause(max(0.0, wait) + self.rng.uniform(0.0, 0.15))
                key = uuid.uuid4().hex  # a new press
                continue
            if a.status == 429:
                RUN.count("backoff")
                self.pause(a.retry_after_s())
                continue  # the same press: the same key
            if a.transient:
                transient += 1
                if transient > 3:
                    RUN.count("gave_up_errors")
                    return None
                self.pause(0.3 * transient)
                continue
            if o in ("sold-out", "suspended", "closed", "not-found"):
                if fallbacks <= 0:
                    RUN.count("gave_up")
                    return None
                fallbacks -= 1
                nxt = self.fallback(cat, s, exclude=(s.session_id, slot))
                if nxt is None:
                    RUN.count("gave_up")
                    return None
                RUN.count("fallbacks")
                s, slot = nxt
                key = uuid.uuid4().hex
                continue
            RUN.count(f"hold_{o}")  # duplicate, banned, unexpected
            return None

    def fallback(self, cat: Catalog, s: Session, exclude: tuple[str, str]
                 ) -> tuple[Session, str] | None:
        """What the app shows after a sold-out: the department-day's free units.

        Another slot of the same session first, then another session of the
        same doctor, then another doctor of the department by popularity.
        """
        path = _DEPT_AVAIL.replace("{dept}", s.dept).replace("{date}", s.date)
        got = self.availability(_DEPT_AVAIL, path)
        if not got:
            return None
        free = [(sid, sl, n) for sid, sl, n in _free_slots(got)
                if (sid, sl) != exclude and sid in cat.sessions]
        if not free:
            return None
        same = [x for x in free if x[0] == s.session_id]
        if not same:
            same = [x for x in free if cat.sessions[x[0]].doctor == s.doctor]
        if not same:
            doctors = {cat.sessions[x[0]].doctor for x in free}
            pick = cat.popularity.pick(self.rng, exclude=set(cat.popularity.items) - doctors)
            same = [x for x in free if cat.sessions[x[0]].doctor == pick]
        sid, sl, _ = self.rng.choices(same, weights=[n for _, _, n in same])[0]
        return cat.sessions[sid], sl

    def pay_or_abandon(self, hold_id: str, s: Session) -> None:
        self.pause(self.rng.uniform(*self.cfg.think))
        if self.rng.random() < self.cfg.abandon:
            if self.rng.random() < 0.5:
                RUN.count("abandon_release")
                self.call("DELETE", RELEASE_ROUTE, f"/v1/holds/{hold_id}",
                          expected=(404, 409, 429), ok="released")
            else:
                RUN.count("abandon_walkaway")  # the hold expires by itself
            self.phase = "done"
            return
        a = self.confirm(hold_id, s.fee)
        if not a.ok:
            RUN.count(f"confirm_{a.outcome}")
            self.phase = "done"
            return
        self.booking = str(a.get("booking_id") or hold_id)
        self.phase = "booked"
        if self.rng.random() < self.cfg.cancel:
            RUN.count("cancel_planned")
            self.cancel_at = time.time() + self.rng.uniform(1.0, 5.0)

    def after_booking(self) -> None:
        if self.cancel_at is not None and time.time() >= self.cancel_at and self.booking:
            self.cancel_at = None
            a = self.call("POST", CANCEL_ROUTE, f"/v1/bookings/{self.booking}/cancel",
                          expected=(404, 409, 429), ok="cancelled")
            if a.status == 429 or a.transient:  # the same cancel again, later
                self.cancel_at = time.time() + a.retry_after_s()
            elif a.ok:
                self.phase = "done"
            return
        self.call("GET", _BOOKINGS, _BOOKINGS, expected=(429,))

    def waitlist(self) -> None:
        """Lost: look again now and then; a released or cancelled unit comes back."""
        cat, s = RUN.catalog, self.target
        if cat is None or s is None:
            self.phase = "journey"
            return
        path = _DEPT_AVAIL.replace("{dept}", s.dept).replace("{date}", s.date)
        got = self.availability(_DEPT_AVAIL, path)
        free = [x for x in _free_slots(got or []) if x[0] in cat.sessions]
        if not free:
            return
        sid, sl, _ = self.rng.choice(free)
        RUN.count("waitlist_grabs")
        hold = self.grab(cat, cat.sessions[sid], sl, budget=1)
        if hold is not None:
            self.pay_or_abandon(*hold)


class Bot(HaoyuanUser):
    """A scalper's account: three patients, no think time, ignores Retry-After."""

    weight = 5
    bot = True

    def wait_time(self) -> float:
        return self.cfg.bot_pause

    def on_start(self) -> None:
        super().on_start()
        self.targets: list[tuple[Session, str]] = []
        self.i = 0
        self.n = 0

    @task
    def hammer(self) -> None:
        if not self.ready(patients=3):
            self.pause(1.0)
            return
        if not self.targets:
            cat = self.browse()
            for doctor in cat.popularity.items[:3] if cat else ():
                for s in cat.by_doctor[doctor]:
                    self.targets += [(s, slot) for slot, _ in s.slots]
            if not self.targets:
                self.pause(2.0)
                return
        s, slot = self.targets[self.i % len(self.targets)]
        patient = self.patients[self.n % len(self.patients)]
        self.n += 1
        a = self.hold(s, slot, patient, uuid.uuid4().hex)
        if a.status == 201 and a.get("hold_id"):
            c = self.confirm(str(a.get("hold_id")), s.fee)  # scalpers pay at once
            RUN.count("bot_bookings" if c.ok else "bot_confirm_failed")
        elif a.outcome == "sold-out":
            self.i += 1


def _set_weights(cfg: Config) -> None:
    Bot.weight = round(cfg.bots * 1000)
    Patient.weight = 1000 - Bot.weight


if os.environ.get("HAOYUAN_LOAD_SHAPE", "spike").lower() not in ("off", "none", "0"):

    class SpikeShape(SpikeShapeMixin, LoadTestShape):
        """The release spike (``--hy-*`` shape options; see loadtest/shapes.py)."""


# --------------------------------------------------------------------------- events


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    RUN.reset(environment.parsed_options)
    _set_weights(RUN.cfg)
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        def report(client_id: str, data: dict[str, Any]) -> None:
            data["haoyuan"] = dict(RUN.counters)
            data["haoyuan_target"] = RUN.target
            RUN.counters.clear()

        events.report_to_master.add_listener(report)
    elif isinstance(runner, MasterRunner):
        def merge(client_id: str, data: dict[str, Any]) -> None:
            RUN.counters.update(data.get("haoyuan") or {})
            RUN.target = data.get("haoyuan_target") or RUN.target

        events.worker_report.add_listener(merge)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    RUN.reset(environment.parsed_options)
    _set_weights(RUN.cfg)  # read when the run's users are dispatched (local runner)


def _write_summary(environment: Any, reason: str) -> None:
    path = RUN.cfg.summary
    if not path or isinstance(environment.runner, WorkerRunner):
        return
    shape = environment.shape_class
    extra: dict[str, Any] = {
        "reason": reason,
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": environment.host,
        "options": RUN.cfg.public(),
        "shape": None,
        "target": RUN.target,
    }
    if isinstance(shape, SpikeShapeMixin):
        extra["shape"] = {k: getattr(shape.params, k) for k in shape.params.__slots__}
    summary = build_summary(environment.stats, RUN.counters, extra)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    log.info("summary written to %s (%s)", path, reason)


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    _write_summary(environment, "test_stop")


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    _write_summary(environment, "quitting")
