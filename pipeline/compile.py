"""Compile the DAG to pipeline.yaml (checked in at the repository root; a test keeps it current)."""

from __future__ import annotations

from pathlib import Path

from pipeline.params import REPO, resolve

PIPELINE_YAML = REPO / "pipeline.yaml"


def default_output() -> Path:
    """pipeline.yaml at the root of this checkout; from an installed package (the image, a notebook),
    in the working directory: never inside site-packages."""
    return PIPELINE_YAML if (REPO / "pyproject.toml").is_file() else Path("pipeline.yaml")


def compile_pipeline(path: str | Path | None = None) -> Path:
    """Validate the default arguments, then write the KFP IR YAML (pipeline spec + Kubernetes platform spec)."""
    from kfp import compiler

    from components import IMAGE
    from pipeline.dag import erw_pipeline

    # The defaults baked into the file must themselves be runnable, given the one required argument.
    resolve({"image": IMAGE})
    path = Path(path) if path else default_output()
    compiler.Compiler().compile(erw_pipeline, str(path))
    return path
