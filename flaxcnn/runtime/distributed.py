"""Several processes (hosts) training one model: `jax.distributed` set-up.

`initialize` starts it when the command line names a coordinator (`--coordinator_address`,
`--num_processes`, `--process_id`), when `--distributed=on`, or, with `--distributed=auto`
(the default), when the environment describes a multi-process job. JAX 0.10's
`jax.distributed.initialize()` fills whatever is not given from `JAX_COORDINATOR_ADDRESS`
(and `JAX_COORDINATOR_PORT`, `JAX_LOCAL_DEVICE_IDS`) and from the first cluster it detects:
Open MPI (`OMPI_MCA_orte_hnp_uri`), SLURM (`SLURM_JOB_ID`, `SLURM_NODELIST`, `SLURM_NTASKS`,
`SLURM_PROCID`, `SLURM_LOCALID`), Cloud TPU VMs (GCE metadata server, GKE env vars), and
Kubernetes (`KUBERNETES_SERVICE_HOST`, needs the `kubernetes` package); mpi4py is opt-in only.
`auto` recognises only the cheap, unambiguous signs (a coordinator address in the environment,
a SLURM or Open MPI job of more than one task): TPU pods and Kubernetes jobs are detected by
network queries, so they need `--distributed=on`.

Every process must see the same workdir (a shared filesystem): orbax writes one checkpoint
from all processes into it, and only process 0 writes logs and results.
"""

import os

import jax

MODES = ("auto", "on", "off")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(RuntimeError):
    """The processes of a multi-process run could not connect."""


def _int_env(name: str, default: int = 1) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def multi_process_env() -> str | None:
    """The name of the environment variable(s) that describe a multi-process job, if any."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if all(v in os.environ for v in _SLURM_VARS) and _int_env("SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str = "auto",
    timeout_s: int = 300,
) -> bool:
    """Starts `jax.distributed` if this process is one of several; True if it did. Must run
    before anything touches a JAX backend. Raises ValueError for inconsistent settings and
    DistributedError when the processes cannot connect within `timeout_s`."""
    if mode not in MODES:
        raise ValueError(f"unknown distributed mode {mode!r}; valid: {', '.join(MODES)}")
    explicit = [v for v in (coordinator_address, num_processes, process_id) if v is not None]
    if mode == "off":
        if explicit:
            raise ValueError("--distributed=off contradicts --coordinator_address/--num_processes")
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be positive, got {num_processes}")
    if None not in (num_processes, process_id) and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    if coordinator_address is not None and not coordinator_address.rpartition(":")[2].isdigit():
        raise ValueError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
    if num_processes == 1 and coordinator_address is None:
        return False  # One process: nothing to coordinate.
    if not (explicit or mode == "on" or multi_process_env()):
        return False
    # Collectives between CPU devices of different processes go over TCP through gloo (JAX's
    # default in 0.10; set explicitly in case a site config turned it off). Harmless on GPUs.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except (RuntimeError, ValueError, TypeError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(f"jax.distributed.initialize failed: {first_line}") from e
    return True
