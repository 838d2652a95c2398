"""The `tools` extra (serving benchmarks, an evaluation harness) in a virtual environment of its own, made once per
requirement set in moecluster's cache and reused: its packages stay out of the test environment. uv installs them,
as pip takes minutes over their dependency trees; torch is the test environment's (a .pth file puts its
site-packages after the venv's own), as the tools would otherwise pull a CUDA build several gigabytes large.
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
SHARED = ["torch"]


def tools_requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["tools"]


def tools_bin(cache: Path) -> Path:
    """The bin/ folder of a venv that holds the `tools` extra, made under `cache` unless it is there already,
    over this test environment (each CI run's is a new one)."""
    requirements = tools_requirements()
    key = hashlib.sha256("\n".join([sys.base_prefix, *requirements]).encode()).hexdigest()[:12]
    home = cache / f"tools-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"tools-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent session may be making the same one
        if not (home / "complete").exists():
            _make(home, requirements)
        _layer(home)
    return home / "bin"


def _layer(home: Path) -> None:
    purelib = subprocess.check_output([home / "bin" / "python", "-c",
                                       "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip()
    Path(purelib, "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def _make(home: Path, requirements: list[str]) -> None:
    venv.EnvBuilder(clear=True, with_pip=True).create(home)
    python = home / "bin" / "python"
    excludes = home / "shared.txt"
    excludes.write_text("\n".join(SHARED) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "uv"], check=True)
    subprocess.run([home / "bin" / "uv", "pip", "install", "--quiet", "--python", python, "--excludes", excludes,
                    *requirements], check=True)
    (home / "complete").touch()
