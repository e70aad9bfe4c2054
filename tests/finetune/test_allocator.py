import os
import subprocess
import sys

import pytest

from finetune import allocator

GLIBC = allocator.process_env({}).get("GLIBC_TUNABLES") == allocator.TUNABLE
pytestmark = pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")

SHOW = "import os; from finetune.allocator import restart_with_tunable; restart_with_tunable(); "


def test_the_tunable_is_added_to_the_ones_set_and_only_once():
    env = allocator.process_env({"GLIBC_TUNABLES": "glibc.malloc.mxfast=0", "PATH": "/bin"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.mxfast=0:{allocator.TUNABLE}", "PATH": "/bin"}
    assert allocator.process_env(env) == env


def test_a_process_restarts_once_with_it_and_keeps_its_arguments():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    code = SHOW + "import sys; print(repr((os.environ['GLIBC_TUNABLES'], sys.argv[1:])))"
    out = subprocess.run(
        [sys.executable, "-c", code, "a b", "--flag"], env=env, capture_output=True, text=True, check=True
    )
    # One line: the first process was replaced, not run on after the restart.
    assert out.stdout.splitlines() == [repr((allocator.TUNABLE, ["a b", "--flag"]))]


def test_the_kettle_command_runs_with_it(tmp_path):
    # `python -m tui.cli` (what the app's brews run) goes through the same entry as `kettle`.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    probe = tmp_path / "sitecustomize.py"  # runs at the start of every Python process started
    probe.write_text(
        f"import os\nopen({str(tmp_path / 'seen')!r}, 'a').write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n"
    )
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    subprocess.run([sys.executable, "-m", "tui.cli", "--help"], env=env, capture_output=True, check=True)
    assert (tmp_path / "seen").read_text().splitlines() == ["-", allocator.TUNABLE]
