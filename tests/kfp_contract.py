"""The KFP v2 backend's contract, enforced around every task that kfp.local runs.

kfp.local runs a component's function as a local subprocess and hands it plain local paths. On a
cluster the same function runs behind the backend's Go launcher, which adds rules kfp.local never
checks. No KFP cluster can run here, so each rule below was read in the backend's source
(kubeflow/pipelines at tag 2.17.0; the same code is in 2.14.0 and 2.15.0) and is re-enforced here:

1. Every output artifact's URI lies under the pipeline root. After the component exits the
   launcher merges the URI the component reported into its record (`mergeRuntimeArtifacts`,
   backend/src/v2/component/launcher_v2.go:806, 1188-1191) and uploads the local file with
   `bucketConfig.KeyFromURI(uri)` (launcher_v2.go:820), which refuses any URI that does not start
   with the root's `PrefixedBucket()` (backend/src/v2/objectstore/config.go:101-111: "URI %q does
   not have expected bucket prefix %q"). A component that sets `artifact.uri` to its own location
   fails the task. A local path is not a storage URI at all (`LocalPathForURI`,
   launcher_v2.go:1239-1253): nothing is uploaded and no consumer pod can read it.
2. Every input artifact is small. Before the component starts, the launcher downloads every
   input artifact in full, whether or not the component reads it (`downloadArtifacts`,
   launcher_v2.go:927-1000, "TODO: Selectively copy artifacts"; `DownloadBlob` copies every object
   under the key, objectstore/object_store.go:176-205) into an emptyDir scratch volume (/s3, /minio,
   /gcs: backend/src/v2/compiler/argocompiler/container.go:476-492, 543-551). Those volumes live
   on the node's disk and count against the pod's ephemeral storage, and the copy runs before the
   component does: a latent dataset or an 11 GB checkpoint as an artifact means gigabytes copied
   into a 1-CPU/2 GB launcher pod, minutes before it does anything, on every retry. The budget
   (INPUT_BUDGET, 10 MB) is generous for what artifacts are for here (manifests, metrics, pointers,
   a report) and far below anything that is data.
3. Nothing a later step needs is written outside the declared outputs, except through erw's own
   storage (the workspace). A pod's filesystem is gone when the step ends; only the output
   artifacts are uploaded (launcher_v2.go:778-830). Here: files created or changed during a task
   in the watched local directories (the pipeline root, the working directory) must lie inside
   that task's own output folder or inside a local workspace.

With a remote root (`s3://bucket/prefix`), the harness also moves the artifacts the way the
launcher does: each output is uploaded to `root/<path below the local root>` and its local copy
deleted, and each input is downloaded back from the root just before its consumer runs. A step
that quietly depended on another step's local files then fails here as it would on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

INPUT_BUDGET = 10 * 1024 * 1024


class ContractViolation(AssertionError):
    """A component did something the real KFP backend would refuse or lose."""


def key_from_uri(prefixed_bucket: str, uri: str) -> str:
    """objectstore/config.go:101-111 (`Config.KeyFromURI`), line for line."""
    if not uri.startswith(prefixed_bucket):
        raise ContractViolation(f"URI {uri!r} does not have expected bucket prefix {prefixed_bucket!r}")
    key = uri[len(prefixed_bucket) :].lstrip("/")
    if not key:
        raise ContractViolation(f"URI {uri!r} has empty key given prefixed bucket {prefixed_bucket!r}")
    return key


def _artifacts(values: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, artifact) for every artifact among a task's arguments or outputs (lists: Collected)."""
    from kfp import dsl

    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dsl.Artifact):
                yield name, item


def _inside(path: str | Path, root: str | Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root))


def _snapshot(roots: list[Path]) -> dict[str, tuple[int, int]]:
    found = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(path)
                    found[path] = (st.st_mtime_ns, st.st_size)
    return found


def _size(uri: str) -> int:
    """Bytes the launcher's DownloadBlob would copy: one file/object, or everything below a prefix."""
    from erw import storage

    if not storage.is_s3(uri):
        return Path(uri).stat().st_size if Path(uri).is_file() else sum(i.size for i in storage.list_files(uri))
    files = storage.list_files(uri)
    if files:
        return sum(info.size for info in files)
    import boto3

    bucket, key = storage.split_s3(uri)
    with contextlib.suppress(Exception):
        return int(boto3.client("s3").head_object(Bucket=bucket, Key=key)["ContentLength"])
    return 0


def _download(remote: str, local: str) -> None:
    """DownloadBlob (object_store.go:176-205): every object under the key, into the local path; an
    output the component never wrote (a Metrics artifact is metadata only) has nothing to copy."""
    from erw import storage

    if storage.list_files(remote):
        storage.download_tree(remote, local)
    elif storage.exists(remote):
        storage.download_file(remote, local)


@dataclass
class Backend:
    """The launcher's rules, enforced around each kfp.local task while `enforce()` is active.

    local_root: kfp.local's pipeline_root. remote_root: the cluster's pipeline root to emulate
    (`s3://bucket/prefix`), or None to keep artifacts on disk. workspace: erw's storage, where
    steps may write freely. watch: local folders in which nothing else may be written
    (default: the local root and the working directory).
    """

    local_root: Path
    workspace: str
    remote_root: str | None = None
    watch: list[Path] = field(default_factory=list)
    input_budget: int = INPUT_BUDGET
    tasks: list[str] = field(default_factory=list)  # every task run under the contract, in order
    largest_input: int = 0  # bytes: the largest input artifact any task received
    _uploaded: dict[str, str] = field(default_factory=dict)  # local path -> remote URI
    _running: set[Path] = field(default_factory=set)  # output folders of the tasks running now
    _started: list[Path] = field(default_factory=list)  # output folders of every task, in start order

    def remote_uri(self, uri: str) -> str:
        """What the backend would see: kfp.local's local path under the root mapped onto the remote root."""
        if self.remote_root and not uri.startswith("s3://") and _inside(uri, self.local_root):
            return f"{self.remote_root.rstrip('/')}/{Path(uri).resolve().relative_to(self.local_root.resolve()).as_posix()}"
        return uri

    def check_output(self, task: str, name: str, uri: str) -> str:
        """Rule 1; returns the object key under the root."""
        where = f"task {task}: output artifact {name!r}"
        if self.remote_root:
            try:
                return key_from_uri(self.remote_root.rstrip("/"), self.remote_uri(uri))
            except ContractViolation as err:
                raise ContractViolation(f"{where}: failed to upload output artifact: {err}") from None
        if uri.startswith(("s3://", "gs://", "minio://")) or not _inside(uri, self.local_root):
            raise ContractViolation(
                f"{where}: URI {uri!r} is not under the pipeline root {str(self.local_root)!r}; the launcher "
                "uploads outputs only below the root (objectstore/config.go:101-111). Pass large data as a "
                "string parameter (its URI) and keep artifacts small, under the root."
            )
        return Path(uri).resolve().relative_to(self.local_root.resolve()).as_posix()

    def check_input(self, task: str, name: str, uri: str) -> None:
        """Rules 1 (inputs come from outputs) and 2, then the download itself for a remote root."""
        where = f"task {task}: input artifact {name!r} ({uri})"
        remote = self.remote_uri(uri)
        if self.remote_root:
            try:
                key_from_uri(self.remote_root.rstrip("/"), remote)
            except ContractViolation as err:
                raise ContractViolation(f"{where}: not an artifact of this pipeline root: {err}") from None
        elif not _inside(uri, self.local_root):
            raise ContractViolation(f"{where}: not under the pipeline root {str(self.local_root)!r}")
        size = _size(remote)
        self.largest_input = max(self.largest_input, size)
        if size > self.input_budget:
            raise ContractViolation(
                f"{where}: {size / 1e6:.1f} MB would be downloaded into the step's pod before it starts "
                f"(launcher_v2.go:927-1000 copies every input artifact in full); the budget is "
                f"{self.input_budget / 1e6:.0f} MB. Pass large data as a string parameter (its URI)."
            )
        if self.remote_root and uri in self._uploaded:
            _download(remote, uri)

    def _after(self, task: str, task_root: Path, siblings: set[Path], before: dict, outputs: dict[str, Any]) -> None:
        from erw import storage

        for name, artifact in _artifacts(outputs):
            key = self.check_output(task, name, artifact.uri)
            if self.remote_root:  # UploadBlob (object_store.go:111-144), then the pod is gone
                remote = f"{self.remote_root.rstrip('/')}/{key}"
                local = Path(artifact.uri)
                if local.is_dir():
                    for path in sorted(p for p in local.rglob("*") if p.is_file()):
                        storage.upload_file(path, storage.join(remote, path.relative_to(local).as_posix()))
                    shutil.rmtree(local)
                elif local.is_file():
                    storage.upload_file(local, remote)
                    local.unlink()
                self._uploaded[artifact.uri] = remote
        allowed_workspace = None if storage.is_s3(self.workspace) else self.workspace
        after = _snapshot(self.watch)
        for path in sorted(after):
            if before.get(path) == after[path]:
                continue
            if any(_inside(path, root) for root in [task_root, *siblings]):
                continue  # kfp.local runs ParallelFor iterations at once: a sibling's own outputs
            if allowed_workspace and _inside(path, allowed_workspace) and not _inside(path, self.local_root):
                continue
            raise ContractViolation(
                f"task {task}: wrote {path}, outside its declared outputs ({task_root}) and outside erw's "
                "workspace; on a cluster that file stays in the step's pod and is lost when it ends"
            )

    @contextlib.contextmanager
    def enforce(self) -> Iterator[Backend]:
        """Patch kfp.local's single-task entry point (both the pipeline and the single-component
        paths call `task_dispatcher.run_single_task_implementation`)."""
        from kfp.local import executor_input_utils, task_dispatcher

        self.local_root = Path(os.path.abspath(self.local_root))
        self.watch = [Path(os.path.abspath(p)) for p in (self.watch or [self.local_root, Path.cwd()])]
        original = task_dispatcher.run_single_task_implementation

        def run_task(**kwargs: Any):
            task = executor_input_utils.get_local_task_resource_name(kwargs["component_name"])
            task_root = Path(
                executor_input_utils.construct_local_task_root(
                    pipeline_root=kwargs["pipeline_root"],
                    pipeline_resource_name=kwargs["pipeline_resource_name"],
                    task_resource_name=task,
                )
            )
            for name, artifact in _artifacts(kwargs["arguments"]):
                self.check_input(task, name, artifact.uri)
            before = _snapshot(self.watch)
            running, mark = set(self._running), len(self._started)
            self._started.append(task_root)
            self._running.add(task_root)
            try:
                outputs, status = original(**kwargs)
                self.tasks.append(task)
                if outputs:
                    self._after(task, task_root, running | set(self._started[mark:]), before, outputs)
            finally:
                self._running.discard(task_root)
            return outputs, status

        task_dispatcher.run_single_task_implementation = run_task
        try:
            yield self
        finally:
            task_dispatcher.run_single_task_implementation = original
            self._restore()

    def _restore(self) -> None:
        """Bring uploaded artifacts back to their local paths, so a caller can read the run's outputs."""
        for local, remote in self._uploaded.items():
            if not Path(local).exists():
                _download(remote, local)
