"""Kubeflow Pipelines components of the ERW pipeline: one file each, thin wrappers that call `erw`.

They are lightweight Python components: KFP ships each function's source to a pod running the
project image (which already has erw and kfp installed), and `kfp.local` runs the very same
functions as local subprocesses. Imports therefore live inside the functions.
"""

# The project image (see Dockerfile). The pipeline's `image` parameter replaces it at run time.
IMAGE = "ghcr.io/erw-project/erw:0.1.0"
