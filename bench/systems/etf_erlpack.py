"""Frames with erlpack ETF, as a Python user outside sshrpc would write them:
what the asyncssh and paramiko comparison systems use on the wire."""

from __future__ import annotations

from typing import Any

import erlpack

CALL = erlpack.Atom("call")
REPLY = erlpack.Atom("reply")
HELLO = erlpack.Atom("hello")
MODULE = erlpack.Atom("sshrpc_bench")
FUNCTION = erlpack.Atom("echo")


def frame(term: Any) -> bytes:
    payload = erlpack.pack(term)
    return len(payload).to_bytes(4, "big") + payload


def call_frame(call_id: int, value: Any) -> bytes:
    return frame((CALL, call_id, MODULE, FUNCTION, [value]))


def hello_frame(max_frame: int, who: str, role: str = "client") -> bytes:
    return frame(
        (HELLO, 1, {erlpack.Atom("max_frame"): max_frame, erlpack.Atom(role): who.encode()})
    )


def unpack(payload: bytes) -> Any:
    return erlpack.unpack(payload)
