"""Retention at the end of every run: `erw gc --apply` on the workspace (see erw/gc.py for what is kept)."""

from kfp import dsl

from components import IMAGE
from components.common import run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw])
def gc(workspace: str, registry: str, keep_runs: int):
    """Keeps the last keep_runs runs, running runs and the published model's lineage; deletes the rest."""
    argv = ["gc", "--workspace", workspace, "--keep-runs", keep_runs, "--apply"]
    if registry:
        argv += ["--registry", registry]
    run_erw(argv)
