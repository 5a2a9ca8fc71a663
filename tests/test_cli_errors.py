"""Every CLI error is one line on stderr and exit 1, whatever raised it; ``--debug`` shows the traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from tracker.cli import app

PG = os.environ.get("TRACKER_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _not_a_database(tmp_path: Path) -> str:
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not a database\n")
    return f"sqlite+aiosqlite:///{path}"


@pytest.mark.parametrize("command", [["stats"], ["peers", "list"], ["db", "current"], ["sweep"]])
def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path, command: list[str]) -> None:
    line = one_line_error(run(*command, "--database-url", _not_a_database(tmp_path)))
    assert "file is not a database" in line


def test_a_missing_postgres_database_is_the_drivers_sentence(pg_template: str) -> None:
    url = PG.rsplit("/", 1)[0] + f"/no_such_db_{uuid.uuid4().hex[:8]}"
    line = one_line_error(run("stats", "--database-url", url))
    assert "does not exist" in line and "sqlalchemy" not in line.lower()


def test_a_malformed_url_and_an_unknown_revision_are_one_line(tmp_path: Path) -> None:
    line = one_line_error(run("stats", "--database-url", "postgresql+asyncpg://u@127.0.0.1:notaport/x"))
    assert "notaport" in line
    url = f"sqlite+aiosqlite:///{tmp_path / 't.db'}"
    assert run("db", "upgrade", "--database-url", url).exit_code == 0
    line = one_line_error(run("db", "upgrade", "--revision", "9999", "--database-url", url))
    assert "9999" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("stats", "--debug", "--database-url", _not_a_database(tmp_path))
    assert result.exit_code != 0 and result.exception is not None
    assert "file is not a database" in str(result.exception)


def test_tracker_auto_migrate_in_the_environment_is_honoured(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    assert run("db", "upgrade", "--revision", "0005", "--database-url", url).exit_code == 0
    line = one_line_error(run("stats", "--database-url", url))
    assert "TRACKER_AUTO_MIGRATE=true" in line  # what the message tells a CLI user to do...
    result = run("stats", "--json", "--database-url", url, env={"TRACKER_AUTO_MIGRATE": "true"})
    assert result.exit_code == 0, result.output  # ...works
    assert run("db", "check", "--database-url", url).exit_code == 0


def test_serve_on_a_taken_port_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    database = tmp_path / "t.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = f"sqlite+aiosqlite:///{database}"
        result = subprocess.run(
            [sys.executable, "-m", "tracker", "serve", "--port", str(port), "--database-url", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert not database.exists()
