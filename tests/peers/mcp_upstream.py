#!/usr/bin/env python3
"""An upstream MCP server built with the official Python MCP SDK (mcp 2.x, `MCPServer`,
formerly FastMCP), served over Streamable HTTP on 127.0.0.1: the server Mandate's MCP gateway
(/mcp/{name}) fronts in tests/mcp.rs.

    mcp_upstream.py [PORT]                    (PORT 0 or absent: a free port)
    mcp_upstream.py --stdio [--counts FILE]   (the stdio transport; tests/mcp_stdio.rs)

When it is ready it prints exactly one line, `listening on http://127.0.0.1:PORT/mcp`. With
--stdio it speaks MCP on stdin/stdout instead (and prints nothing else there); with --counts
it writes FILE at start and after every tool call or resource read (replaced whole, so a
reader never sees half of it):
  {"counts": {...as /counts}, "reads": {...as /reads}, "env": [the names of its environment
   variables], "token_in_env": whether MANDATE_TOKEN is one of them}

Tools (deterministic, nothing real is done):
  read_record(id)            readOnlyHint            -> "record {id}: status active"
  transfer(account, amount)  destructiveHint         -> "transferred {amount} to {account}",
                                                        with structuredContent
  shell(command)                                     -> "ran: {command}" (never runs anything)
  slow_count(n)              readOnlyHint            -> n progress notifications and n log
                                                        messages on the response's SSE stream,
                                                        then "counted to {n}"
  demote_reads()             readOnlyHint            -> read_record loses readOnlyHint, and a
                                                        notifications/tools/list_changed goes
                                                        out on the call's stream

Plain HTTP routes beside the MCP endpoint, for the test to see what reached this server:
  GET /counts  {"read_record": 0, "transfer": 0, "shell": 0, "slow_count": 0, "demote_reads": 0}
  GET /reads   {"docs://handbook": 0, "secrets://payroll": 0}  (resource reads)
  GET /calls   [{"tool", "arguments", "session", "authorization"}] in arrival order, where
               `session` is the Mcp-Session-Id header of the call and `authorization` the
               Authorization header it carried (null when none: Mandate must not forward the
               agent's token).
"""
import asyncio
import json
import os
import socket
import sys
import warnings

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import CallToolResult, TextContent, ToolAnnotations, ToolListChangedNotification
from starlette.requests import Request
from starlette.responses import JSONResponse

# Log notifications are deprecated for 2026-07-28 sessions only; the handshake era (2025-11-25,
# what `initialize` negotiates) still has them, and they are what slow_count streams.
warnings.filterwarnings("ignore", category=MCPDeprecationWarning)

TOOLS = ("read_record", "transfer", "shell", "slow_count", "demote_reads")
counts = {name: 0 for name in TOOLS}
# Resource reads that reached this server (GET /reads).
reads = {"docs://handbook": 0, "secrets://payroll": 0}
calls = []

server = MCPServer("mandate-test-upstream", version="1.0.0", log_level="WARNING")
# --counts FILE: where the counts are written after each call (stdio mode has no HTTP routes).
counts_file = None


def write_counts() -> None:
    if counts_file is None:
        return
    state = {
        "counts": counts,
        "reads": reads,
        "env": sorted(os.environ),
        "token_in_env": "MANDATE_TOKEN" in os.environ,
    }
    partial = counts_file + ".partial"
    with open(partial, "w") as f:
        json.dump(state, f)
    os.replace(partial, counts_file)


def seen(tool: str, arguments: dict, ctx: Context) -> None:
    """Count a call that reached this server, with the headers it came with."""
    counts[tool] += 1
    write_counts()
    headers = ctx.headers or {}
    calls.append(
        {
            "tool": tool,
            "arguments": arguments,
            "session": headers.get("mcp-session-id"),
            "authorization": headers.get("authorization"),
        }
    )


@server.resource("docs://handbook", name="handbook")
def handbook() -> str:
    """A document any agent may read (the example bundle permits docs://)."""
    reads["docs://handbook"] += 1
    write_counts()
    return "the handbook"


@server.resource("secrets://payroll", name="payroll")
def payroll() -> str:
    """A resource no agent may read."""
    reads["secrets://payroll"] += 1
    write_counts()
    return "salaries"


@server.prompt(name="summarize")
def summarize(text: str) -> str:
    """A prompt the example bundle does not permit."""
    return f"Summarize: {text}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True), structured_output=False)
def read_record(id: str, ctx: Context) -> str:
    """Read one record by id."""
    seen("read_record", {"id": id}, ctx)
    return f"record {id}: status active"


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
def transfer(account: str, amount: int, ctx: Context) -> CallToolResult:
    """Transfer an amount to an account."""
    seen("transfer", {"account": account, "amount": amount}, ctx)
    return CallToolResult(
        content=[TextContent(type="text", text=f"transferred {amount} to {account}")],
        structured_content={
            "account": account,
            "amount": amount,
            "transfer_id": f"tr-{counts['transfer']}",
        },
    )


@server.tool(structured_output=False)
def shell(command: str, ctx: Context) -> str:
    """Run a shell command (this test server only echoes it)."""
    seen("shell", {"command": command}, ctx)
    return f"ran: {command}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True), structured_output=False)
async def slow_count(n: int, ctx: Context) -> str:
    """Count to n slowly, reporting progress and logging each step."""
    seen("slow_count", {"n": n}, ctx)
    for i in range(1, n + 1):
        await ctx.report_progress(i, n, f"step {i}")
        await ctx.info(f"count {i}")
        await asyncio.sleep(0.05)
    return f"counted to {n}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True), structured_output=False)
async def demote_reads(ctx: Context) -> str:
    """Declare read_record no longer read-only, and tell the client the tools changed (a
    notifications/tools/list_changed on this call's stream): what an upstream whose tools
    change does."""
    seen("demote_reads", {}, ctx)
    tool = server._tool_manager.get_tool("read_record")
    tool.annotations = ToolAnnotations(read_only_hint=False)
    await ctx.request_context.session.send_notification(
        ToolListChangedNotification(), related_request_id=ctx.request_id
    )
    return "read_record is no longer read-only"


@server.custom_route("/counts", methods=["GET"])
async def get_counts(request: Request) -> JSONResponse:
    return JSONResponse(counts)


@server.custom_route("/reads", methods=["GET"])
async def get_reads(request: Request) -> JSONResponse:
    return JSONResponse(reads)


@server.custom_route("/calls", methods=["GET"])
async def get_calls(request: Request) -> JSONResponse:
    return JSONResponse(calls)


async def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    # host 127.0.0.1: the SDK's DNS-rebinding guard accepts only Host 127.0.0.1:*,
    # localhost:* and [::1]:*, which is what a gateway on loopback sends.
    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    http = uvicorn.Server(config)
    serving = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started:
        if serving.done():
            await serving  # startup failed: raise its error
            sys.exit(1)
        await asyncio.sleep(0.01)
    print(f"listening on http://127.0.0.1:{port}/mcp", flush=True)
    await serving


def stdio(argv: list) -> None:
    global counts_file
    if "--counts" in argv:
        counts_file = argv[argv.index("--counts") + 1]
    write_counts()
    server.run("stdio")


if __name__ == "__main__":
    try:
        if "--stdio" in sys.argv[1:]:
            stdio(sys.argv[1:])
        else:
            asyncio.run(main())
    except KeyboardInterrupt:
        pass
