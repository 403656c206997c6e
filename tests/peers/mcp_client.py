#!/usr/bin/env python3
"""An MCP client built with the official Python MCP SDK (mcp 2.x): the SDK's Streamable HTTP
transport (`streamable_http_client`) and `ClientSession`, the way an agent's MCP host talks to
a server. tests/mcp.rs points it at Mandate's gateway (/mcp/{name}) or straight at the
upstream (tests/peers/mcp_upstream.py).

    mcp_client.py URL TOKEN < steps.json        (TOKEN "" or "-": no Authorization header)
    mcp_client.py --stdio COMMAND [ARG...] < steps.json

Every HTTP request carries `Authorization: Bearer TOKEN`. With --stdio the client runs COMMAND
with the SDK's stdio transport (`stdio_client`), as a desktop agent runs a local server (for
tests/mcp_stdio.rs: `mandate mcp wrap … -- python3 mcp_upstream.py --stdio`), passing it this
process's whole environment (the SDK passes only HOME, PATH and a few others by default). The client runs the `initialize`
handshake, then the steps (a JSON list on stdin) in that one session, and prints one JSON
line per step on stdout:

  {"op": "list"}                         -> {"op": "list", "tools": [{"name", "annotations", "_meta"}]}
  {"op": "call", "tool", "arguments"}    -> {"op": "call", "tool", "isError", "text": [...],
                                             "structuredContent", "_meta",
                                             "progress": [[progress, total, message]...],
                                             "logs": [data...], "content_type"}
  {"op": "sleep", "seconds": 1}          -> {"op": "sleep", "seconds": 1}
  {"op": "resources"}                    -> {"op": "resources", "uris": [...]}
  {"op": "prompts"}                      -> {"op": "prompts", "names": [...]}
  {"op": "read", "uri"}                  -> {"op": "read", "uri", "text": [...]}

Before the steps: {"op": "initialize", "protocolVersion", "serverInfo"} and, once,
{"op": "session", "id": <Mcp-Session-Id or null>}. A protocol-level failure of a step (a
JSON-RPC error, an HTTP error) is printed as {"op", "error", "code", "http_status"} and the
next step runs; if `initialize` fails, every step is reported as failed the same way.
`content_type` is that of the last tools/call POST's answer (text/event-stream when it came as
SSE); `http_status` that of the last POST of the step. Over stdio both are null, and
{"op": "session"} has a null id.
"""
import asyncio
import json
import os
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


class Wire:
    """What the HTTP layer saw: the last POST's status and content type, the session id."""

    def __init__(self) -> None:
        self.status = None
        self.content_types = {}
        self.session_id = None

    async def on_response(self, response: httpx2.Response) -> None:
        if response.request.method == "POST":
            self.status = response.status_code
            try:
                method = json.loads(response.request.content).get("method")
            except (ValueError, AttributeError):
                method = None
            self.content_types[method] = response.headers.get("content-type")
        sid = response.headers.get("mcp-session-id")
        if sid and self.session_id is None:
            self.session_id = sid


def error_line(op: str, exc: BaseException, wire: Wire, **extra) -> dict:
    out = {"op": op, **extra, "error": str(exc) or type(exc).__name__, "code": None}
    if isinstance(exc, MCPError):
        out["error"] = exc.message
        out["code"] = exc.code
    if wire.status is not None and wire.status >= 400:
        out["http_status"] = wire.status
    return out


def tool_line(tool) -> dict:
    return {
        "name": tool.name,
        "annotations": (
            tool.annotations.model_dump(by_alias=True, exclude_none=True, mode="json")
            if tool.annotations is not None
            else None
        ),
        "_meta": tool.meta,
    }


async def call(session: ClientSession, wire: Wire, step: dict, logs: list) -> dict:
    progress = []

    async def on_progress(p, total, message) -> None:
        progress.append([p, total, message])

    logs.clear()
    wire.content_types.pop("tools/call", None)
    result = await session.call_tool(
        step["tool"], step.get("arguments") or {}, progress_callback=on_progress
    )
    return {
        "op": "call",
        "tool": step["tool"],
        "isError": result.is_error,
        "text": [c.text for c in result.content if getattr(c, "type", None) == "text"],
        "structuredContent": result.structured_content,
        "_meta": result.meta,
        "progress": progress,
        "logs": list(logs),
        "content_type": wire.content_types.get("tools/call"),
    }


async def run_step(session: ClientSession, wire: Wire, step: dict, logs: list) -> dict:
    op = step.get("op")
    if op == "list":
        result = await session.list_tools()
        return {"op": "list", "tools": [tool_line(t) for t in result.tools]}
    if op == "call":
        return await call(session, wire, step, logs)
    if op == "resources":
        result = await session.list_resources()
        return {"op": "resources", "uris": [str(r.uri) for r in result.resources]}
    if op == "prompts":
        result = await session.list_prompts()
        return {"op": "prompts", "names": [p.name for p in result.prompts]}
    if op == "read":
        result = await session.read_resource(step["uri"])
        texts = [getattr(c, "text", None) for c in result.contents]
        return {"op": "read", "uri": step["uri"], "text": texts}
    if op == "sleep":
        await asyncio.sleep(float(step.get("seconds", 1)))
        return {"op": "sleep", "seconds": step.get("seconds", 1)}
    return {"op": op, "error": f"unknown op {op!r}", "code": None}


def failed_step(step: dict, message: str, wire: Wire) -> dict:
    return {
        "op": step.get("op"),
        **({"tool": step["tool"]} if "tool" in step else {}),
        "error": message,
        "code": None,
        "http_status": wire.status,
    }


async def session_steps(transport, wire: Wire, steps: list, done: list) -> None:
    """initialize, then each step over `transport` (the client's async context manager);
    `done` gets one entry per line printed (for main)."""
    logs: list = []

    async def on_log(params) -> None:
        logs.append(params.data)

    async with transport as (read, write):
        async with ClientSession(read, write, logging_callback=on_log) as session:
            try:
                init = await session.initialize()
            except Exception as exc:  # a failed handshake is reported, never a crash
                emit(error_line("initialize", exc, wire))
                done.append("initialize")
                return
            emit(
                {
                    "op": "initialize",
                    "protocolVersion": init.protocol_version,
                    "serverInfo": init.server_info.name,
                }
            )
            emit({"op": "session", "id": wire.session_id})
            done.extend(["initialize", "session"])
            for step in steps:
                wire.status = None
                try:
                    emit(await run_step(session, wire, step, logs))
                except Exception as exc:
                    extra = {"tool": step["tool"]} if "tool" in step else {}
                    emit(error_line(step.get("op"), exc, wire, **extra))
                done.append(step)


async def main() -> None:
    steps = json.load(sys.stdin)
    wire = Wire()
    done: list = []
    try:
        if sys.argv[1] == "--stdio":
            params = StdioServerParameters(
                command=sys.argv[2], args=sys.argv[3:], env=dict(os.environ)
            )
            await session_steps(stdio_client(params), wire, steps, done)
        else:
            url, token = sys.argv[1], sys.argv[2]
            headers = {} if token in ("", "-") else {"authorization": f"Bearer {token}"}
            http = httpx2.AsyncClient(
                headers=headers,
                timeout=httpx2.Timeout(30.0, read=60.0),
                event_hooks={"response": [wire.on_response]},
            )
            async with http:
                await session_steps(
                    streamable_http_client(url, http_client=http), wire, steps, done
                )
    except BaseException as exc:  # the transport itself failed (connection refused, reset...)
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        if isinstance(exc, KeyboardInterrupt):
            raise
        if not done:
            emit(error_line("initialize", exc, wire))
            done.append("initialize")
        message = f"transport failed: {exc}"
    else:
        message = "not initialized"
    # Whatever did not run is still answered, one line per step.
    if "session" not in done:
        emit({"op": "session", "id": wire.session_id})
    for step in steps[len(done) - 2 if "session" in done else 0 :]:
        emit(failed_step(step, message, wire))


if __name__ == "__main__":
    asyncio.run(main())
