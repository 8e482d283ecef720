#!/usr/bin/env python3
"""Bootstrap for a fresh machine with only Python: ``python3 dev.py demo`` and ``python3 dev.py test``.

Both create ``.venv/`` in the checkout on first use (and again whenever setup.cfg or
pyproject.toml change), install mailq into it with its test tools, then run inside it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".mailq-installed"


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    wanted = _fingerprint()
    if PY.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PY.exists():
        print(f"dev.py: creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print("dev.py: installing mailq and its test tools (pip install -e .[test])", flush=True)
    quiet = ["-q"] if os.environ.get("CI") else []
    subprocess.run([str(PY), "-m", "pip", "install", *quiet, "--disable-pip-version-check",
                    "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def system_packages() -> str:
    """Run tests/setup-system.sh: the Debian packages the suite uses, installed when this runs as root
    where apt works (CI); elsewhere it says why not.  Returns the packages it reports installed.

    Its last line is ``installed: PKG ...``; everything before is passed through.  The suite runs
    either way: tests whose packages are missing skip with the reason.
    """
    try:
        proc = subprocess.Popen(["sh", str(ROOT / "tests" / "setup-system.sh")], stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        print(f"dev.py: cannot run tests/setup-system.sh ({exc}); tests needing system packages skip", flush=True)
        return ""
    installed = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("installed:"):
            installed = line.partition(":")[2].strip()
        else:
            print(f"dev.py: {line}", end="", flush=True)
    proc.wait()
    return installed


def nfs_lane_extras(installed: str) -> None:
    """The NFS lane's Python side (libnfs, mfusepy) once its system side (libnfs-dev, fuse3) is here.

    A failure is printed; the lane then fails where the system side was installed (CI), and skips
    with the reason elsewhere.
    """
    if "libnfs-dev" not in installed.split():
        return
    probe = subprocess.run([str(PY), "-c", "import libnfs, mfusepy"], capture_output=True)
    if probe.returncode == 0:
        return
    print("dev.py: installing the NFS lane's bridge (pip install libnfs mfusepy)", flush=True)
    try:
        subprocess.run([str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", "libnfs", "mfusepy"],
                       check=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"dev.py: could not install the NFS lane's bridge ({exc})", flush=True)


def compile_bytecode() -> None:
    """Byte-compile mailq once: every runner, master and mailq-deliver start reads the .pyc files.

    An editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set (common in
    containers) every process would compile the package again at start-up.
    """
    import compileall

    compileall.compile_dir(str(ROOT / "mailq"), quiet=1)


def lint(env: dict[str, str]) -> int:
    """ruff, then the layering contract in .importlinter (import-linter: dependencies point down)."""
    code = subprocess.call([str(PY), "-m", "ruff", "check", "mailq", "tests", "bench", "dev.py"], cwd=ROOT, env=env)
    if code != 0:
        print("dev.py: ruff found problems (above)", file=sys.stderr)
        return code
    # --no-cache: its cache folder would be one more thing in the checkout; the check takes ~1 s.
    code = subprocess.call([str(VENV / "bin" / "lint-imports"), "--no-cache"], cwd=ROOT, env=env)
    if code != 0:
        print("dev.py: an import breaks the layering contract in .importlinter (above); see "
              "docs/internals.md \"Layering\"", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands: demo [ARGS] | test [PYTEST ARGS] | bench | lint | shell")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    ensure_venv()
    compile_bytecode()
    env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if command == "demo":
        return subprocess.call([str(PY), "-m", "mailq.demo", *rest], cwd=ROOT, env=env)
    if command == "lint":
        return lint(env)
    if command == "test":
        if os.environ.get("MAILQ_NO_SYSTEM_INSTALL"):
            installed = ""
            print("dev.py: MAILQ_NO_SYSTEM_INSTALL is set: no system packages installed or required", flush=True)
        else:
            installed = system_packages()
        nfs_lane_extras(installed)
        if os.geteuid() == 0:
            # As root with the packages installed, the tests that need them must run (tests/support.py).
            env["MAILQ_SYSTEM_PACKAGES"] = installed
        code = lint(env)
        if code != 0:
            print("dev.py: fix the problems above (`python3 dev.py lint` checks again)", file=sys.stderr)
            return code
        return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env)
    if command == "bench":
        code = 0
        for script in sorted((ROOT / "bench").glob("*.py")):
            print(f"== {script.name}", flush=True)
            code |= subprocess.call([str(PY), str(script), *rest], cwd=ROOT, env=env)
        return code
    if command == "shell":
        return subprocess.call([str(PY), *rest], cwd=ROOT, env=env)
    print(f"dev.py: unknown command {command!r} (demo, test, bench, lint, shell)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
