"""What `vramplan run` prints on stdout: preflight findings, the dry run, the final report."""

from __future__ import annotations

from vramplan.units import fmt_bytes, fmt_seconds


def render_checks(con, checks: list[dict], title: str) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left")
    for col in ("check", "status", "found", "fix"):
        table.add_column(col)
    for c in checks:
        table.add_row(Text(str(c.get("name", ""))), c.get("status", ""), Text(str(c.get("detail", ""))),
                      Text(str(c.get("fix", ""))))
    con.print(table)


def render_dry(con, plan, launch, launch_sh, checks, out, dry_run) -> None:
    from rich.text import Text

    from vramplan.run.attempts import describe
    from vramplan.run.launch import shell_join

    est = plan.get("estimate") or {}
    con.print(Text(f"plan: {describe(plan)}"))
    con.print(Text(f"estimate: {fmt_bytes(est.get('vram_per_gpu_bytes'))} per GPU, CPU RAM "
                   f"{fmt_bytes(est.get('cpu_ram_bytes'))}, disk {fmt_bytes(est.get('disk_bytes'))}, "
                   f"time {fmt_seconds(est.get('time_seconds'))}"))
    verb = "would write" if dry_run else "wrote"
    files = ["plan.json", "launch.sh"] + (["ds_config.json"] if plan.get("ds_config") else []) + (
        ["hostfile"] if launch.hostfile else [])
    con.print(Text(f"{verb}: " + ", ".join(str(out / f) for f in files)))
    procs = f"{launch.world_size} process" + ("es" if launch.world_size != 1 else "")
    con.print(Text(f"--- launch.sh ({procs}: {launch.nodes} node(s) x {launch.procs_per_node}) ---"))
    con.print(Text(launch_sh.rstrip()), soft_wrap=True)  # copy-pasteable: never wrapped
    if launch.hostfile:
        con.print(Text("--- hostfile ---\n" + launch.hostfile.rstrip()))
        con.print(Text("--- per-node commands (with the exports above) ---"))
        for rank, cmd in enumerate(launch.node_commands):
            con.print(Text(f"node {rank}: {shell_join(cmd)}"), soft_wrap=True)
    _preflight_summary(con, checks)


def _preflight_summary(con, checks: list[dict]) -> None:
    """After the launch: the preflight verdict on this machine (WARN/FAIL rows in a table)."""
    from rich.text import Text

    if not checks:
        con.print(Text("--- preflight: skipped (--skip-preflight) ---"))
        return
    bad = [c for c in checks if c.get("status") in ("WARN", "FAIL")]
    failed = sum(c.get("status") == "FAIL" for c in checks)
    verdict = f"FAILED ({failed} FAIL): it would not launch here" if failed else "passed"
    con.print(Text(f"--- preflight on this machine: {len(checks)} checks, {len(bad)} WARN/FAIL; {verdict} ---"))
    if bad:
        render_checks(con, bad, "preflight findings")


def render_report(con, report: dict, outcome: dict) -> None:
    from rich.text import Text

    from vramplan.commands.calibrate import render_rows

    for a in outcome["attempts"]:  # an "abandoned" attempt (its vramplan died) has no steps or time
        steps, wall = a.get("steps"), a.get("wall_seconds")
        con.print(Text(f"attempt {a.get('attempt')}: {a.get('kind')} after {'?' if steps is None else steps} steps, "
                       + ("? s" if not isinstance(wall, (int, float)) else f"{wall:.1f} s")
                       + f" ({a.get('dir')})" + (f" - {a.get('why')}" if (a.get("attempt") or 1) > 1 else "")))
    if report["vs_estimate"]:
        render_rows(con, report["vs_estimate"], "measured vs estimated")
    if report.get("adapter_dir"):
        con.print(Text(f"trained weights (adapter, projector of a VLM): {report['adapter_dir']}"))
