"""FHIR ids of haoyuan's things, and back (reversible, one to one).

A FHIR id is ``[A-Za-z0-9.-]{1,64}``; ours are ``[A-Za-z0-9_-]`` (sessions),
with ``:`` (slots) or any character but whitespace and ``|`` (hospital,
department and doctor names). Each part is escaped without a ``.``, which
then separates parts:

- letters and digits stay; ``-`` -> ``--``; ``_`` -> ``-u``; ``:`` -> ``-c``;
- any other character -> ``-x`` and its code point in six hex digits.

| resource | id |
|---|---|
| Schedule (a session, 出诊) | ``enc(session)`` |
| Slot (a time slot of a session) | ``enc(session).enc(slot)`` |
| Appointment (a hold or booking) | ``<partition>.enc(session).<seq>`` (the record id) |
| proposed Appointment (``$find``) | ``proposed.enc(session).enc(slot)`` |
| Location (a hospital), Practitioner (a doctor) | ``enc(id)`` |

(Ids past 64 characters happen only for session ids near their own limit
of 64; keep session ids under ~40 characters for FHIR clients.)
"""

from __future__ import annotations

import re

__all__ = [
    "appointment_id",
    "dec",
    "enc",
    "parse_appointment_id",
    "parse_proposed_id",
    "parse_slot_id",
    "proposed_id",
    "slot_id",
]

_PLAIN = re.compile(r"[A-Za-z0-9]", re.ASCII)
_FHIR_ID = re.compile(r"[A-Za-z0-9.-]{1,64}", re.ASCII)
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_SLOT = re.compile(r"[A-Za-z0-9_:-]{1,32}", re.ASCII)


def enc(value: str) -> str:
    out = []
    for ch in value:
        if _PLAIN.fullmatch(ch):
            out.append(ch)
        elif ch == "-":
            out.append("--")
        elif ch == "_":
            out.append("-u")
        elif ch == ":":
            out.append("-c")
        else:
            out.append(f"-x{ord(ch):06x}")
    return "".join(out)


def dec(value: str) -> str | None:
    """The value ``enc`` made this of, or None for anything ``enc`` never makes."""
    out = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch != "-":
            if not _PLAIN.fullmatch(ch):
                return None
            out.append(ch)
            i += 1
            continue
        tag = value[i + 1] if i + 1 < n else ""
        if tag in ("-", "u", "c"):
            out.append({"-": "-", "u": "_", "c": ":"}[tag])
            i += 2
        elif tag == "x":
            code = value[i + 2:i + 8]
            if len(code) != 6 or not re.fullmatch(r"[0-9a-f]{6}", code):
                return None
            cp = int(code, 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF or _PLAIN.fullmatch(chr(cp)) \
                    or chr(cp) in "-_:":
                return None
            out.append(chr(cp))
            i += 8
        else:
            return None
    return "".join(out) or None


def slot_id(session_id: str, slot: str) -> str:
    return f"{enc(session_id)}.{enc(slot)}"


def parse_slot_id(fid: str) -> tuple[str, str] | None:
    """(session id, slot id) of a Slot id, or None."""
    if not _FHIR_ID.fullmatch(fid) or fid.count(".") != 1:
        return None
    a, b = fid.split(".")
    sid, slot = dec(a), dec(b)
    if sid is None or slot is None or not _SESSION.fullmatch(sid) or not _SLOT.fullmatch(slot):
        return None
    return sid, slot


def proposed_id(session_id: str, slot: str) -> str:
    return "proposed." + slot_id(session_id, slot)


def parse_proposed_id(fid: str) -> tuple[str, str] | None:
    if not fid.startswith("proposed."):
        return None
    return parse_slot_id(fid[len("proposed."):])


def appointment_id(record_id: str) -> str:
    """A hold or booking id (``<partition>.<session>.<seq>``) as an Appointment id."""
    p, sid, seq = record_id.split(".")
    return f"{p}.{enc(sid)}.{seq}"


def parse_appointment_id(fid: str) -> str | None:
    """The record id of an Appointment id, or None."""
    parts = fid.split(".")
    if len(parts) != 3 or len(fid) > 100:
        return None
    p, s, seq = parts
    sid = dec(s)
    if (not p.isascii() or not p.isdigit() or len(p) > 3 or not seq.isascii()
            or not seq.isdigit() or len(seq) > 19 or sid is None
            or not _SESSION.fullmatch(sid)):
        return None
    return f"{p}.{sid}.{seq}"
