"""Who this process is in a run: torchrun's variables, or Slurm's when ``srun`` started one task per GPU.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Under
``srun -n 8 python -m train ...`` none of those exist; without this module every task would
train alone, eight runs writing one run folder. Slurm describes the job step instead:
``SLURM_STEP_NUM_TASKS`` tasks (set by srun for its step, not in a batch script, which is one
process whatever ``--ntasks`` it allocated), this one ``SLURM_PROCID``, ``SLURM_LOCALID`` on its
node, the step's nodes in ``SLURM_STEP_NODELIST``. The rendezvous is the step's first node, on a
port derived from the job and step ids; ``MASTER_ADDR`` and ``MASTER_PORT`` override both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from curate.runner import slurm_int
from train.config import ConfigError

TORCHRUN = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun" or "single"
    master_addr: str | None = None  # set for srun: where rank 0 listens
    master_port: int | None = None
    note: str | None = None  # a warning for the run's log

    def export(self, env: MutableMapping[str, str]) -> None:
        """torchrun's variables, so that ``init_process_group("env://")`` and the device choice
        read one convention."""
        if self.launcher != "srun":
            return
        env.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                    "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": str(self.master_addr),
                    "MASTER_PORT": str(self.master_port)})


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    env = os.environ if env is None else env
    if all(k in env for k in TORCHRUN):
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0") or 0), "torchrun")
    step_tasks = slurm_int(env.get("SLURM_STEP_NUM_TASKS"))
    if step_tasks and step_tasks > 1 and "SLURM_PROCID" in env:
        nodes = slurm_int(env.get("SLURM_STEP_NUM_NODES")) or 1
        addr = env.get("MASTER_ADDR") or (
            "127.0.0.1" if nodes == 1 else first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")))
        if not addr:
            raise RuntimeError("srun started this task, but neither MASTER_ADDR nor SLURM_STEP_NODELIST names "
                               "the node where rank 0 listens")
        port = slurm_int(env.get("MASTER_PORT")) or srun_port(env)
        return Launch(int(env["SLURM_PROCID"]), step_tasks, slurm_int(env.get("SLURM_LOCALID")) or 0, "srun", addr, port)
    if step_tasks is None and (slurm_int(env.get("SLURM_PROCID")) or 0) > 0:
        # Another task of an srun that sets no step variables: it cannot know the step's size, and
        # training alone would write the same run folder as the other tasks.
        raise ConfigError(f"this is Slurm task {env['SLURM_PROCID']}, but Slurm set no SLURM_STEP_NUM_TASKS: "
                          "launch the run with torchrun (one per node), or set RANK, WORLD_SIZE, MASTER_ADDR "
                          "and MASTER_PORT for each task")
    allocated = slurm_int(env.get("SLURM_NTASKS"))
    note = None
    if allocated and allocated > 1 and step_tasks is None:
        note = (f"Slurm allocated {allocated} tasks, but this process was not started by srun: it trains "
                "alone. Launch one task per GPU with `srun python -m train ...`, or torchrun on each node")
    return Launch(0, 1, 0, "single", note=note)


def srun_port(env: Mapping[str, str]) -> int:
    """The same port in every task of a step, another in the job's next step (two trainings
    side by side in one allocation), within the unprivileged range below Linux's ephemeral ports."""
    job, step = slurm_int(env.get("SLURM_JOB_ID")) or 0, slurm_int(env.get("SLURM_STEP_ID")) or 0
    return 20000 + (job * 31 + step) % 12000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``gpu[03-05,9],login1`` -> ``gpu03``, ``a-[1-2]-ib`` -> ``a-1-ib``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if "[" not in entry:
        return entry
    prefix, rest = entry.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix

