"""Loads ``lua/`` once, runs scripts by SHA with a NOSCRIPT fallback, and
coalesces concurrent calls into pipelines.

Script files are named ``verbNoun-K.lua`` where K is the number of KEYS
(``N`` for a variable count); the loader checks every call against it.
``-- @include name`` lines are replaced by ``lua/includes/name.lua``.

Batching: Python, not Redis, is the first bottleneck (one asyncio process
tops out near a third of what Redis can run). Calls made while a pipeline is
in flight wait in a queue and go out together in the next pipeline, so under
load one round trip carries many decisions and at rest a call goes out at
once. The pipeline is not a transaction: each script is atomic on its own.
On a Redis Cluster the batch splits by the node that owns each call's slot
(every key of a call shares one hash tag): one pipeline per node, sent at
once; MOVED and ASK answers, and a node lost to a failover, send those calls
again once the slot map was read again (every script is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from engine.replies import Call

R = TypeVar("R")

_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.M)
_NAME = re.compile(r"^(?P<name>[a-zA-Z]+)-(?P<keys>\d+|N)\.lua$")

Arg = str | int | bytes
AnyRedis = Redis | RedisCluster


class ScriptError(Exception):
    """A script refused its arguments (``ERR haoyuan: ...``): nothing changed."""


class NotDurable(Exception):
    """The write ran but too few replicas acknowledged it within the timeout:
    the outcome is unknown to the caller, who retries (every script is
    idempotent) or reconciles."""


def lua_dir() -> Path:
    """``lua/`` inside an installed wheel (engine/lua) or in a checkout."""
    packaged = resources.files("engine").joinpath("lua")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "lua"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    num_keys: int | None  # None: any even or script-checked count
    source: str
    sha: str

    @property
    def sha_b(self) -> bytes:
        return self.sha.encode()

    @property
    def read_only(self) -> bool:
        return "flags=no-writes" in self.source.split("\n", 1)[0]


def _stitch(text: str, includes: Path, done: set[str] | None = None,
            stack: frozenset[str] = frozenset()) -> str:
    """Replace each ``-- @include name`` with ``includes/name.lua``, itself
    stitched; each include goes in once per script, where it is first named
    (an include names what it needs, so the order is always right)."""
    done = set() if done is None else done

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in stack:
            raise ValueError(f"include cycle at {name}")
        if name in done:
            return ""
        body = (includes / f"{name}.lua").read_text()
        stitched = _stitch(body, includes, done, stack | {name})
        done.add(name)
        return stitched

    return _INCLUDE.sub(sub, text)


def load_scripts(directory: Path | None = None) -> dict[str, Script]:
    directory = directory or lua_dir()
    out: dict[str, Script] = {}
    for path in sorted(directory.glob("*.lua")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"{path.name}: script names are verbNoun-K.lua")
        source = _stitch(path.read_text(), directory / "includes")
        if not source.startswith("#!lua"):
            raise ValueError(f"{path.name}: must start with the #!lua shebang")
        keys = m.group("keys")
        out[m.group("name")] = Script(
            name=m.group("name"),
            num_keys=None if keys == "N" else int(keys),
            source=source,
            sha=hashlib.sha1(source.encode()).hexdigest(),
        )
    return out


_Pending = tuple[Script, Sequence[str], Sequence[Arg], "asyncio.Future[Any]"]


class ScriptRunner:
    """Runs scripts by SHA; batches concurrent calls into pipelines."""

    def __init__(
        self,
        client: AnyRedis,
        scripts: dict[str, Script] | None = None,
        *,
        batch: bool = True,
        max_batch: int = 512,
        in_flight: int = 2,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self.client = client
        #: Durability mode "wait": every batch ends with WAIT on its connection,
        #: and a write is acknowledged only once that many replicas have it.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.scripts = scripts or load_scripts()
        self.batch = batch
        self.cluster = isinstance(client, RedisCluster)
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._queue: list[_Pending] = []
        self._senders = 0
        self.pipelines_sent = 0
        self.calls_sent = 0

    def _check(self, name: str, keys: Sequence[str]) -> Script:
        script = self.scripts[name]
        if script.num_keys is not None and len(keys) != script.num_keys:
            raise ValueError(f"{name} takes {script.num_keys} keys, got {len(keys)}")
        return script

    async def load_all(self) -> None:
        for s in self.scripts.values():
            try:
                sha = await self.client.script_load(s.source)
            except ResponseError as exc:
                raise RuntimeError(f"{s.name}: {exc}") from exc
            if sha != s.sha:
                raise RuntimeError(f"{s.name}: Redis computed another SHA")

    async def call(self, call: Call[R], keys: Sequence[str], args: Sequence[Arg]) -> R:
        """Run one script of ``engine.replies`` and decode its typed answer."""
        return call.decode(await self.run(call.script, keys, args))

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        script = self._check(name, keys)
        if not self.batch:
            if self.wait_replicas:
                raise RuntimeError("durability 'wait' needs batching")
            return await self._run_one(script, keys, args)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, fut))
        if self._senders < self.in_flight:
            self._senders += 1
            asyncio.get_running_loop().create_task(self._sender())
        return await fut

    async def _run_one(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # The script did not run (restart, failover, SCRIPT FLUSH): load it and go again.
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            raise _translate(exc) from exc

    async def _sender(self) -> None:
        try:
            # Yield once so that calls made in this same loop iteration join the batch.
            await asyncio.sleep(0)
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                await self._send(batch)
        finally:
            self._senders -= 1

    async def _send(self, batch: list[_Pending]) -> None:
        self.pipelines_sent += 1
        self.calls_sent += len(batch)
        try:
            results = await self._pipeline_retrying(batch)
            # The scripts that did not run (restart, failover, SCRIPT FLUSH):
            # load them and go again, a few times (a flush may come between).
            for _ in range(5):
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if not missing:
                    break
                for s in {batch[i][0].name: batch[i][0] for i in missing}.values():
                    await self.client.script_load(s.source)
                again = await self._pipeline_retrying([batch[i] for i in missing])
                for i, r in zip(missing, again, strict=True):
                    results[i] = r
        except Exception as exc:  # connection lost for good, timeout: every caller sees it
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (*_, fut), r in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(r, ResponseError):
                fut.set_exception(_translate(r))
            elif isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)

    async def _pipeline_retrying(self, batch: list[_Pending]) -> list[Any]:
        # Every script is idempotent (request ids, hold ids), so a batch whose
        # connection broke may run again; a reply lost mid-way is replayed.
        # On a cluster a failover takes a few node timeouts: more attempts,
        # each after the slot map was read again.
        delay = 0.05
        attempts = 8 if self.cluster else 4
        for attempt in range(attempts):
            try:
                if self.cluster:
                    return await self._pipeline_cluster(batch)
                return await self._pipeline(batch)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                if self.cluster:
                    await self._refresh_slots()
        raise AssertionError("unreachable")

    async def _refresh_slots(self) -> None:
        """Read the cluster's slot map again (after MOVED, ASK or a failover)."""
        assert isinstance(self.client, RedisCluster)
        with contextlib.suppress(Exception):
            await self.client.nodes_manager.initialize()

    async def _pipeline_cluster(self, batch: list[_Pending]) -> list[Any]:
        """On a Redis Cluster: one pipeline per node that owns the calls'
        slots, sent at once, each with our own RESP packing (as ``_pipeline``).
        A call answered MOVED (a slot moved, a failover) runs again once the
        slot map was read again; ASK (its slot is migrating and its keys have
        left) runs again at once on the importing node, after ``ASKING``;
        TRYAGAIN (the slot's keys are split mid-migration) and CLUSTERDOWN
        run again a moment later. Every script is idempotent."""
        assert isinstance(self.client, RedisCluster)
        out: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        ask: dict[int, tuple[str, int]] = {}
        for round_ in range(10):
            groups: dict[tuple[str, bool], tuple[Any, list[int]]] = {}
            for i in todo:
                node = None
                if i in ask:
                    node = self.client.get_node(host=ask[i][0], port=ask[i][1])
                if node is None:
                    ask.pop(i, None)
                    keys = batch[i][1]
                    node = (self.client.get_node_from_key(keys[0]) if keys
                            else self.client.get_default_node())
                if node is None:
                    raise RedisConnectionError("no node owns the slot (the cluster is moving)")
                groups.setdefault((node.name, i in ask), (node, []))[1].append(i)
            await asyncio.gather(*(
                self._node_pipeline(node, [batch[i] for i in idx], idx, out, asking=asking)
                for (_, asking), (node, idx) in groups.items()))
            todo = [i for i in todo if isinstance(out[i], _REDIRECTED)]
            if not todo:
                return out
            ask = {i: out[i].node_addr for i in todo if isinstance(out[i], AskError)}
            if any(isinstance(out[i], MovedError | ClusterDownError) for i in todo) \
                    or any(self.client.get_node(host=h, port=p) is None for h, p in ask.values()):
                await self._refresh_slots()
            if len(ask) < len(todo):  # TRYAGAIN, CLUSTERDOWN, MOVED: a moment
                await asyncio.sleep(min(0.5, 0.05 * (round_ + 1)))
        return out

    async def _node_pipeline(self, node: Any, calls: list[_Pending], idx: list[int],
                             out: list[Any], *, asking: bool = False) -> None:
        conn = node.acquire_connection()
        try:
            for i, r in zip(idx, await self._exchange(conn, calls, asking=asking), strict=True):
                out[i] = r
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)

    async def _exchange(self, conn: Any, calls: list[_Pending], *,
                        asking: bool = False) -> list[Any]:
        """Send the calls (and WAIT, in durability "wait") in one packet with
        our own RESP packing (redis-py's generic packer was two thirds of the
        CPU per decision) and read every reply; an error reply is kept in its
        place, so the stream stays aligned. ``asking``: each call goes after
        an ``ASKING`` (an ASK redirection to a slot's importing node)."""
        prefix = _ASKING if asking else b""
        packed = b"".join(prefix + pack_evalsha(s.sha_b, keys, args)
                          for s, keys, args, _ in calls)
        if self.wait_replicas:
            packed += _wait_command(self.wait_replicas, self.wait_timeout_ms)
        await conn.send_packed_command(packed, check_health=False)
        got: list[Any] = []
        for _ in calls:
            if asking:
                with contextlib.suppress(ResponseError):
                    await conn.read_response()  # +OK of ASKING
            try:
                got.append(await conn.read_response())
            except ResponseError as exc:
                got.append(exc)
        if self.wait_replicas:
            got = self._durable(calls, got, int(await conn.read_response()))
        return got

    def _durable(self, calls: list[_Pending], got: list[Any], acked: int) -> list[Any]:
        """The replies of a batch that ended with WAIT: writes that too few
        replicas acknowledged become ``NotDurable`` (reads stay)."""
        if acked >= self.wait_replicas:
            return got
        err = NotDurable(f"{acked} of {self.wait_replicas} replicas acknowledged")
        return [r if isinstance(r, Exception) or calls[i][0].read_only else err
                for i, r in enumerate(got)]

    async def _pipeline(self, batch: list[_Pending]) -> list[Any]:
        """One round trip on a raw pooled connection (``_exchange``)."""
        assert isinstance(self.client, Redis)  # a cluster goes through _pipeline_cluster
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return await self._exchange(conn, batch)
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)


_ASKING = b"*1\r\n$6\r\nASKING\r\n"
#: Answers of a cluster that say "not here, not now": the call runs again.
_REDIRECTED = (MovedError, AskError, TryAgainError, ClusterDownError)


def _wait_command(replicas: int, timeout_ms: int) -> bytes:
    """RESP for ``WAIT replicas timeout``."""
    return b"*3\r\n$4\r\nWAIT\r\n" + b"".join(
        b"$%d\r\n%b\r\n" % (len(v), v) for v in (str(replicas).encode(), str(timeout_ms).encode()))


def pack_evalsha(sha: bytes, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    """RESP for ``EVALSHA sha numkeys keys... args...``."""
    items = [k.encode() for k in keys]
    items += [a if isinstance(a, bytes) else str(a).encode() for a in args]
    nk = str(len(keys)).encode()
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$%d\r\n%b\r\n" % (
        3 + len(items), sha, len(nk), nk)
    return head + b"".join([b"$%d\r\n%b\r\n" % (len(b), b) for b in items])


def _translate(exc: ResponseError) -> Exception:
    text = str(exc)
    if "haoyuan:" in text:
        return ScriptError(text.split("haoyuan:", 1)[1].strip())
    return exc
