"""The `vramplan` command line: a click group whose commands load lazily.

Each command lives in `vramplan/commands/<name>.py` and exposes a click command named
`command`. Commands parse flags, call plain functions, and return a CommandResult to
`vramplan.commands.output.run_command`, which renders it and sets the exit code.
"""

from __future__ import annotations

import importlib
import sys

import click

from vramplan import __version__
from vramplan.commands.output import emit_json, envelope, print_error
from vramplan.errors import ExitCode

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("vramplan.commands.estimate", "Estimate VRAM, CPU RAM, disk and time for every config; pick one."),
    "preflight": ("vramplan.commands.preflight", "Check this machine for every known launch failure."),
    "run": ("vramplan.commands.run", "Plan, preflight, launch the bundled trainer, fall back on OOM."),
    "calibrate": (
        "vramplan.commands.calibrate",
        "Compare measured runs with their estimates; write a calibration file.",
    ),
    "profiles": ("vramplan.commands.profiles", "List, show and validate model/hardware/recipe profiles."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name][0])
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text without importing every command module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vramplan")
@click.option("--no-color", is_flag=True, help="Plain output (also honoured: NO_COLOR=1).")
def cli(no_color: bool) -> None:
    """Plan, check and run QLoRA/LoRA fine-tuning of LLaVA models.

    \b
    $ vramplan estimate --gpus 1x24G
    $ vramplan preflight
    $ vramplan run --auto --demo

    Exit codes: 0 ok, 1 internal error, 2 bad input, 3 nothing fits, 4 preflight failed,
    5 training failed, 6 out of memory, 7 disk full, 130 interrupted.
    """
    if no_color:
        import os

        from vramplan.contract import ENV_NO_COLOR

        os.environ[ENV_NO_COLOR] = "1"


def _command_name(argv: list[str]) -> str:
    for a in argv:
        if a in COMMANDS:
            return a
    return "vramplan"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Click usage errors also honour `--json`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = cli.main(args=argv, prog_name="vramplan", standalone_mode=False)
    except click.exceptions.Abort:
        print_error("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))
    except click.exceptions.ClickException as e:
        if "--json" in argv:
            emit_json(
                envelope(
                    _command_name(argv),
                    "error",
                    ExitCode.USAGE,
                    errors=[
                        {
                            "code": "usage",
                            "message": e.format_message(),
                            "hint": f"see `vramplan {_command_name(argv)} --help`".replace(
                                "vramplan vramplan", "vramplan"
                            ),
                        }
                    ],
                )
            )
        else:
            e.show()
        sys.exit(int(ExitCode.USAGE))
    sys.exit(int(rv or 0))


if __name__ == "__main__":
    main()
