"""`erw launch`: run `erw warmup|train` as a torchrun job through TorchX and wait for it.

In the cluster the job is a Volcano job (TorchX `kubernetes` scheduler): one pod per node,
gang-scheduled, on the GPU node pool. Locally it is torchrun processes (`local_cwd`). All settings
are one `LaunchSpec` (spec.py); volcano.py renders the job, kube.py holds the launcher's own API
calls, run.py waits for the job, commands.py is the command line (registered by erw.cli).

    erw launch --scheduler kubernetes --image REPO/erw:TAG --nodes 4 --procs-per-node 8 \\
        --gpus-per-node 8 --node-selector pool=h100 --toleration nvidia.com/gpu:NoSchedule \\
        -- train --config configs/imagenet256-sit-xl2.yaml --resume auto
"""

from erw.launch.run import Preempted, dry_run, failure_report, launch
from erw.launch.spec import (
    LaunchError,
    LaunchSpec,
    format_duration,
    parse_duration,
    parse_toleration,
)

__all__ = [
    "LaunchError",
    "LaunchSpec",
    "Preempted",
    "dry_run",
    "failure_report",
    "format_duration",
    "launch",
    "parse_duration",
    "parse_toleration",
]
