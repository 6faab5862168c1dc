"""The compose file's one-shot database set-up, run as the owner of the tables (OUTBOX_DSN).

`outbox migrate`, then the relay's least-privilege role (docs/security.md): created if missing
(its password set from RELAY_DB_PASSWORD either way) and granted what `outbox grants --role
ROLE` prints, nothing more. The same as `outbox migrate && outbox grants --role outbox_relay |
psql`, in an image that has no psql.

    OUTBOX_DSN         the owner's DSN (whoever runs migrate owns the tables)
    RELAY_DB_ROLE      the relay's role [outbox_relay]
    RELAY_DB_PASSWORD  its password (sent to the server hashed, never in clear)

Exit 0 when done; on failure one line on stderr (no password) and exit 1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
from psycopg import sql


def outbox(*args: str) -> str:
    """Run an `outbox` command; its output, or SystemExit with its error line."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip() or f"outbox {args[0]} failed")
    return done.stdout


def main() -> None:
    role = os.environ.get("RELAY_DB_ROLE", "outbox_relay")
    password = os.environ.get("RELAY_DB_PASSWORD", "")
    if not password:
        raise SystemExit("error: set RELAY_DB_PASSWORD, the relay role's password")
    print(outbox("migrate").strip())
    grants = outbox("grants", "--role", role)  # also refuses a role name that is not one
    try:
        with psycopg.connect(os.environ.get("OUTBOX_DSN", ""), connect_timeout=10) as conn:
            # Hashed here (SCRAM), so the clear password is in no statement and no server log.
            hashed = conn.pgconn.encrypt_password(
                password.encode(), role.encode(), b"scram-sha-256"
            ).decode()
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                    sql.SQL("ALTER" if exists else "CREATE"),
                    sql.Identifier(role),
                    sql.Literal(hashed),
                )
            )
            conn.execute(grants)  # several statements: no parameters, so one simple query
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SystemExit(f"error: relay role {role}: {first}") from None
    print(f"role {role}: login, with the relay's grants")


if __name__ == "__main__":
    main()
