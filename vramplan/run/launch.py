"""Build the trainer's launch command and environment from a plan; write `launch.sh`.

The trainer is always started as a module (`-m train --plan RUN_DIR/plan.json`) so that the same
command works from any directory. Launchers (docs/contracts.md "Launch"):

- `python`: one process, `python -m train --plan ...`. With a DeepSpeed config the single process
  still needs RANK/WORLD_SIZE/MASTER_*: without them DeepSpeed's init_distributed falls back to MPI
  discovery and dies with `No module named 'mpi4py'` (DeepSpeed comm/comm.py, mpi_discovery), so we
  export them.
- `torchrun`: `torchrun --nnodes=1 --nproc_per_node=N --master_port=P -m train --plan ...`.
  `accelerate launch --cpu --num_processes 2` silently runs ONE process (accelerate
  commands/launch.py: with --cpu, launch_command takes simple_launcher), which is why we never use it.
- `deepspeed`: `deepspeed --num_gpus N --master_port P --module train --plan ...` (the launcher passes
  `--local_rank=K`, DeepSpeed launcher/launch.py; the trainer accepts it).
- multi-node (nodes > 1): an MPI-style hostfile (`host slots=N`) and one command per node
  (`torchrun --nnodes --node_rank --master_addr`, or `deepspeed --hostfile --no_ssh --node_rank`).

Every command runs in the dir of its plan.json (the attempt's dir), so the paths it names (`--plan
plan.json`, `--hostfile hostfile`) are relative and a copied or moved run dir launches itself.

This module does not import torch: it only locates the launcher scripts next to the interpreter.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vramplan.contract import free_port
from vramplan.errors import UsageError

DEFAULT_MULTINODE_PORT = 29500

# Why each variable is exported; written as comments into launch.sh.
ENV_REASONS: dict[str, str] = {
    "MKL_SERVICE_FORCE_INTEL": "avoid 'MKL_THREADING_LAYER=INTEL is incompatible with libgomp.so.1' (mkl-service)",
    "MKL_THREADING_LAYER": "use the GNU OpenMP layer that torch's libgomp expects",
    "OMP_NUM_THREADS": "CPU cores / processes per node: no thread oversubscription (deepspeed launcher sets none)",
    "PYTHONUNBUFFERED": "logs appear as they happen",
    "TOKENIZERS_PARALLELISM": "no fork warnings from the tokenizers thread pool",
    "HF_HUB_OFFLINE": "the model is a local directory: never touch the network",
    "DS_ACCELERATOR": "tell DeepSpeed which accelerator to use instead of guessing (and keep its stdout quiet)",
    "NCCL_DEBUG": "NCCL prints why a collective failed instead of a bare timeout",
    "HCCL_CONNECT_TIMEOUT": "Ascend HCCL: allow slow ranks (large model loads) to join; the default 120 s is short",
    "RANK": "single-process DeepSpeed still needs a process group (else: No module named 'mpi4py')",
    "LOCAL_RANK": "single-process DeepSpeed process group",
    "WORLD_SIZE": "single-process DeepSpeed process group",
    "MASTER_ADDR": "single-process DeepSpeed process group",
    "MASTER_PORT": "single-process DeepSpeed process group",
}

ASCEND_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"


@dataclass(frozen=True)
class Launch:
    """How to start the trainer for one plan.

    `node_commands[k]` is the argv to run on node k; `argv` is node 0's (the one `vramplan run`
    starts itself). `env` holds only the variables vramplan sets (added to the caller's environment).
    """

    launcher: str
    device: str
    nodes: int
    procs_per_node: int
    argv: tuple[str, ...]
    env: dict[str, str]
    node_commands: tuple[tuple[str, ...], ...]
    hostfile: str | None = None  # hostfile text, multi-node only
    hosts: tuple[str, ...] = ()
    prelude: tuple[str, ...] = ()  # shell lines run before the exports (e.g. sourcing CANN's set_env.sh)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def to_dict(self) -> dict:
        return {
            "launcher": self.launcher, "device": self.device, "nodes": self.nodes,
            "procs_per_node": self.procs_per_node, "world_size": self.world_size,
            "argv": list(self.argv), "command": shell_join(self.argv), "env": dict(self.env),
            "node_commands": [shell_join(c) for c in self.node_commands],
            "hostfile": self.hostfile, "notes": list(self.notes),
        }


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _script(name: str, python: str) -> list[str]:
    """The console script `name` installed next to `python`, else `python -m <module>`."""
    candidate = Path(python).parent / name
    if candidate.exists():
        return [str(candidate)]
    module = {"torchrun": "torch.distributed.run", "deepspeed": "deepspeed.launcher.runner"}[name]
    return [python, "-m", module]


def _model_is_local(model: dict) -> bool:
    if model.get("path"):
        return True
    return bool(model.get("llm_path")) and bool(model.get("vision_path"))


def _plan_shape(plan: dict) -> tuple[str, str, int, int]:
    hw = plan.get("hardware") or {}
    strategy = plan.get("strategy") or {}
    device = str(hw.get("device") or "cuda")
    nodes = int(hw.get("nodes") or 1)
    per_node = int(hw.get("gpus_per_node") or hw.get("total_gpus") or 1)
    launcher = str(strategy.get("launcher") or ("python" if nodes * per_node == 1 else "torchrun"))
    if nodes < 1 or per_node < 1:
        raise UsageError(f"plan.json: hardware.nodes={nodes}, gpus_per_node={per_node}: both must be >= 1",
                         "regenerate the plan with `vramplan estimate --save-plan FILE`")
    if launcher not in ("python", "torchrun", "deepspeed"):
        raise UsageError(f"plan.json: strategy.launcher={launcher!r} is not one of python, torchrun, deepspeed",
                         "edit the plan or regenerate it with `vramplan estimate --save-plan FILE`")
    if launcher == "python" and nodes * per_node > 1:
        launcher = "torchrun"  # one python process cannot drive several GPUs; the plan asks for them
    return device, launcher, nodes, per_node


def build_env(plan: dict, procs_per_node: int, launcher: str, *, cores: int | None = None,
              environ: dict | None = None, master_port: int | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    device = str((plan.get("hardware") or {}).get("device") or "cuda")
    nodes = int((plan.get("hardware") or {}).get("nodes") or 1)
    cores = cores or cpu_cores()
    env = {
        "MKL_SERVICE_FORCE_INTEL": "1",
        "MKL_THREADING_LAYER": "GNU",
        # a user's explicit OMP_NUM_THREADS wins; otherwise split the cores between the processes
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS") or str(max(1, cores // max(1, procs_per_node))),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if _model_is_local(plan.get("model") or {}):
        env["HF_HUB_OFFLINE"] = "1"
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    elif device == "npu":
        env["DS_ACCELERATOR"] = "npu"
        if nodes * procs_per_node > 1:
            env["HCCL_CONNECT_TIMEOUT"] = environ.get("HCCL_CONNECT_TIMEOUT") or "1200"
    elif device == "cuda" and nodes * procs_per_node > 1:
        env["NCCL_DEBUG"] = environ.get("NCCL_DEBUG") or "WARN"
    if launcher == "python" and plan.get("ds_config"):
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(master_port or free_port()))
    return env


def _single_node_argv(launcher: str, python: str, per_node: int, port: int, trainer_args: list[str]) -> list[str]:
    if launcher == "python":
        return [python, "-m", *trainer_args]
    if launcher == "torchrun":
        return [*_script("torchrun", python), "--nnodes=1", f"--nproc_per_node={per_node}",
                f"--master_port={port}", "-m", *trainer_args]
    return [*_script("deepspeed", python), "--num_gpus", str(per_node), "--master_port", str(port),
            "--module", *trainer_args]


def _node_commands(launcher: str, python: str, nodes: int, per_node: int, master: str, port: int,
                   hostfile: Path, trainer_args: list[str]) -> tuple[tuple[str, ...], ...]:
    """One command per node, node 0 first; node 0 is the rendezvous master."""
    commands = []
    for rank in range(nodes):
        if launcher == "deepspeed":
            cmd = [*_script("deepspeed", python), "--hostfile", str(hostfile), "--no_ssh",
                   f"--node_rank={rank}", f"--master_addr={master}", f"--master_port={port}",
                   "--module", *trainer_args]
        else:
            cmd = [*_script("torchrun", python), f"--nnodes={nodes}", f"--nproc_per_node={per_node}",
                   f"--node_rank={rank}", f"--master_addr={master}", f"--master_port={port}",
                   "-m", *trainer_args]
        commands.append(tuple(cmd))
    return tuple(commands)


def build_launch(plan: dict, plan_path: str | Path, *, resume: bool = False, master_port: int | None = None,
                 hosts: list[str] | tuple[str, ...] | None = None, python: str | None = None,
                 cores: int | None = None, environ: dict | None = None) -> Launch:
    """The launch for `plan` (stored at `plan_path`). `hosts`: node hostnames, node 0 first (multi-node)."""
    python = python or sys.executable
    device, launcher, nodes, per_node = _plan_shape(plan)
    # relative: the command runs in the plan's dir (process.py's cwd; launch.sh cds there), so a copied or
    # moved run dir trains into itself (docs/run.md "Copying or moving a run dir")
    trainer_args = ["train", "--plan", Path(plan_path).name] + (["--resume"] if resume else [])
    hosts = tuple(hosts or ())
    if hosts and len(hosts) != nodes:
        raise UsageError(f"--hosts names {len(hosts)} host(s) but the plan has {nodes} node(s)",
                         "give one hostname per node, node 0 (the master) first")
    notes: list[str] = []
    prelude: list[str] = []
    if device == "npu":
        prelude.append(f'[ -n "${{ASCEND_TOOLKIT_HOME:-}}" ] || source {ASCEND_SET_ENV}  # CANN environment')

    if nodes == 1:
        port = master_port or free_port()
        argv = _single_node_argv(launcher, python, per_node, port, trainer_args)
        env = build_env(plan, per_node, launcher, cores=cores, environ=environ, master_port=port)
        return Launch(launcher, device, 1, per_node, tuple(argv), env, (tuple(argv),),
                      prelude=tuple(prelude), notes=tuple(notes))

    # multi-node: every node runs its own command; node 0 is the rendezvous master
    port = master_port or DEFAULT_MULTINODE_PORT
    names = hosts or tuple(f"node-{k}" for k in range(nodes))
    master = hosts[0] if hosts else "${MASTER_ADDR}"
    if not hosts:
        notes.append("set MASTER_ADDR to node 0's hostname or IP on every node (or pass --hosts), "
                     "and replace the node-K names in the hostfile")
    hostfile = "".join(f"{h} slots={per_node}\n" for h in names)
    commands = _node_commands(launcher, python, nodes, per_node, master, port,
                              Path("hostfile"), trainer_args)
    notes.append("multi-node NCCL: if the nodes have several network interfaces, export NCCL_SOCKET_IFNAME")
    env = build_env(plan, per_node, launcher, cores=cores, environ=environ)
    return Launch(launcher if launcher != "python" else "torchrun", device, nodes, per_node, commands[0], env,
                  commands, hostfile=hostfile, hosts=names, prelude=tuple(prelude), notes=tuple(notes))


def _quote(arg: str) -> str:
    if "${" in arg:  # a deliberate shell expansion (e.g. ${MASTER_ADDR}): double quotes keep it live
        return '"' + arg.replace('"', '\\"') + '"'
    return shlex.quote(arg)


def shell_join(argv) -> str:
    return " ".join(_quote(a) for a in argv)


def render_launch_sh(launch: Launch, *, header: str = "") -> str:
    """The text of `launch.sh`: the exact environment and command of this attempt."""
    lines = ["#!/usr/bin/env bash",
             "# Written by vramplan. It starts the bundled trainer exactly as `vramplan run` does."]
    if header:
        lines += [f"# {h}" for h in header.splitlines()]
    lines += ["set -euo pipefail",
              'cd "$(dirname "$0")"  # the run dir: a train/ folder elsewhere must not shadow the bundled trainer', ""]
    lines += list(launch.prelude)
    for key, value in launch.env.items():
        reason = ENV_REASONS.get(key, "")
        lines.append(f"export {key}={shlex.quote(value)}" + (f"  # {reason}" if reason else ""))
    lines.append("")
    if launch.nodes == 1:
        lines.append(f"exec {shell_join(launch.argv)}")
    else:
        lines += [f"# Multi-node: run `bash launch.sh K` on node K (0..{launch.nodes - 1}); hosts in ./hostfile.",
                  *[f"# {n}" for n in launch.notes],
                  f'NODE_RANK="${{1:?usage: bash launch.sh NODE_RANK  (0..{launch.nodes - 1})}}"']
        if any("${MASTER_ADDR}" in a for a in launch.argv):
            lines.append(': "${MASTER_ADDR:?export MASTER_ADDR=<hostname or IP of node 0> on every node}"')
        lines.append('case "$NODE_RANK" in')
        for rank, cmd in enumerate(launch.node_commands):
            lines.append(f"  {rank}) exec {shell_join(cmd)} ;;")
        lines += ['  *) echo "launch.sh: NODE_RANK must be 0..' + str(launch.nodes - 1) + '" >&2; exit 2 ;;', "esac"]
    return "\n".join(lines) + "\n"


def write_launch_files(launch: Launch, run_dir: str | Path, *, header: str = "") -> list[Path]:
    """Write `launch.sh` (executable) and, multi-node, `hostfile` into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written = []
    sh = run_dir / "launch.sh"
    sh.write_text(render_launch_sh(launch, header=header))
    sh.chmod(0o755)
    written.append(sh)
    if launch.hostfile is not None:
        hf = run_dir / "hostfile"
        hf.write_text(launch.hostfile)
        written.append(hf)
    return written


def child_env(launch: Launch, environ: dict | None = None) -> dict[str, str]:
    """The environment for the trainer subprocess: the caller's plus the launch's exports."""
    env = dict(os.environ if environ is None else environ)
    env.update(launch.env)
    return env
