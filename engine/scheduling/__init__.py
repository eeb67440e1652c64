"""The scheduling standards, for other backends and aggregators: FHIR R4
resources of haoyuan's sessions, slots and bookings (``resources``), their
reversible FHIR ids (``ids``), and SMART Scheduling Links bulk publishing
(``publish``: ``haoyuan publish``). The HTTP facade that books through them
is ``api.fhir`` (``/fhir/r4``)."""
