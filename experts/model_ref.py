"""Which checkpoint a version serves, found on each node by the process that reads it.

Every process that reads weights (the controller, each serving replica, each expert worker) may run on a different
machine. A version names its checkpoint once, as a path every node must have or as the embedded default model
(which each node's own install carries), with a fingerprint of its bytes: a process finds the checkpoint on its own
node and refuses to serve a copy that differs, naming the node and the path.
"""

import hashlib
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from experts.checkpoint import CheckpointError

WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones by their safetensors header


@dataclass(frozen=True)
class ModelRef:
    path: str | None  # None: the embedded default model
    fingerprint: str

    @classmethod
    def here(cls, path: str | None) -> "ModelRef":
        """The checkpoint at `path` (None: the default model) as found on this node."""
        return cls(path, fingerprint(_locate(path)))

    def local(self) -> str:
        """This node's copy, once its fingerprint is the version's."""
        found = _locate(self.path)
        mine = fingerprint(found)
        if mine != self.fingerprint:
            raise CheckpointError(f"node {_node()}: the checkpoint at {found} differs from the one this version "
                                  f"serves (fingerprint {mine[:12]}, expected {self.fingerprint[:12]}); every node "
                                  "needs the same files at that path")
        return str(found)


def _locate(path: str | None) -> Path:
    if path is None:
        from cluster.demo_model import default_model_dir  # the default lives with the package that ships it

        return default_model_dir()
    found = Path(path)
    if not (found / "config.json").is_file():
        raise CheckpointError(f"node {_node()}: no checkpoint at {found} (no config.json there); every node that "
                              "serves needs the checkpoint at that path")
    return found


def fingerprint(path: Path) -> str:
    """sha256 over the checkpoint's JSON and safetensors files: their names and bytes, or, for a large safetensors
    file, its name, size and header (every tensor's name, dtype, shape and offsets)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        whole = file.suffix == ".json" or size <= WHOLE_FILE_BYTES
        digest.update(file.read_bytes() if whole else _safetensors_header(file, size))
    return digest.hexdigest()


def _safetensors_header(file: Path, size: int) -> bytes:
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(min(length, size))  # a length beyond the file: not safetensors, and hashed as what is there


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostname()
