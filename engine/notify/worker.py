"""The notifier: what happened to a booking, told to its patient once.

**Planning** reads PostgreSQL, never the Redis outbox, so a message is never
planned before its event is durable:

- each ``booking_events`` row the writer committed and the notifier has not
  planned (``notified``): booked -> ``booking_confirmed``, a waitlist offer
  -> ``waitlist_offer`` (with its payment deadline), an offer that lapsed ->
  ``offer_passed_on``, a cancel by 停诊 (and a waitlist closed by it) ->
  ``suspension``, any other cancel -> ``cancellation``;
- each refund order done (``refund``);
- each booking whose visit is ``reminder_lead_s`` away (``visit_reminder``,
  once per booking), moved out of the quiet hours (to their end, if that is
  still before the visit).

A message is one ``notifications`` row keyed by its ``dedup_key``, planned
in the same transaction that marks its source planned: planned once.

**Sending** claims due rows (``FOR UPDATE SKIP LOCKED``), marks them
``sending`` with a lease and commits *before* sending; a killed worker's
rows come back when the lease runs out and are sent again with the same
dedup key, which the provider (and the simulator) drops as a repeat. A row
is ``sent``, ``failed`` (refused, or out of attempts: left for an
operator), or ``skipped`` (no consent for WeChat and no SMS: recorded, not
sent). WeChat needs the account's consent (``notify_consent``; a one-time
authorization is used up by the message); SMS goes to the patient's phone.

Nothing personal is stored beyond the template's masked fields; the openid
and the phone are decrypted only to send, and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from engine.his.forwarder_policy import Backoff
from engine.notify.base import Message, Notifier, SendResult
from engine.pii import Crypto, DecryptionError, mask_name

__all__ = ["Notifications", "NotifyConfig", "kind_of"]

log = logging.getLogger("haoyuan.notify")

_SUSPENSION_REASONS = ("suspended", "doctor_stopped")


def kind_of(event_type: str, reason: str | None) -> str | None:
    """What a patient is told about an outbox event (None: nothing)."""
    r = reason or ""
    if event_type == "booked":
        return "booking_confirmed"
    if event_type == "waitlist_offer":
        return "waitlist_offer"
    if event_type == "offer_lapsed":
        return "offer_passed_on"
    if event_type == "cancelled":
        if r in ("patient", "conflict") or r.startswith(("his_cancelled", "his_rejected")):
            return "cancellation"
        return "suspension"  # 停诊: an operator's, the scheduler's or the HIS's
    if event_type == "waitlist_closed" and r != "cutoff":
        return "suspension"
    return None


_WORDS = {"patient": "您已取消", "conflict": "号源冲突", "his_cancelled": "医院已取消",
          "his_rejected": "医院未能接受", "expired": "未在时限内支付"}


@dataclass(slots=True)
class NotifyConfig:
    batch_size: int = 100
    concurrency: int = 8
    #: A row being sent is left alone this long (a killed worker's returns after).
    lease_s: float = 30.0
    backoff_base_s: float = 5.0
    backoff_cap_s: float = 600.0
    max_attempts: int = 10
    #: The visit reminder goes this long before the visit.
    reminder_lead_s: float = 24 * 3600.0
    #: No reminder between these local minutes of the day (22:00 to 07:00).
    quiet_from_min: int = 22 * 60
    quiet_to_min: int = 7 * 60
    #: The hospitals' time zone, minutes east of UTC (China: +8 h).
    tz_min: int = 480
    idle_s: float = 1.0


class Notifications:
    def __init__(self, pool: asyncpg.Pool, crypto: Crypto | None,
                 notifiers: dict[str, Notifier], config: NotifyConfig | None = None) -> None:
        self.pool = pool
        self.crypto = crypto
        self.notifiers = notifiers
        self.config = config or NotifyConfig()
        self.backoff = Backoff(self.config.backoff_base_s, self.config.backoff_cap_s)
        self.planned = 0
        self.sent = 0
        self.failed = 0
        self.skipped = 0
        self.retried = 0

    # ------------------------------------------------------------------ the loop
    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Plan and send until ``stop`` (with ``burst``: until nothing is left
        to plan or send now)."""
        while not stop.is_set():
            try:
                n = await self.step()
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
                log.warning("notifier: store unavailable (%s); retrying", type(exc).__name__)
                n = 0
            if burst and n == 0 and not await self._due():
                return
            if n == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.idle_s)

    async def step(self) -> int:
        return await self.plan() + await self.send()

    async def _due(self) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM notifications WHERE state IN ('queued', 'sending')"
            " AND next_attempt_at <= now() + interval '1 second')"))

    # ------------------------------------------------------------------ planning
    async def plan(self) -> int:
        return await self._plan_events() + await self._plan_refunds() + \
            await self._plan_reminders()

    async def _plan_events(self) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT e.seq, e.booking_id, e.event_type, e.reason, e.deadline_at,"
                " coalesce(e.account_id, b.account_id) AS account_id,"
                " coalesce(e.patient_ref, b.patient_ref) AS patient_ref,"
                " coalesce(e.session_id, b.session_id) AS session_id,"
                " coalesce(e.slot_id, b.slot_id) AS slot_id, coalesce(e.unit, b.unit) AS unit"
                " FROM booking_events e LEFT JOIN bookings b ON b.id = e.booking_id"
                " WHERE NOT e.notified ORDER BY e.seq LIMIT $1 FOR UPDATE OF e SKIP LOCKED",
                self.config.batch_size)
            if not rows:
                return 0
            n = 0
            for r in rows:
                kind = kind_of(r["event_type"], r["reason"])
                if kind is None or not r["account_id"]:
                    continue
                data = await self._fields(conn, r["session_id"], r["slot_id"], r["unit"],
                                          r["account_id"], r["patient_ref"])
                if kind == "waitlist_offer" and r["deadline_at"] is not None:
                    data["deadline"] = self._local(r["deadline_at"]).strftime("%Y-%m-%d %H:%M")
                if kind in ("cancellation", "offer_passed_on"):
                    reason = (r["reason"] or "").split(":")[0]
                    data["reason"] = _WORDS.get(reason, reason)
                n += await self._queue(conn, f"ev:{r['seq']}", kind, r["account_id"],
                                       r["booking_id"], r["patient_ref"], data)
            await conn.execute("UPDATE booking_events SET notified = true WHERE seq = ANY($1)",
                               [r["seq"] for r in rows])
        self.planned += n
        return len(rows)  # progress, messages or not

    async def _plan_refunds(self) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT o.out_refund_no, o.booking_id, o.amount, b.account_id, b.patient_ref,"
                " b.session_id, b.slot_id, b.unit FROM refund_orders o"
                " LEFT JOIN bookings b ON b.id = o.booking_id"
                " WHERE NOT o.notified AND o.state = 'succeeded'"
                " ORDER BY o.finished_at LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
                self.config.batch_size)
            n = 0
            for r in rows:
                if not r["account_id"]:
                    continue
                data = await self._fields(conn, r["session_id"], r["slot_id"], r["unit"],
                                          r["account_id"], r["patient_ref"])
                data["amount"] = f"{r['amount'] / 100:.2f}"
                data["state"] = "已退款"
                n += await self._queue(conn, f"refund:{r['out_refund_no']}", "refund",
                                       r["account_id"], r["booking_id"], r["patient_ref"], data)
            if rows:
                await conn.execute("UPDATE refund_orders SET notified = true"
                                   " WHERE out_refund_no = ANY($1)",
                                   [r["out_refund_no"] for r in rows])
        self.planned += n
        return n

    async def _plan_reminders(self) -> int:
        """Bookings whose visit is within the lead: one reminder each, moved
        out of the quiet hours (to their end, if still before the visit)."""
        lead = dt.timedelta(seconds=self.config.reminder_lead_s)
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT b.id, b.account_id, b.patient_ref, b.session_id, b.slot_id, b.unit,"
                " s.starts_at, s.date, sl.start_time FROM bookings b"
                " JOIN sessions s ON s.id = b.session_id"
                " LEFT JOIN slots sl ON sl.session_id = b.session_id AND sl.slot_id = b.slot_id"
                " WHERE b.status = 'booked' AND NOT b.reminder_planned"
                " AND s.date BETWEEN (now() - interval '1 day')::date"
                "   AND (now() + $1::interval + interval '1 day')::date"
                " LIMIT $2 FOR UPDATE OF b SKIP LOCKED", lead, self.config.batch_size * 5)
            now = dt.datetime.now(dt.UTC)
            done: list[str] = []
            n = 0
            for r in rows:
                visit = self._visit(r["date"], r["start_time"], r["starts_at"])
                if visit is None or visit <= now:
                    done.append(r["id"])  # no time known, or already past: no reminder
                    continue
                at = visit - lead
                if at > now:
                    continue  # not yet: planned when the lead is reached
                send_at = self._out_of_quiet(max(at, now), visit)
                data = await self._fields(conn, r["session_id"], r["slot_id"], r["unit"],
                                          r["account_id"], r["patient_ref"])
                n += await self._queue(conn, f"reminder:{r['id']}", "visit_reminder",
                                       r["account_id"], r["id"], r["patient_ref"], data,
                                       not_before=send_at)
                done.append(r["id"])
            if done:
                await conn.execute("UPDATE bookings SET reminder_planned = true"
                                   " WHERE id = ANY($1)", done)
        self.planned += n
        return n

    def _local(self, t: dt.datetime) -> dt.datetime:
        return t.astimezone(dt.timezone(dt.timedelta(minutes=self.config.tz_min)))

    def _visit(self, day: dt.date, start: dt.time | None,
               starts_at: dt.datetime | None) -> dt.datetime | None:
        tz = dt.timezone(dt.timedelta(minutes=self.config.tz_min))
        if start is not None:
            return dt.datetime.combine(day, start, tzinfo=tz)
        return starts_at

    def _out_of_quiet(self, at: dt.datetime, visit: dt.datetime) -> dt.datetime:
        c = self.config
        local = self._local(at)
        minute = local.hour * 60 + local.minute
        q0, q1 = c.quiet_from_min, c.quiet_to_min
        quiet = (q0 <= minute or minute < q1) if q0 > q1 else (q0 <= minute < q1)
        if not quiet:
            return at
        end = local.replace(hour=q1 // 60, minute=q1 % 60, second=0, microsecond=0)
        if end <= local:
            end += dt.timedelta(days=1)
        return end if end < visit else at  # too late for quiet: send now, not after the visit

    async def _fields(self, conn: Any, session_id: str | None, slot_id: str | None,
                      unit: int | None, account_id: str, patient_ref: str | None
                      ) -> dict[str, str]:
        """The template's fields: where and when, the queue number, the masked name."""
        data: dict[str, str] = {}
        if session_id:
            s = await conn.fetchrow(
                "SELECT s.dept_id, s.doctor_id, s.date, s.period, sl.start_time FROM sessions s"
                " LEFT JOIN slots sl ON sl.session_id = s.id AND sl.slot_id = $2"
                " WHERE s.id = $1", session_id, slot_id or "")
            if s is not None:
                when = f"{s['date'].isoformat()} {s['period']}"
                if s["start_time"] is not None:
                    when += f" {s['start_time'].strftime('%H:%M')}"
                data.update(department=s["dept_id"], doctor=s["doctor_id"], time=when)
        if unit:
            data["unit"] = str(unit)
        name = await self._patient_column(conn, account_id, patient_ref, "name_enc")
        if name:
            data["patient"] = mask_name(name)
        return data

    async def _patient_column(self, conn: Any, account_id: str, patient_ref: str | None,
                              column: str) -> str | None:
        if self.crypto is None or not patient_ref or column not in ("name_enc", "phone_enc"):
            return None
        r = await conn.fetchrow(
            f"SELECT id, {column} FROM patients WHERE id_hash = $1"
            " ORDER BY (account_id = $2) DESC, (unbound_at IS NULL) DESC, created_at DESC"
            " LIMIT 1", patient_ref, account_id)
        if r is None:
            return None
        try:
            return self.crypto.decrypt(r[column], table="patients", column=column,
                                       row_id=str(r["id"]))
        except DecryptionError:
            return None

    async def _queue(self, conn: Any, key: str, kind: str, account_id: str,
                     booking_id: str | None, patient_ref: str | None, data: dict[str, str],
                     *, not_before: dt.datetime | None = None) -> int:
        """One message, planned once: WeChat with the account's consent, else
        SMS if there is a gateway, else recorded as skipped."""
        consent = await conn.fetchrow(
            "SELECT remaining FROM notify_consent WHERE account_id = $1 AND kind = $2",
            account_id, kind)
        channel = "none"
        if "wechat" in self.notifiers and consent is not None and (
                consent["remaining"] is None or consent["remaining"] > 0):
            channel = "wechat"
        elif "sms" in self.notifiers and patient_ref:
            channel = "sms"
        state = "queued" if channel != "none" else "skipped"
        tag = await conn.execute(
            "INSERT INTO notifications (dedup_key, account_id, booking_id, patient_ref, kind,"
            " channel, state, payload, next_attempt_at, last_error)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,coalesce($9, now()),$10)"
            " ON CONFLICT (dedup_key) DO NOTHING",
            key, account_id, booking_id, patient_ref, kind, channel, state,
            msgspec.json.encode(data).decode(), not_before,
            None if channel != "none" else "no consent for WeChat and no SMS gateway")
        if channel == "none":
            self.skipped += 1
        return 1 if tag.endswith(" 1") else 0

    # ------------------------------------------------------------------ sending
    async def send(self) -> int:
        c = self.config
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT dedup_key, account_id, patient_ref, kind, channel, payload, attempts"
                " FROM notifications WHERE state IN ('queued', 'sending')"
                " AND next_attempt_at <= now() ORDER BY next_attempt_at"
                " LIMIT $1 FOR UPDATE SKIP LOCKED", c.batch_size)
            ready = []
            for r in rows:
                if r["channel"] == "wechat" and r["attempts"] == 0:
                    # The message uses up a one-time authorization (long-term: NULL).
                    consent = await conn.fetchrow(
                        "SELECT remaining FROM notify_consent WHERE account_id = $1"
                        " AND kind = $2 FOR UPDATE", r["account_id"], r["kind"])
                    if consent is None or (consent["remaining"] is not None
                                           and consent["remaining"] <= 0):
                        await conn.execute(
                            "UPDATE notifications SET state = 'skipped', next_attempt_at = NULL,"
                            " last_error = 'no consent left' WHERE dedup_key = $1",
                            r["dedup_key"])
                        self.skipped += 1
                        continue
                    if consent["remaining"] is not None:
                        await conn.execute(
                            "UPDATE notify_consent SET remaining = remaining - 1,"
                            " updated_at = now() WHERE account_id = $1 AND kind = $2",
                            r["account_id"], r["kind"])
                ready.append(r)
            if ready:
                await conn.execute(
                    "UPDATE notifications SET state = 'sending', attempts = attempts + 1,"
                    " next_attempt_at = now() + $2::interval WHERE dedup_key = ANY($1)",
                    [r["dedup_key"] for r in ready], dt.timedelta(seconds=c.lease_s))
        sem = asyncio.Semaphore(c.concurrency)

        async def one(r: Any) -> None:
            async with sem:
                await self._send_one(r)

        await asyncio.gather(*(one(r) for r in ready))
        return len(rows)

    async def _send_one(self, r: Any) -> None:
        key, attempts = r["dedup_key"], r["attempts"] + 1
        notifier = self.notifiers.get(r["channel"])
        to = await self._recipient(r) if notifier is not None else None
        if notifier is None or not to:
            await self._finish(key, "failed", "no recipient (openid or phone) or no channel")
            return
        data = msgspec.json.decode(r["payload"]) if isinstance(r["payload"], str | bytes) \
            else dict(r["payload"])
        msg = Message(dedup_key=key, kind=r["kind"], channel=notifier.channel, to=to,
                      data={k: str(v) for k, v in data.items()})
        try:
            result = await notifier.send(msg)
        except Exception as exc:  # an unknown outcome: the same key again, later
            result = SendResult("retry", type(exc).__name__)
        if result.outcome == "sent":
            await self._finish(key, "sent", None)
            self.sent += 1
        elif result.outcome == "refused" or attempts >= self.config.max_attempts:
            await self._finish(key, "failed", result.detail[:200])
            self.failed += 1
        else:
            self.retried += 1
            await self.pool.execute(
                "UPDATE notifications SET state = 'queued', last_error = $2,"
                " next_attempt_at = now() + $3::interval WHERE dedup_key = $1",
                key, result.detail[:200], dt.timedelta(seconds=self.backoff.delay(attempts)))

    async def _finish(self, key: str, state: str, error: str | None) -> None:
        await self.pool.execute(
            "UPDATE notifications SET state = $2, last_error = $3, next_attempt_at = NULL,"
            " sent_at = CASE WHEN $2 = 'sent' THEN now() ELSE sent_at END"
            " WHERE dedup_key = $1", key, state, error)

    async def _recipient(self, r: Any) -> str | None:
        if self.crypto is None:
            return None
        async with self.pool.acquire() as conn:
            if r["channel"] == "wechat":
                row = await conn.fetchrow("SELECT openid_enc FROM accounts WHERE id = $1",
                                          r["account_id"])
                if row is None or row["openid_enc"] is None:
                    return None
                try:
                    return self.crypto.decrypt(row["openid_enc"], table="accounts",
                                               column="openid_enc", row_id=r["account_id"])
                except DecryptionError:
                    return None
            return await self._patient_column(conn, r["account_id"], r["patient_ref"],
                                              "phone_enc")
