"""Who a training process is: torchrun's variables, srun's job step, or one process (train/launch.py)."""

from __future__ import annotations

import pytest

from train.launch import Launch, detect_launch, first_host, srun_port


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node01", "node01"), ("gpu[03-05,9],login1", "gpu03"), ("a,b", "a"), ("a-[1-2]-ib", "a-1-ib"),
    ("gpu[7,3-4]", "gpu7"), ("dgx-[0012-0015]", "dgx-0012"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_torchrun_wins_and_exports_nothing():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 3, "torchrun")
    copy = dict(env)
    launch.export(copy)
    assert copy == env


def test_srun_tasks_become_ranks_with_a_rendezvous_on_the_first_node():
    env = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_ID": "2"}
    launch = detect_launch(env)
    assert launch == Launch(9, 16, 1, "srun", "gpu07", srun_port(env))
    exported: dict[str, str] = {}
    launch.export(exported)
    assert exported == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                        "MASTER_PORT": str(srun_port(env))}
    # Every task of the step agrees on the port; the job's next step (another run) gets another.
    assert srun_port(env) == srun_port({**env, "SLURM_PROCID": "0"}) != srun_port({**env, "SLURM_STEP_ID": "3"})
    assert all(20000 <= srun_port({"SLURM_JOB_ID": str(j), "SLURM_STEP_ID": str(s)}) < 32000
               for j in (0, 1, 99999999) for s in (0, 5))
    # One node: the loopback; MASTER_ADDR and MASTER_PORT set by the user win.
    assert detect_launch({**env, "SLURM_STEP_NUM_NODES": "1"}).master_addr == "127.0.0.1"
    mine = detect_launch({**env, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"})
    assert (mine.master_addr, mine.master_port) == ("10.0.0.5", 29400)


def test_a_batch_script_is_one_process_whatever_it_allocated():
    # sbatch --ntasks=8 running `python -m train` itself: Slurm's job variables, no step's.
    launch = detect_launch({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")
    assert "not started by srun" in launch.note
    # An srun step of one task (an interactive shell) is one process, and nothing to warn about.
    assert detect_launch({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).note is None
    assert detect_launch({}) == Launch(0, 1, 0, "single")


def test_a_later_task_without_step_variables_is_refused():
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="this is Slurm task 3, but Slurm set no SLURM_STEP_NUM_TASKS"):
        detect_launch({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"})
