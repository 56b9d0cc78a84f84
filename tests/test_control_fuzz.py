"""The control protocol under malformed, oversized and hostile input: every message gets an error or a
closed connection, never a crash or a hang, and the daemon answers normally afterwards."""
from __future__ import annotations

import json
import random
import socket

from conftest import Daemon

COMMANDS = ["ps", "status", "pause", "resume", "quota_set", "quota_list", "priority", "interposer_attach",
            "policy", "nonsense", ""]
# `trace` is left out: a valid one streams until the client goes, by design. Never a live process in a pid:
# root may run these commands, and the fuzzer runs as root.
NO_SUCH_PIDS = [-1, 0, 1 << 31, 1 << 63, 4194305, 99999999]


def junk(rng: random.Random, depth: int = 0) -> object:
    choices = [lambda: rng.choice(NO_SUCH_PIDS), lambda: rng.random() * 1e300, lambda: None, lambda: True,
               lambda: "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 40))),
               lambda: "\x00" * rng.randrange(1, 5), lambda: float("1e999") if rng.random() < 0.5 else -0.0]
    if depth < 3:
        choices += [lambda: [junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))],
                    lambda: {str(junk(rng, depth + 1))[:10]: junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))}]
    return rng.choice(choices)()


def message(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\n"
    if kind == 1:
        return b"{" * 70000 + b"\n"  # larger than any request may be
    if kind == 2:
        return json.dumps(junk(rng), allow_nan=True).encode(errors="surrogatepass") + b"\n"
    if kind == 3:
        return b'{"cmd": "ps"}\n' * rng.randrange(2, 50)
    request = {"cmd": rng.choice(COMMANDS)}
    for key in rng.sample(["pid", "swap", "bytes", "level", "cgroup", "action", "comm", "version", "shm_fd",
                           "mem_limit", "priority", "json"], rng.randrange(0, 6)):
        request[key] = junk(rng)
    return json.dumps(request, allow_nan=True).encode(errors="surrogatepass") + b"\n"


def exchange(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if sum(map(len, chunks)) > 1 << 20:
                    break
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_fuzzed_requests_never_crash_or_hang_the_daemon(daemon: Daemon) -> None:
    rng = random.Random(20261122)
    for i in range(400):
        payload = message(rng)
        reply = exchange(daemon.socket, payload)  # a hang raises socket.timeout and fails the test
        for line in reply.splitlines():
            answer = json.loads(line)
            assert isinstance(answer, dict) and "ok" in answer, (i, payload[:200], line[:200])
            if not answer["ok"]:
                assert isinstance(answer["error"], str) and "\n" not in answer["error"], answer
        assert daemon.proc.poll() is None, f"the daemon died on message {i}: {payload[:200]!r}"
    assert daemon.status()["health"]["probes_attached"] >= 0
    assert "internal error" not in daemon.log.read_text()
