"""Account tokens: a WeChat login code for a token, and logout.

Per client address, failed logins and new accounts are limited (429
``too-many-attempts``); a logout revokes the token on every worker at once
(Redis, checked by every account request; PostgreSQL keeps the record for
``haoyuan rebuild-bindings``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from litestar import Controller, Request, post
from litestar.params import QueryParameter
from redis.exceptions import RedisError

from api.auth import InvalidLoginCode, LoginUnavailable
from api.context import Api, api_of
from api.docs import ACCOUNT, errors
from api.guards import account_required, bearer_of, too_many_attempts
from api.problems import ProblemError
from api.schemas import TokenOut, WechatLoginIn
from engine.store import queries as q
from engine.store.bindings import Revocation, record_revocation


async def revoke_all(api: Api, account: str, revoked_by: str) -> int:
    """Revoke every token of the account minted so far; the bound (unix s)."""
    until = await api.engine.revoke_tokens(account, None,
                                           int(time.time()) + api.settings.token_ttl_s)
    await record_revocation(api.pool, Revocation(account, None, until), revoked_by)
    return until


class AuthController(Controller):
    path = "/v1/auth"
    tags = ("accounts",)

    @post("/wechat", status_code=200, responses=errors(401, 429, 503),
          summary="Exchange a WeChat login code for an account token")
    async def wechat(self, request: Request[Any, Any, Any], data: WechatLoginIn) -> TokenOut:
        """The code is checked server-side (code2Session in production); the
        account is found by a keyed hash of the openid, created on first
        login. Per client address, failed logins and new accounts are
        limited (429 ``too-many-attempts`` with Retry-After)."""
        api = api_of(request)
        path: str = request.scope["path"]
        wait = await api.limit("login-failure", request.scope, take=False)
        if wait:
            raise ProblemError(too_many_attempts(path, wait))
        try:
            openid = await api.verifier.openid(data.code)
        except InvalidLoginCode:
            await api.limit("login-failure", request.scope, take=True)
            raise ProblemError.of("invalid-login-code", instance=path) from None
        except LoginUnavailable:
            raise ProblemError.of("unavailable", "the login service cannot be reached",
                                  instance=path) from None
        openid_hash = api.crypto.openid_hash(openid)
        account = await q.find_account(api.pool, openid_hash)
        if account is None:
            wait = await api.limit("new-account", request.scope, take=True)
            if wait:
                raise ProblemError(too_many_attempts(path, wait))
            account = await q.create_account(api.pool, openid_hash)
        # The openid, encrypted, for the notifier's WeChat messages (once).
        await q.store_openid(api.pool, api.crypto, account, openid)
        # A token must outlive a "log out everywhere" made in this same second.
        now = time.time()
        try:
            floor = await api.engine.tokens_revoked_until(account)
        except (RedisError, OSError):  # the token is checked again on every use
            floor = 0
        if int(now) + api.tokens.ttl_s <= floor:
            now = floor - api.tokens.ttl_s + 1
        token, exp = api.tokens.mint(account, now=now)
        return TokenOut(token=token, expires_at_ms=exp * 1000, account_id=account)

    @post("/logout", status_code=204, before_request=account_required, security=ACCOUNT,
          responses=errors(401), summary="Revoke this token (or every token of the account)")
    async def logout(
        self,
        request: Request[Any, Any, Any],
        everywhere: Annotated[bool, QueryParameter(
            name="everywhere",
            description="Revoke every token of the account, not only this one")] = False,
    ) -> None:
        """The token fails on every worker at once (401), also for holds."""
        api = api_of(request)
        who = bearer_of(request)
        if everywhere:
            await revoke_all(api, who.account, "account")
        else:
            await api.engine.revoke_tokens(who.account, who.token_id, who.exp)
            await record_revocation(api.pool, Revocation(who.account, who.token_id, who.exp),
                                    "account")
