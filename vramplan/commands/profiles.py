"""`vramplan profiles`: list, show and validate model / hardware / recipe profiles."""

from __future__ import annotations

from pathlib import Path

import click

from vramplan.commands.output import CommandResult, run_command
from vramplan.errors import ExitCode, UsageError

JSON_HELP = "Print the versioned JSON envelope on stdout."
UNITS = (("_gib", "GiB"), ("_gb", "GB"), ("_tflops", "TFLOPS"), ("_gbps", "GB/s"), ("_bytes", "bytes"))


def _unit(key: str) -> str:
    return next((u for suffix, u in UNITS if key.endswith(suffix)), "")


def _param_summary(spec) -> dict:
    from vramplan.estimate.params import count_params

    c = count_params(spec)
    return {"total": c.total, "llm": c.llm_total, "vision": c.vision_total, "projector": c.projector,
            "llm_linear": c.llm_linear, "llm_embed": c.llm_embed, "llm_lm_head": c.llm_lm_head,
            "llm_norms": c.llm_norms, "vision_linear": c.vision_linear, "vision_other": c.vision_other}


def _listing() -> tuple[dict, list[str]]:
    from vramplan.estimate.params import vision_params
    from vramplan.estimate.specs import HardwareSpec, ModelSpec, RecipeSpec
    from vramplan.inputs import profiles as P

    data: dict = {"dirs": [str(d) for d in P.profiles_dirs()], "models": [], "hardware": [], "recipes": []}
    warnings: list[str] = []
    for sub in ("models", "hardware", "recipes"):
        for name, path in sorted(P._index(sub).items()):
            try:
                spec = P.load_file(path, {"models": "model", "hardware": "hardware", "recipes": "recipe"}[sub])
            except UsageError as e:
                warnings.append(f"skipped broken profile: {e.message}")
                continue
            row: dict = {"id": name, "file": str(path)}
            if isinstance(spec, ModelSpec):
                row.update(kind="model" if spec.vision else "llm", params=_param_summary(spec)["total"],
                           stored_dtype=spec.stored_dtype, vocab_size=spec.text.vocab_size)
            elif isinstance(spec, HardwareSpec):
                row.update(kind="hardware", display_name=spec.display_name, memory_gib=spec.memory_gib,
                           marketed_memory_gb=spec.marketed_memory_gb, bf16_tflops=spec.bf16_tflops,
                           fp16_tflops=spec.fp16_tflops, vendor=spec.vendor)
            elif isinstance(spec, RecipeSpec):
                row.update(kind="recipe", description=spec.description, quant=spec.quant,
                           global_batch=spec.global_batch, learning_rate=spec.learning_rate)
            else:  # a vision tower part
                row.update(kind="vision", params=vision_params(spec))
            data[sub].append(row)
    return data, warnings


def _render_listing(data: dict):
    def render(console) -> None:
        from rich.table import Table
        from rich.text import Text

        t = Table(title="models (params = exact parameter count)", title_justify="left")
        for c in ("id", "kind", "params", "stored dtype"):
            t.add_column(c, justify="right" if c == "params" else "left")
        for r in data["models"]:
            t.add_row(Text(r["id"]), r["kind"], f"{r['params'] / 1e9:.3f} B", r.get("stored_dtype", ""))
        console.print(t)
        t = Table(
            title="hardware (memory as reported by nvidia-smi / npu-smi; dense tensor TFLOPS)", title_justify="left"
        )
        for c in ("id", "name", "memory GiB", "marketed GB", "bf16 TFLOPS", "fp16 TFLOPS"):
            t.add_column(c, justify="left" if c in ("id", "name") else "right")
        for r in data["hardware"]:
            t.add_row(Text(r["id"]), Text(r["display_name"]), f"{r['memory_gib']:.2f}", str(r["marketed_memory_gb"]),
                      f"{r['bf16_tflops']:g}" if r["bf16_tflops"] else "no bf16", f"{r['fp16_tflops']:g}")
        console.print(t)
        t = Table(title="recipes", title_justify="left")
        for c in ("id", "quant", "global batch", "lr", "description"):
            t.add_column(c)
        for r in data["recipes"]:
            t.add_row(
                Text(r["id"]), r["quant"], str(r["global_batch"]), f"{r['learning_rate']:g}", Text(r["description"])
            )
        console.print(t)
        console.print(Text("profile dirs (first wins): " + ", ".join(data["dirs"])))
        console.print(Text("`vramplan profiles show NAME` prints every field with its unit and source."))
    return render


@click.group("profiles", invoke_without_command=True)
@click.option("--json", "json_mode", is_flag=True, help=JSON_HELP)
@click.pass_context
def command(ctx: click.Context, json_mode: bool) -> None:
    """List the model, hardware and recipe profiles (TOML files; see profiles/README.md).

    \b
    $ vramplan profiles
    $ vramplan profiles show rtx-4090
    $ vramplan profiles validate my-gpu.toml
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"json": json_mode}
        return

    def body() -> CommandResult:
        data, warnings = _listing()
        return CommandResult("ok", ExitCode.OK, data, _render_listing(data), warnings)

    run_command("profiles", json_mode, body)


def _find_any(name: str):
    """(kind, path, raw data) of a profile id or a .toml path."""
    from vramplan.inputs import profiles as P

    p = Path(name)
    if p.suffix == ".toml" or "/" in name:
        data = P._read(p)
        kind = P.validate_data(data, str(p))
        return kind, p, data
    for kind in ("model", "hardware", "recipe"):
        idx = P._index(P.SUBDIR[kind])
        if name in idx:
            data = P._read(idx[name])
            return P.validate_data(data, str(idx[name])), idx[name], data
    import difflib

    every = [n for sub in ("models", "hardware", "recipes") for n in P._index(sub)]
    close = difflib.get_close_matches(name, every, n=3, cutoff=0.5)
    raise UsageError(f"unknown profile {name!r}",
                     (f"did you mean {', '.join(close)}? " if close else "") + "`vramplan profiles` lists them")


@command.command("show")
@click.argument("name")
@click.option("--json", "json_mode", is_flag=True, help=JSON_HELP)
@click.pass_context
def show(ctx: click.Context, name: str, json_mode: bool) -> None:
    """Every field of profile NAME (an id or a .toml path) with its unit and source."""
    json_mode = json_mode or bool((ctx.obj or {}).get("json"))

    def body() -> CommandResult:
        from vramplan.inputs import profiles as P

        kind, path, raw = _find_any(name)
        sources = raw.get("sources", {})
        values = {k: v for k, v in raw.items() if k != "sources"}
        data = {"id": path.stem, "kind": kind, "file": str(path), "values": values, "sources": sources,
                "units": {k: _unit(k) for k in values if _unit(k)}}
        if kind in ("model", "llm"):
            data["params"] = _param_summary(P._to_spec(raw, path.stem, kind))

        def render(console) -> None:
            from rich.table import Table
            from rich.text import Text

            console.print(Text(f"{path.stem} ({kind}): {raw.get('description', '')}"))
            console.print(Text(f"file: {path}\nsource: {raw.get('source', '')}"))
            t = Table(show_header=True)
            for c in ("key", "value", "unit", "source"):
                t.add_column(c, overflow="fold")
            for k, v in values.items():
                if isinstance(v, dict):
                    for k2, v2 in v.items():
                        t.add_row(Text(f"{k}.{k2}"), Text(repr(v2) if isinstance(v2, str) else str(v2)),
                                  _unit(k2), Text(sources.get(k, "") if k2 == next(iter(v)) else ""))
                elif k not in ("schema_version", "kind", "description", "source"):
                    t.add_row(
                        Text(k), Text(repr(v) if isinstance(v, str) else str(v)), _unit(k), Text(sources.get(k, ""))
                    )
            console.print(t)
            if "params" in data:
                console.print(Text("parameters (exact): " + ", ".join(f"{k} {v:,}" for k, v in data["params"].items())))
        return CommandResult("ok", ExitCode.OK, data, render)

    run_command("profiles", json_mode, body)


@command.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "json_mode", is_flag=True, help=JSON_HELP)
@click.pass_context
def validate(ctx: click.Context, paths: tuple[str, ...], json_mode: bool) -> None:
    """Check profile files (or dirs of them). Exit 0 when all are valid, 2 with one line per problem."""
    json_mode = json_mode or bool((ctx.obj or {}).get("json"))

    def body() -> CommandResult:
        from vramplan.inputs.profiles import validate_file

        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                found = sorted(p.rglob("*.toml"))
                if not found:
                    raise UsageError(f"{p}: no .toml files in this directory", "pass profile files or a profiles dir")
                files += found
            else:
                files.append(p)
        results = [{"file": str(f), "problems": validate_file(f)} for f in files]
        bad = [r for r in results if r["problems"]]
        errors = [{"code": "profile_invalid", "message": msg, "hint": ""} for r in bad for msg in r["problems"]]

        def render(console) -> None:
            from rich.text import Text

            for r in results:
                if not r["problems"]:
                    console.print(Text(f"ok  {r['file']}"))
        status, code = ("invalid", ExitCode.USAGE) if bad else ("ok", ExitCode.OK)
        return CommandResult(status, code, {"files": results, "valid": not bad}, render, [], errors)

    run_command("profiles", json_mode, body)
