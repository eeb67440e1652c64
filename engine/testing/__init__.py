"""Tooling for tests, benchmarks and embedders' own test suites (as
``litestar.testing`` is for Litestar): private Redis, Redis Cluster and
PostgreSQL servers on loopback (``servers``) and an HIS simulator speaking
FHIR R4 (``his_simulator``). Nothing in the engine's core imports this
package (``tests/test_layering.py`` holds that)."""
