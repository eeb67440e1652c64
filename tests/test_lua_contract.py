"""The Lua <-> Python contract, read from the files themselves: every script's
header against its file name and its body, and the outcome codes of
``lua/includes/codes.lua`` against ``engine.outcomes.Code``. No server:
these fail the moment one side changes without the other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from engine.outcomes import MESSAGES, REASON_OF_CODE, Code, Reason
from engine.replies import CALLS
from engine.scripts import load_scripts, lua_dir

LUA = lua_dir()
SCRIPTS = sorted(p for p in LUA.glob("*.lua"))
_NAME = re.compile(r"^(?P<name>[a-zA-Z]+)-(?P<keys>\d+|N)\.lua$")


def header(path: Path) -> str:
    text = path.read_text()
    start, end = text.find("--[["), text.find("]]")
    assert start != -1 and end > start, f"{path.name}: no --[[ contract ]] header"
    return text[start:end]


def documented_keys(head: str) -> set[int]:
    got: set[int] = set()
    for a, b in re.findall(r"KEYS\[(\d+)(?:\.\.(\d+))?\]", head):
        got |= set(range(int(a), int(b or a) + 1))
    return got


def documented_argv(head: str) -> set[int]:
    return {int(n) for n in re.findall(r"ARGV\[(\d+)\]", head)}


def body_of(path: Path) -> str:
    text = path.read_text()
    return text[text.find("]]") + 2:]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_header_names_every_key_and_argument_the_body_uses(path: Path) -> None:
    m = _NAME.match(path.name)
    assert m, f"{path.name}: scripts are named verbNoun-K.lua"
    head = header(path)
    assert "Input:" in head and "Output:" in head, f"{path.name}: Input/Output missing"
    body = body_of(path)
    used_keys = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)}
    used_argv = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
    if m.group("keys") != "N":
        k = int(m.group("keys"))
        keys = documented_keys(head)
        assert keys == set(range(1, k + 1)), f"{path.name}: header documents KEYS {sorted(keys)}"
        uses_bundle = "bundle()" in body
        assert used_keys <= keys, f"{path.name}: body uses undocumented KEYS {used_keys - keys}"
        if uses_bundle:
            assert k >= 12, f"{path.name}: the session bundle is twelve keys"
    assert used_argv <= documented_argv(head), (
        f"{path.name}: body uses undocumented ARGV {used_argv - documented_argv(head)}")
    assert path.read_text().startswith("#!lua"), f"{path.name}: needs the #!lua shebang"


def test_outcome_codes_are_one_table_on_each_side() -> None:
    common = (LUA / "includes" / "codes.lua").read_text()
    lua_codes = {name: int(v) for name, v in re.findall(r"^local ([A-Z_]+) = (-?\d+)$", common,
                                                        re.M)
                 if name not in ("SLOT_BASE", "POOL_BASE")}
    assert lua_codes == {c.name: int(c) for c in Code}
    assert set(REASON_OF_CODE) == {c for c in Code if c is not Code.OK}
    assert set(MESSAGES) == set(Reason)
    for c, r in REASON_OF_CODE.items():
        assert r.name == Code(c).name, f"{c} maps to {r}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_outcome_a_header_promises_exists(path: Path) -> None:
    head = header(path)
    names = set(re.findall(r"\bo = ([A-Z_]+)", head))
    names |= {n for group in re.findall(r"\{o = ([A-Z_ |]+)\}", head)
              for n in re.split(r"\s*\|\s*", group) if n}
    assert names <= {c.name for c in Code}, f"{path.name}: unknown outcomes {names}"


def test_the_loader_stitches_every_include_and_checks_key_counts() -> None:
    scripts = load_scripts()
    assert set(scripts) == {_NAME.match(p.name).group("name") for p in SCRIPTS}  # type: ignore[union-attr]
    for s in scripts.values():
        assert "-- @include" not in s.source, f"{s.name}: an include was not stitched"


def test_every_script_has_one_typed_call_and_every_call_a_script() -> None:
    """``engine.replies.CALLS`` names each script once, with its reply type."""
    names = [c.script for c in CALLS]
    assert len(names) == len(set(names))
    assert set(names) == set(load_scripts())


def _struct_fields(t: object) -> set[str]:
    """Every encoded field name of a msgspec type and the structs inside it."""
    import msgspec

    out: set[str] = set()
    seen: set[int] = set()

    def walk(info: object) -> None:
        if id(info) in seen:
            return
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.StructType):
            for f in info.fields:
                out.add(f.encode_name)
                walk(f.type)
        for attr in ("item_type", "value_type"):
            if hasattr(info, attr):
                walk(getattr(info, attr))
        for sub in getattr(info, "types", ()) or ():
            walk(sub)

    walk(msgspec.inspect.type_info(t))
    return out


@pytest.mark.parametrize("call", [c for c in CALLS
                                  if hasattr(getattr(c.decode, "__self__", None), "type")],
                         ids=lambda c: c.script)
def test_every_field_an_output_header_names_decodes(call: Any) -> None:
    """The fields a script's header promises in ``Output: {...}`` are fields
    of its typed reply (``engine.replies``), nested ones included."""
    path = next(LUA.glob(f"{call.script}-*.lua"))
    out = header(path).split("Output:", 1)[1]
    promised: set[str] = set()
    for group in re.findall(r"\{([^{}]*)\}", out):
        for item in group.split(","):
            m = re.match(r"\s*([a-z_]+)\b", item)
            if m:
                promised.add(m.group(1))
    t = call.decode.__self__.type
    if t is dict or getattr(t, "__origin__", None) is dict:
        return
    missing = promised - _struct_fields(t) - {"field", "unit", "record"}
    assert not missing, f"{path.name} promises {sorted(missing)}, {t.__name__} lacks them"
