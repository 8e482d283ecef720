"""README's first command: ``python3 dev.py demo`` runs a two-node cluster and checks every copy.

The demo is the first thing a new user runs; a change elsewhere (welcome messages on
``members add`` once broke it: every member got one message more than was posted) must fail
the suite, not the user's first try.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_delivers_every_post_exactly_once(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run([sys.executable, "-m", "mailq.demo", "--dir", str(tmp_path / "demo"), "--posts", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every enabled member got every post exactly once" in done.stdout, done.stdout
    assert "SOME MAIL IS MISSING" not in done.stdout
