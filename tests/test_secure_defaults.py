"""Issue 10, section 1: secure by default.

Development secrets and the development WeChat verifier exist only when the
operator asks for development mode (``HAOYUAN_ENV=development``); otherwise
the API refuses to start, naming every missing or weak secret in one error
that never prints a value. A development instance says so in its start-up
log and in ``/readyz``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import subprocess
import sys
import time

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.auth import TokenSigner, sign_payment
from api.settings import Settings, SettingsError
from engine.pii import Crypto
from engine.testing.servers import free_port
from tests.apikit import ROOT

pytestmark = pytest.mark.timeout(120)

ALL_SECRETS = ("HAOYUAN_ADMIN_TOKEN", "HAOYUAN_PAYMENT_SECRET", "HAOYUAN_TOKEN_SECRET",
               "HAOYUAN_OPS_TOKEN", "HAOYUAN_DATA_KEYS", "HAOYUAN_HMAC_KEY")


def strong() -> str:
    return secrets.token_urlsafe(32)


def key_b64() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def production_env(**kw: str) -> dict[str, str]:
    env = {
        "HAOYUAN_ADMIN_TOKEN": strong(), "HAOYUAN_PAYMENT_SECRET": strong(),
        "HAOYUAN_TOKEN_SECRET": strong(), "HAOYUAN_OPS_TOKEN": strong(),
        "HAOYUAN_DATA_KEYS": f"k1:{key_b64()}", "HAOYUAN_HMAC_KEY": key_b64(),
        "HAOYUAN_WECHAT_MODE": "code2session", "HAOYUAN_WECHAT_APPID": "wx0123456789",
        "HAOYUAN_WECHAT_SECRET": strong(),
        "HAOYUAN_REALNAME_MODE": "http", "HAOYUAN_REALNAME_URL": "http://127.0.0.1:9/verify",
        "HAOYUAN_REALNAME_KEY": strong(),
    }
    env.update(kw)
    return env


def refused(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    return str(err.value)


# ------------------------------------------------------------------ refusing to start


def test_no_settings_refuses_naming_every_secret() -> None:
    msg = refused({})
    for name in (*ALL_SECRETS, "HAOYUAN_WECHAT_MODE", "HAOYUAN_REALNAME_MODE"):
        assert name in msg, (name, msg)
    assert "HAOYUAN_ENV=development" in msg  # how to ask for a development instance


def test_partial_setup_keeps_no_development_secret() -> None:
    """Real login verifier and admin token set, environment not named."""
    env = production_env()
    for name in ("HAOYUAN_PAYMENT_SECRET", "HAOYUAN_TOKEN_SECRET", "HAOYUAN_DATA_KEYS",
                 "HAOYUAN_HMAC_KEY"):
        del env[name]
    msg = refused(env)
    for name in ("HAOYUAN_PAYMENT_SECRET", "HAOYUAN_TOKEN_SECRET", "HAOYUAN_DATA_KEYS",
                 "HAOYUAN_HMAC_KEY"):
        assert name in msg
    assert "HAOYUAN_ADMIN_TOKEN" not in msg and "HAOYUAN_WECHAT" not in msg


@pytest.mark.parametrize("value", [
    "a" * 64,                                   # one character repeated
    "dev-payment-secret",                       # a known development value
    "dev-admin-token-dev-admin-token-dev-admin",  # built from one
    "0123456789" * 4,                           # a period
    "abababababababababababababababababababab",  # two characters
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN",  # a run
    "short-but-random-9Xq",                     # too short
    "changeme-changeme-changeme-changeme-1234",  # repeated word
    "Passw0rd!Passw0rd!Passw0rd!Passw0rd!x",      # repetitive (it compresses)
])
def test_weak_secrets_are_named_never_printed(value: str) -> None:
    for name in ("HAOYUAN_ADMIN_TOKEN", "HAOYUAN_PAYMENT_SECRET", "HAOYUAN_TOKEN_SECRET",
                 "HAOYUAN_OPS_TOKEN", "HAOYUAN_WECHAT_SECRET"):
        msg = refused(production_env(**{name: value}))
        assert name in msg and value not in msg, msg
    from engine.secret_strength import secret_problem

    assert secret_problem(value) is not None


@pytest.mark.parametrize("key", [bytes(32), b"\xff" * 32, bytes(range(32)), b"ab" * 16,
                                 hashlib.sha256(b"haoyuan development data key").digest()])
def test_weak_data_keys_are_refused(key: bytes) -> None:
    k = base64.b64encode(key).decode()
    msg = refused(production_env(HAOYUAN_DATA_KEYS=f"k1:{k}"))
    assert "HAOYUAN_DATA_KEYS" in msg and k not in msg
    msg = refused(production_env(HAOYUAN_DATA_KEYS=f"k1:{key_b64()},k0:{k}"))
    assert "HAOYUAN_DATA_KEYS" in msg  # every key of the ring, not only the active one
    msg = refused(production_env(HAOYUAN_HMAC_KEY=k))
    assert "HAOYUAN_HMAC_KEY" in msg and k not in msg


def test_malformed_keys_are_named_with_the_rest() -> None:
    msg = refused(production_env(HAOYUAN_DATA_KEYS="k1:not-base64!", HAOYUAN_ADMIN_TOKEN="x"))
    assert "HAOYUAN_DATA_KEYS" in msg and "HAOYUAN_ADMIN_TOKEN" in msg and "not-base64" not in msg


def test_random_secrets_pass() -> None:
    from engine.secret_strength import secret_problem

    for _ in range(200):
        for value in (secrets.token_urlsafe(32), secrets.token_hex(32), secrets.token_urlsafe(24)):
            assert secret_problem(value) is None, value
    s = Settings.from_env(production_env())
    assert s.env == "production" and s.development is False


def test_production_refuses_development_conveniences() -> None:
    assert "HAOYUAN_WECHAT_MODE" in refused(production_env(HAOYUAN_WECHAT_MODE="dev"))
    assert "HAOYUAN_REALNAME_MODE" in refused(production_env(HAOYUAN_REALNAME_MODE="simulator"))
    assert "HAOYUAN_REALNAME_KEY" in refused(production_env(HAOYUAN_REALNAME_KEY="x" * 40))
    assert "HAOYUAN_BENCH_ENDPOINTS" in refused(production_env(HAOYUAN_BENCH_ENDPOINTS="1"))
    crypto = Crypto.generate_dev()
    with pytest.raises(SettingsError, match="development"):
        Settings.from_env(production_env(), crypto=crypto)


# ------------------------------------------------------------------ asking for development


@pytest.mark.parametrize("value", ["development", "dev", "DEVELOPMENT", "Dev"])
def test_development_mode_is_explicit(value: str) -> None:
    s = Settings.from_env({"HAOYUAN_ENV": value})
    assert s.env == "development" and s.development
    assert s.resolved_crypto().dev and s.wechat_mode == "dev"


def test_unknown_environment_is_refused() -> None:
    assert "HAOYUAN_ENV" in refused({"HAOYUAN_ENV": "staging"})


@pytest.mark.parametrize("level", ["warning", "WARNING", "Info", "DEBUG", "error"])
def test_log_level_in_any_case(level: str) -> None:
    s = Settings.from_env({"HAOYUAN_ENV": "development", "HAOYUAN_LOG_LEVEL": level})
    assert s.log_level == level.lower()


@pytest.mark.parametrize("level", ["debug", "WARNING", "Info"])
def test_cli_log_level_in_any_case(level: str) -> None:
    env = {**os.environ, "HAOYUAN_LOG_LEVEL": level}
    out = subprocess.run([sys.executable, "-m", "engine.cli", "migrate", "--help"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_api_serve_refuses_to_start_without_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAOYUAN_")}
    weak = "dev-token-secret"
    env["HAOYUAN_TOKEN_SECRET"] = weak
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "api.serve", "--port", str(free_port()),
                          "--workers", "1"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and time.monotonic() - t0 < 30
    for name in ALL_SECRETS:
        assert name in out.stderr, out.stderr
    assert weak not in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ running


async def test_development_instance_says_so(redis_url: str, db: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.apikit import settings

    app = create_app(settings(redis_url, db))
    async with AsyncTestClient(app) as c:
        body = (await c.get("/readyz")).json()
        assert body["mode"] == "development" and "development" in body["warning"]
    logged = capsys.readouterr().out
    assert '"mode": "development"' in logged and "development_mode" in logged


async def test_production_instance_refuses_development_credentials(redis_url: str,
                                                                   db: str) -> None:
    # The WeChat verifier points at a closed loopback port: no outside network.
    env = production_env(HAOYUAN_REDIS_URL=redis_url, HAOYUAN_PG_DSN=db,
                         HAOYUAN_LOG_LEVEL="warning",
                         HAOYUAN_WECHAT_URL=f"http://127.0.0.1:{free_port()}/sns/jscode2session")
    s = Settings.from_env(env)
    app = create_app(s)
    async with AsyncTestClient(app) as c:
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready",
                                                             "mode": "production"}
        r = await c.post("/v1/auth/wechat", json={"code": "dev-victim_openid"})
        assert r.status_code in (401, 503) and "token" not in r.json()
        r = await c.post("/v1/admin/audit", headers={"Authorization": "Bearer dev-admin-token"})
        assert r.status_code == 401
        forged, _ = TokenSigner("dev-token-secret", 3600).mint("victim")
        r = await c.get("/v1/patients", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401
        body = msgspec.json.encode({"payment_ref": "never-paid", "amount": 5000})
        ts = str(int(time.time()))
        path = "/v1/holds/1.S1.1/confirm"
        for sig in (hmac.new(b"dev-payment-secret", ts.encode() + b"." + body,
                             hashlib.sha256).hexdigest(),
                    sign_payment("dev-payment-secret", ts, body, path=path)):
            r = await c.post("/v1/holds/1.S1.1/confirm", content=body, headers={
                "X-Payment-Timestamp": ts, "X-Payment-Signature": sig,
                "Content-Type": "application/json"})
            assert r.status_code == 401
        for ui in ("/schema/swagger", "/schema/scalar"):
            assert (await c.get(ui)).status_code == 404
        assert (await c.get("/metrics")).status_code == 401


def test_production_insists_on_durable_redis_by_default() -> None:
    """Nothing acknowledged may be lost: without HAOYUAN_DURABILITY a
    production engine wants AOF always (and refuses a Redis without it when
    it connects); development takes Redis as it is; a named mode wins."""
    from engine.config import EngineConfig

    assert EngineConfig.from_env({}).durability == "aof-always"
    assert EngineConfig.from_env({"HAOYUAN_ENV": "development"}).durability == "none"
    assert EngineConfig.from_env({"HAOYUAN_DURABILITY": "wait"}).durability == "wait"
    assert EngineConfig.from_env({"HAOYUAN_DURABILITY": "none"}).durability == "none"


def test_a_production_api_refuses_a_redis_that_keeps_nothing() -> None:
    """The production default (AOF always) against a Redis without AOF: the
    API refuses to start, once, saying what to do; naming the mode starts it."""
    from engine.testing.servers import RedisServer

    redis = RedisServer(appendonly=False)
    redis.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAOYUAN_")}
        env.update(production_env(HAOYUAN_REDIS_URL=redis.url))
        out = subprocess.run([sys.executable, "-m", "api.serve", "--port", str(free_port()),
                              "--workers", "1"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "HAOYUAN_DURABILITY is aof-always" in out.stderr
        assert "appendonly no" in out.stderr and "Traceback" not in out.stderr
    finally:
        redis.cleanup()
