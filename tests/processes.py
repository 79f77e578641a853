"""Run a test body in real processes joined by a gloo process group.

`run_in_processes(worker, *args)` spawns `world` processes; each sets up the
group, calls `worker(rank, world, *args)`, meets the others at a barrier (so
no rank tears the group down while a peer is still in a collective) and
destroys the group. A Python exception in a worker fails the test with its
traceback. A process killed by a signal with no Python exception (a crash
in the transport's teardown, outside pyllm) is retried once with a fresh
port; the same crash twice fails the test. faulthandler prints the Python
stack of a process that dies on a signal, so the place shows in the log."""

import os
import socket
import sys

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, worker, args):
    import faulthandler

    faulthandler.enable(all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def run_in_processes(worker, *args, world: int = 2) -> None:
    """Run `worker(rank, world, *args)` in `world` gloo processes (module-level
    `worker`, picklable `args`); raises if any of them fails."""
    for attempt in (1, 2):
        try:
            mp.spawn(_entry, args=(world, free_port(), worker, args), nprocs=world, join=True)
            return
        except mp.ProcessExitedException as e:
            if attempt == 2 or e.signal_name is None:
                raise
            print(f"[processes] {worker.__name__}: process {e.error_index} died on "
                  f"{e.signal_name} without a Python error; retrying once", file=sys.stderr)
