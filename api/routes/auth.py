"""POST /v1/auth/wechat: a WeChat login code for an account token."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post

from api.auth import InvalidLoginCode, LoginUnavailable
from api.context import api_of
from api.docs import errors
from api.problems import ProblemError
from api.schemas import TokenOut, WechatLoginIn
from engine.store import queries as q


class AuthController(Controller):
    path = "/v1/auth"
    tags = ("accounts",)

    @post("/wechat", status_code=200, responses=errors(401, 503),
          summary="Exchange a WeChat login code for an account token")
    async def wechat(self, request: Request[Any, Any, Any], data: WechatLoginIn) -> TokenOut:
        """The code is checked server-side (code2Session in production); the
        account is found by a keyed hash of the openid, created on first login."""
        api = api_of(request)
        try:
            openid = await api.verifier.openid(data.code)
        except InvalidLoginCode:
            raise ProblemError.of("invalid-login-code", instance=request.url.path) from None
        except LoginUnavailable:
            raise ProblemError.of("unavailable", "the login service cannot be reached",
                                  instance=request.url.path) from None
        account = await q.create_account(api.pool, api.crypto.openid_hash(openid))
        token, exp = api.tokens.mint(account)
        return TokenOut(token=token, expires_at_ms=exp * 1000, account_id=account)
