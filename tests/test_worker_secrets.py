"""The workers that hold secrets refuse to start in production without
strong ones: the HIS forwarder decrypts patients (data keys), the refund
worker and the reconciliation hold the WeChat Pay merchant key."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("HAOYUAN_")}


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60,
                          env={**_CLEAN, "HAOYUAN_PG_DSN": "postgresql://nobody@127.0.0.1:1/x",
                               "HAOYUAN_REDIS_URL": "redis://127.0.0.1:1/0", **env})


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(("keys", "named"), [
    ({}, "HAOYUAN_DATA_KEYS"),
    ({"HAOYUAN_DATA_KEYS": "k1:" + b64(bytes(32)), "HAOYUAN_HMAC_KEY": b64(os.urandom(32))},
     "HAOYUAN_DATA_KEYS"),
    ({"HAOYUAN_DATA_KEYS": "dev:" + b64(hashlib.sha256(b"haoyuan development data key").digest()),
      "HAOYUAN_HMAC_KEY": b64(hashlib.sha256(b"haoyuan development hmac key").digest())},
     "development key"),
])
def test_the_forwarder_refuses_missing_or_weak_data_keys_in_production(
        keys: dict[str, str], named: str) -> None:
    got = run(["forwarder", "--burst"], **keys)
    assert got.returncode == 2, got.stderr
    assert named in got.stderr and "refuses to start" in got.stderr
    for v in keys.values():
        assert v.split(":")[-1] not in got.stderr  # never a key


def test_money_workers_need_wechat_pay_and_strong_keys() -> None:
    for cmd in (["refunds", "--burst"], ["reconcile", "payments", "--date", "2026-12-01"]):
        got = run(cmd)
        assert got.returncode == 2 and "HAOYUAN_WXPAY" in got.stderr, got.stderr
    got = run(["refunds", "--burst"], HAOYUAN_WXPAY_MCHID="1900000109")
    assert got.returncode == 2 and "HAOYUAN_WXPAY_APPID is not set" in got.stderr


@pytest.mark.parametrize("worker", ["writer", "forwarder", "refunds"])
def test_a_development_worker_says_so_at_every_start(worker: str) -> None:
    """Issue 10: a development instance says so in every start-up log, the
    workers' as well as the API's; a production one says it is production."""
    dev = run([worker, "--burst"], HAOYUAN_ENV="development")
    assert f"haoyuan {worker}: development mode" in dev.stderr, dev.stderr
    prod = run([worker, "--burst"])
    assert "development mode" not in prod.stderr
    assert f"haoyuan {worker}: starting (production)" in prod.stderr, prod.stderr
