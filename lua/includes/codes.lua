-- Outcome codes of every decision, mirrored by engine.outcomes.Code
-- (tests/test_lua_contract.py holds the two tables against each other).
local OK = 0
local NOT_OPEN = -1
local SOLD_OUT = -2
local SUSPENDED = -3
local DUPLICATE = -4
local RATE_LIMITED = -5
local EXPIRED = -6
local NOT_FOUND = -7
local INVALID_STATE = -8
local IDEMPOTENCY_MISMATCH = -9
local CLOSED = -10
local CANCEL_DEADLINE = -11
local BANNED = -12
local LIMIT_REACHED = -13
local WAITLIST_FULL = -14
local RECOVERING = -15
local PAUSED = -16
