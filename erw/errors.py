"""The one exception type users see: a problem they can fix, printed without a traceback; and the
exit statuses every `erw` command, `erw torchrun`, `erw launch` and the pipeline's steps share."""

USAGE_ERROR = 2  # what an ErwError makes a command exit with
# 128 + SIGTERM: the work was stopped from outside and checkpointed first; running the same
# command with `--resume auto` continues it. Kept all the way up (rank, torchrun, launch, step).
PREEMPTED = 143


class ErwError(Exception):
    """Something is wrong with the input or the environment; the message says what and how to fix it."""

    exit_status = USAGE_ERROR
