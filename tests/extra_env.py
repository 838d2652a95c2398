"""An extra of pyproject.toml (the tools people point at a server; vLLM's CPU build) in a virtual environment of its
own, made once per requirement set in moecluster's cache and reused: its packages stay out of the test environment.

uv installs them, as pip takes minutes over their dependency trees. The test environment lies under each one (a .pth
file puts its site-packages after the venv's own), so moecluster, torch and Ray are the test environment's: torch
and its companions are never installed again (PyPI's torchvision, torchaudio and torchcodec are CUDA builds, which
fail to import beside the CPU torch), and a package the extra pins differently (vLLM's transformers) is the venv's.
"""

import fcntl
import hashlib
import site
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["torch", "torchvision", "torchaudio", "torchcodec"]


def requirements(extra: str) -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"][extra]


def extra_bin(cache: Path, extra: str) -> Path:
    """The bin/ folder of a venv that holds `extra`, made under `cache` unless it is there already, over this test
    environment (each CI run's is a new one)."""
    wanted = requirements(extra)
    key = hashlib.sha256("\n".join([sys.base_prefix, *wanted, *TORCH]).encode()).hexdigest()[:12]
    home = cache / f"{extra}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{extra}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent session may be making the same one
        if not (home / "complete").exists():
            _make(home, wanted)
        _layer(home)
    return home / "bin"


def _layer(home: Path) -> None:
    purelib = subprocess.check_output([home / "bin" / "python", "-c",
                                       "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip()
    Path(purelib, "test_environment.pth").write_text("\n".join([str(ROOT), *site.getsitepackages()]) + "\n")


def _make(home: Path, wanted: list[str]) -> None:
    venv.EnvBuilder(clear=True, with_pip=True).create(home)
    python = home / "bin" / "python"
    excludes = home / "shared.txt"
    excludes.write_text("\n".join(TORCH) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "uv"], check=True)
    subprocess.run([home / "bin" / "uv", "pip", "install", "--quiet", "--python", python, "--excludes", excludes,
                    *wanted], check=True)
    (home / "complete").touch()
