"""An OpenAI-compatible endpoint that answers at once, for measuring the remote backend.

`python -m benchmarks.fake_endpoint --ports 8` listens on 8 loopback ports in one process
and prints one `http://127.0.0.1:PORT/v1` line per port when ready. Every port serves one
model (`--model`, default "fake"):

- `GET /v1/models`: the model, `owned_by` "fake";
- `POST /v1/chat/completions`: one choice whose content is a valid answer of
  `examples/character.schema.json` (the seed's Character), a short `reasoning_content`,
  `finish_reason` "stop" and a `usage` block — the same bytes every time, built once;
- `GET /stats`: how many requests it answered (JSON), so a benchmark can count what the
  runner sent.

It is an `asyncio.Protocol` that reads HTTP/1.1 requests (keep-alive, pipelining, bodies
by Content-Length) and writes a prebuilt response, without parsing the JSON body: it must
not be what limits a benchmark. `benchmarks/remote_ceiling.py` measures it alone (wrk, and
a raw-socket client) before measuring the runner against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

ANSWER = {"name": "Ayla", "gender": "female", "age": 31, "class": "support", "level": 3}


def _response(body: dict, status: str = "200 OK") -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def chat_answer(model: str) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": json.dumps(ANSWER),
                    "reasoning_content": "A support character fits a kind person.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160},
    }


class Endpoint(asyncio.Protocol):
    """One connection: split the byte stream into requests, answer each in order."""

    counts = {"chat": 0, "models": 0, "other": 0}
    responses: dict[str, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return  # the body is still coming
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(self._answer(head.split(b" ", 2)[1]))  # type: ignore[attr-defined]

    def _answer(self, path: bytes) -> bytes:
        if path.endswith(b"/chat/completions"):
            self.counts["chat"] += 1
            return self.responses["chat"]
        if path.endswith(b"/models"):
            self.counts["models"] += 1
            return self.responses["models"]
        if path == b"/stats":
            return _response(dict(self.counts))
        self.counts["other"] += 1
        return self.responses["missing"]


async def serve(ports: list[int], model: str) -> None:
    Endpoint.responses = {
        "chat": _response(chat_answer(model)),
        "models": _response({"object": "list", "data": [{"id": model, "owned_by": "fake"}]}),
        "missing": _response({"error": {"message": "not found"}}, "404 Not Found"),
    }
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        servers.append(await loop.create_server(Endpoint, sock=sock, backlog=1024))
    for server in servers:
        port = server.sockets[0].getsockname()[1]
        print(f"http://127.0.0.1:{port}/v1", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ports", type=int, default=1, help="how many endpoints to serve")
    parser.add_argument("--model", default="fake", help="the served model id")
    args = parser.parse_args()
    try:
        asyncio.run(serve([0] * args.ports, args.model))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
