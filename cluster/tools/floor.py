"""The physical floor of a hop: one payload echoed over a Unix socket between two processes, with no framing,
serialisation or expert math; what an expert call on one host cannot beat.

Run as `python -m cluster.tools.floor FD BYTES`, it is the echoing process. Times in microseconds.
"""

import socket
import statistics
import subprocess
import sys
import time


def echo_floor_us(payload_bytes: int, iters: int, pause_s: float = 0.0) -> float:
    """Median microseconds to send `payload_bytes` to another process and receive as many back, after one
    warm-up, each round trip `pause_s` after the last."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = subprocess.Popen([sys.executable, "-m", "cluster.tools.floor", str(theirs.fileno()), str(payload_bytes)],
                             pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        payload, reply = bytes(payload_bytes), bytearray(payload_bytes)
        return statistics.median(_round_trips(mine, payload, reply, iters + 1, pause_s)[1:])
    finally:
        mine.close()  # the echo ends at end of stream
        child.wait(timeout=10)


def _round_trips(sock: socket.socket, payload: bytes, reply: bytearray, iters: int, pause_s: float) -> list[float]:
    samples = []
    for _ in range(iters):
        time.sleep(pause_s)
        started = time.perf_counter()
        sock.sendall(payload)
        _receive(sock, memoryview(reply))
        samples.append(1e6 * (time.perf_counter() - started))
    return samples


def _receive(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view` from `sock`; False at end of stream."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def echo(fd: int, payload_bytes: int) -> None:
    sock, buffer = socket.socket(fileno=fd), bytearray(payload_bytes)
    while _receive(sock, memoryview(buffer)):
        sock.sendall(buffer)


if __name__ == "__main__":
    echo(int(sys.argv[1]), int(sys.argv[2]))
