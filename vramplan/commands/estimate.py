"""`vramplan estimate` (placeholder until its issue lands)."""

import click

from vramplan.errors import VramplanError
from vramplan.output import run_command


@click.command("estimate")
@click.option("--json", "json_mode", is_flag=True, help="Print the versioned JSON envelope on stdout.")
def command(json_mode: bool) -> None:
    """Not built yet."""

    def body():
        raise VramplanError("`vramplan estimate` is not built yet")

    run_command("estimate", json_mode, body)
