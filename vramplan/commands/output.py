"""Output discipline shared by every command.

Results go to stdout, messages to stderr. `--json` prints one versioned envelope on stdout,
also on failure. Rich markup is never interpreted in user-supplied text; NO_COLOR (and
`--no-color`) turn colour off. Tracebacks appear only with VRAMPLAN_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from vramplan.contract import ENV_DEBUG, ENV_NO_COLOR, ContractError
from vramplan.errors import ExitCode, VramplanError

SCHEMA = "vramplan/1"
ENVELOPE_KEYS = ("schema", "command", "status", "exit_code", "data", "warnings", "errors")


def debug_enabled() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0")


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR")) or os.environ.get(ENV_NO_COLOR, "") not in ("", "0")


def _width(stream) -> int | None:
    if os.environ.get("COLUMNS"):
        return None  # rich reads COLUMNS itself
    try:
        return None if stream.isatty() else 160
    except (AttributeError, ValueError):
        return 160


def stdout_console():
    """The console for results (tables). Imported lazily: rich is not free to import."""
    from rich.console import Console

    return Console(file=sys.stdout, no_color=_no_color(), highlight=False, width=_width(sys.stdout))


def stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr, no_color=_no_color(), highlight=False, width=_width(sys.stderr))


def message(text: str) -> None:
    """A progress/info message for humans: stderr, never interpreted as markup."""
    click.echo(text, err=True)


def warn(text: str) -> None:
    click.echo(f"vramplan: warning: {text}", err=True)


def envelope(
    command: str,
    status: str,
    exit_code: int,
    data: dict | None = None,
    warnings: list[str] | None = None,
    errors: list[dict] | None = None,
) -> dict:
    """The `--json` envelope. Keys are pinned by tests/test_cli_basics.py."""
    return {
        "schema": SCHEMA,
        "command": command,
        "status": status,
        "exit_code": int(exit_code),
        "data": data if data is not None else {},
        "warnings": list(warnings or []),
        "errors": list(errors or []),
    }


def emit_json(env: dict) -> None:
    click.echo(json.dumps(env, indent=2, sort_keys=True, default=str))


@dataclass
class CommandResult:
    """What a command returns to the CLI boundary.

    Args:
        status: "ok", "no_fit", "fail", "error", ... (command-specific, documented in README).
        exit_code: the process exit code.
        data: JSON-serialisable payload (the envelope's `data`).
        render: draws the human output on a stdout console; None prints nothing.
        warnings: one-line warnings (stderr in human mode, `warnings` in JSON).
    """

    status: str
    exit_code: ExitCode
    data: dict = field(default_factory=dict)
    render: Callable[[Any], None] | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def print_error(err: VramplanError | str, hint: str = "") -> None:
    if isinstance(err, VramplanError):
        msg, hint = err.message, err.hint
    else:
        msg = err
    click.echo(f"vramplan: error: {msg}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


def _exit_with_error(command: str, json_mode: bool, status: str, code: ExitCode, error: dict) -> NoReturn:
    """Say one error (the envelope, or a `vramplan: error:` line and its hint) and exit with `code`."""
    if json_mode:
        emit_json(envelope(command, status, code, errors=[error]))
    else:
        print_error(error["message"], error.get("hint", ""))
    sys.exit(int(code))


def _result_of(command: str, json_mode: bool, fn: Callable[[], CommandResult]) -> CommandResult:
    """`fn()`, or (exiting) its error as one line: expected errors, Ctrl-C, and bugs without a traceback."""
    try:
        return fn()
    except VramplanError as e:
        if debug_enabled():
            traceback.print_exc()
        _exit_with_error(command, json_mode, "error", e.exit_code, e.to_dict())
    except ContractError as e:  # a shared file (plan, profile, run dir) or value that is unusable: bad input
        if debug_enabled():
            traceback.print_exc()
        _exit_with_error(command, json_mode, "error", ExitCode.USAGE,
                         {"code": "usage", "message": e.message, "hint": e.hint})
    except KeyboardInterrupt:
        _exit_with_error(command, json_mode, "interrupted", ExitCode.INTERRUPTED,
                         {"code": "interrupted", "message": "interrupted", "hint": ""})
    except Exception as e:  # noqa: BLE001 - the boundary: one line, traceback only on request
        if debug_enabled():
            traceback.print_exc()
        _exit_with_error(command, json_mode, "error", ExitCode.ERROR,
                         {"code": "internal", "message": f"internal error: {type(e).__name__}: {e}",
                          "hint": "rerun with VRAMPLAN_DEBUG=1 for a traceback and report it"})


def run_command(command: str, json_mode: bool, fn: Callable[[], CommandResult]) -> None:
    """Run a command body and turn its result or error into output and an exit code."""
    result = _result_of(command, json_mode, fn)
    try:
        if json_mode:
            emit_json(envelope(command, result.status, result.exit_code, result.data,
                               result.warnings, result.errors))
        else:
            for w in result.warnings:
                warn(w)
            if result.render is not None:
                result.render(stdout_console())
            for e in result.errors:
                print_error(e.get("message", ""), e.get("hint", ""))
    except BrokenPipeError:  # `vramplan estimate | head`: the reader left; not an error
        sys.stderr.close()
        sys.exit(int(result.exit_code))
    except Exception as e:  # noqa: BLE001 - a rendering bug must not print a traceback either
        if debug_enabled():
            traceback.print_exc()
        print_error(f"internal error while printing the result: {type(e).__name__}: {e}",
                    "rerun with --json, or with VRAMPLAN_DEBUG=1 for a traceback, and report it")
        sys.exit(int(ExitCode.ERROR))
    sys.exit(int(result.exit_code))
