"""A FHIR client names a patient; the server resolves it, or refuses.

The one accepted name is the patient's resident ID number, as a Patient
identifier of system ``urn:haoyuan:national-id`` (in a contained Patient
the Appointment's participant points at, ``"actor": {"reference": "#p"}``,
in a ``patient-resource`` parameter, or as the participant's
``actor.identifier``). The server normalises and validates it and computes
the patient ref itself (the keyed hash, ``engine.pii.Crypto.id_hash``); a
ref sent by a client (``urn:haoyuan:patient-ref``) is refused, as is any
other system.

Then, as a /v1 binding must be verified before it holds, the client's
``identity`` decides: ``verify`` (the default) sends ID, name
(``Patient.name``) and phone (``Patient.telecom``) to the real-name
authority (``engine.identity``; 403 ``patient-unverified`` unless it
verifies; a verified patient is remembered by this worker for
``fhir_verify_cache_s``, as a keyed hash only); ``trusted`` (a backend that
verified its patients itself, e.g. the hospital's own) needs the ID only.
The raw values go nowhere else: not to Redis, PostgreSQL, logs or answers.
"""

from __future__ import annotations

import time

import structlog

from api.context import Api
from api.fhir.body import Identifier, Patient
from api.fhir.outcomes import OutcomeError
from api.problems import retry_after
from engine.identity import Claim, RealNameUnavailable
from engine.pii import InvalidNationalId, InvalidPhone, normalize_national_id, normalize_phone
from engine.scheduling.resources import SYS_NATIONAL_ID, SYS_PATIENT_REF
from engine.store.fhir_clients import FhirClient

__all__ = ["resolve_patient"]

log = structlog.get_logger("haoyuan.api")
_VERIFIED: dict[str, float] = {}


def _name(p: Patient) -> str:
    for n in p.name:
        text = n.text or " ".join([*n.given, n.family or ""]).strip()
        text = " ".join(text.split())
        if text:
            return text
    return ""


def _phone(p: Patient) -> str:
    for t in p.telecom:
        if t.system in (None, "phone", "sms") and t.value:
            return t.value
    return ""


async def resolve_patient(api: Api, client: FhirClient, patient: Patient | None,
                          identifier: Identifier | None = None) -> str:
    """The patient ref, or an OutcomeError (422, 403, 503)."""
    idents = list(patient.identifier) if patient is not None else []
    if identifier is not None:
        idents.append(identifier)
    if any(i.system == SYS_PATIENT_REF for i in idents):
        raise OutcomeError.of("patient-unresolved", "patient refs are the server's: name the"
                              f" patient by an identifier of system {SYS_NATIONAL_ID}")
    given = [i.value for i in idents if i.system == SYS_NATIONAL_ID and i.value]
    if len(given) != 1:
        raise OutcomeError.of("patient-unresolved", "name the patient by one identifier of"
                              f" system {SYS_NATIONAL_ID} (the resident ID number)")
    try:
        nid = normalize_national_id(given[0])
    except InvalidNationalId as exc:
        raise OutcomeError.of("invalid-national-id", str(exc)) from None
    ref = api.crypto.id_hash(nid)
    if client.identity == "trusted":
        return ref
    name = _name(patient) if patient is not None else ""
    raw_phone = _phone(patient) if patient is not None else ""
    if not name or len(name) > 64 or not raw_phone:
        raise OutcomeError.of("patient-unresolved", "this client's patients are checked by the"
                              " real-name authority: send Patient.name and a phone in"
                              " Patient.telecom with the ID")
    try:
        tel = normalize_phone(raw_phone)
    except InvalidPhone as exc:
        raise OutcomeError.of("invalid-input", str(exc)) from None
    key = api.crypto.client_hash(f"fhir|{client.id}|{ref}|{name}|{tel}")
    now = time.monotonic()
    if _VERIFIED.get(key, 0) > now:
        return ref
    try:
        verdict = await api.realname.verify(Claim(national_id=nid, name=name, phone=tel,
                                                  account=f"fhir-{client.id}"))
    except RealNameUnavailable as exc:
        log.warning("realname_unavailable", error=str(exc)[:200])
        ms, headers = retry_after(5000)
        raise OutcomeError.of("unavailable", "the real-name check is unavailable; retry later",
                              headers=headers, retry_after_ms=ms) from None
    if not verdict.verified:
        raise OutcomeError.of("patient-unverified", "the real-name authority did not verify"
                              " this patient's ID, name and phone")
    if len(_VERIFIED) > 100_000:
        _VERIFIED.clear()
    _VERIFIED[key] = now + api.settings.fhir_verify_cache_s
    return ref
