"""Compile the DAG to pipeline.yaml (checked in at the repository root; a test keeps it current)."""
from __future__ import annotations

from pathlib import Path

from pipeline.params import REPO, resolve

PIPELINE_YAML = REPO / "pipeline.yaml"


def compile_pipeline(path: str | Path = PIPELINE_YAML) -> Path:
    """Validate the default arguments, then write the KFP IR YAML (pipeline spec + Kubernetes platform spec)."""
    from kfp import compiler

    from pipeline.dag import erw_pipeline

    resolve({})  # the defaults baked into the file must themselves be runnable
    path = Path(path)
    compiler.Compiler().compile(erw_pipeline, str(path))
    return path
