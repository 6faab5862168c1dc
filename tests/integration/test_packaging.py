"""The wheel carries schema.sql: build it, install it in a fresh venv, apply the schema from
there (run outside the source tree, so nothing can come from the checkout)."""

import subprocess
import sys
import venv
import zipfile

import psycopg

from tests.conftest import ROOT


def run(cmd, cwd, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_installs_in_a_fresh_venv_and_applies_the_schema(tmp_path, empty_dsn):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)], cwd=tmp_path)
    (wheel,) = dist.glob("outbox_relay-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"outbox/py.typed", "relay/py.typed"} <= names  # PEP 561: type checkers use our hints

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)

    script = (
        "import sys, psycopg, outbox, outbox.sql\n"
        "assert 'site-packages' in outbox.__file__, outbox.__file__\n"
        "with psycopg.connect(sys.argv[1], autocommit=True) as c:\n"
        "    print(outbox.apply_schema(c, 'from_wheel'))\n"
        "print(len(outbox.sql.schema_sql()))\n"
    )
    out = run([str(py), "-c", script, empty_dsn], cwd=tmp_path).split()
    assert out[0] == str(outbox_version())
    assert int(out[1]) == len((ROOT / "schema.sql").read_text("utf-8"))
    printed = run([str(env_dir / "bin" / "outbox"), "migrate", "--print"], cwd=tmp_path)
    assert printed == (ROOT / "schema.sql").read_text("utf-8")
    with psycopg.connect(empty_dsn) as c:
        assert c.execute("SELECT max(version) FROM from_wheel.local_message_schema").fetchone() == (
            outbox_version(),
        )


def outbox_version():
    import outbox

    return outbox.SCHEMA_VERSION
