"""`memdb-admin build ...` and the build-job path of `prefix insert/update/append`.

Without `--local` a build runs on a worker that holds the model: the CLI sends the rendered
prefix text, traces and build options (`submit`), follows the job's WatchBuild stream as a
progress bar (tqdm if installed, else a line per stage) and returns the stored version. A
Ctrl-C stops following, not the job (`build cancel` stops it). Needs nothing of the worker.
Knows nothing of how a memory is built.
"""

from __future__ import annotations

import sys
import time

import click

from memdb.errors import MemdbError
from memdb_client import output
from memdb_client.app import EXIT_CODES, App, Failure, json_option, pass_app
from memdb_client.build_jobs import BuildJob, BuildSpec
from memdb_client.types import PrefixInfo


@click.group("build")
def build_group():
    """List, show and cancel the build jobs of the key's tenant."""


@build_group.command("list")
@click.option("--all", "include_finished", is_flag=True, help="Also done, failed, cancelled.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@json_option
@pass_app
def build_list(app: App, include_finished: bool, limit: int):
    """Build jobs, newest first (queued, claimed and running ones; --all: every kept one)."""
    jobs = app.client.list_builds(include_finished=include_finished, limit=limit)
    rows = [
        [
            j.job_id,
            j.spec.name,
            _kind(j),
            j.state,
            _progress(j),
            j.version or "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at)),
        ]
        for j in jobs
    ]
    text = output.table(["JOB", "PREFIX", "KIND", "STATE", "PROGRESS", "VERSION", "SUBMITTED"],
                        rows)  # fmt: skip
    app.emit(jobs, text)


@build_group.command("show")
@click.argument("job_id")
@json_option
@pass_app
def build_show(app: App, job_id: str):
    """Everything the server knows of build job JOB_ID."""
    j = app.client.get_build(job_id)
    app.emit(j, _detail(j))


@build_group.command("cancel")
@click.argument("job_id")
@json_option
@pass_app
def build_cancel(app: App, job_id: str):
    """Cancel build job JOB_ID (a worker building it stops at its next progress step)."""
    j = app.client.cancel_build(job_id)
    app.emit(j, f"cancelled build job {job_id} ('{j.spec.name}')")


def submit(app: App, spec: BuildSpec) -> PrefixInfo:
    """Submit `spec`, follow it to its end; the stored version's info (Failure otherwise)."""
    job = app.client.submit_build(spec)
    app.note(
        f"build job {job.job_id} queued for model "
        f"{output.short_fingerprint(job.spec.model_fingerprint)} ({job.prefix_chars} chars of "
        f"prefix, {job.trace_count} traces); follow it with `memdb-admin build show {job.job_id}`"
    )
    try:
        job = follow(app, job)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job goes on (cancel it with `memdb-admin build "
                   f"cancel {job.job_id}`)", err=True)  # fmt: skip
        raise
    if job.state == "done":
        return app.client.get_prefix(spec.name)
    if job.state == "cancelled":
        raise Failure(f"build job {job.job_id} was cancelled; nothing was stored")
    raise Failure(f"build job {job.job_id} failed: {job.error}", EXIT_CODES["usage"])


def follow(app: App, job: BuildJob) -> BuildJob:
    """Watch the job to its end (a reconnect re-reads it), showing its progress."""
    with _Progress(app.progress) as bar:
        while True:
            try:
                for job in app.client.watch_build(job.job_id):  # noqa: B020 (the latest state)
                    bar.show(job)
            except MemdbError as exc:  # the stream broke (a server restart): read it again
                app.note(f"lost the job's progress stream ({exc}); reconnecting ...")
                time.sleep(1.0)
                try:
                    job = app.client.get_build(job.job_id)
                except MemdbError:
                    continue
            if job.final:
                return job


class _Progress:
    """A tqdm bar per stage (layers fitted, bytes uploaded), else a line per stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage = ""
        self.bar = None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the client-only install may lack tqdm: plain lines then
            tqdm = None
        self.tqdm = tqdm

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def show(self, j: BuildJob) -> None:
        if not self.enabled:
            return
        if j.stage != self.stage:
            self.stage = j.stage
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            total, unit = _total(j)
            if self.tqdm is not None and total:
                self.bar = self.tqdm(total=total, desc=f"build {j.stage}", unit=unit,
                                     unit_scale=unit == "B", file=sys.stderr)  # fmt: skip
            else:
                click.echo(f"build job {j.job_id}: {j.stage} {_progress(j)}".rstrip(), err=True)
        if self.bar is not None:
            done = j.layers_fitted if j.stage == "fitting" else j.bytes_uploaded
            self.bar.update(max(done - self.bar.n, 0))


def _total(j: BuildJob) -> tuple[int, str]:
    if j.stage == "fitting":
        return j.num_layers, "layer"
    if j.stage == "upload":
        return j.total_bytes, "B"
    return 0, ""


def _kind(j: BuildJob) -> str:
    return "append" if j.spec.append else ("insert" if j.spec.mode == "create" else "update")


def _progress(j: BuildJob) -> str:
    parts = []
    if j.tokens_prefilled or j.prefix_tokens:
        parts.append(f"{j.tokens_prefilled}/{j.prefix_tokens or '?'} tokens")
    if j.num_layers:
        parts.append(f"{j.layers_fitted}/{j.num_layers} layers")
    if j.total_bytes:
        parts.append(f"{output.human_bytes(j.bytes_uploaded)}/{output.human_bytes(j.total_bytes)}")
    return ", ".join(parts)


def _detail(j: BuildJob) -> str:
    lines = [
        ("job", j.job_id), ("tenant", j.tenant), ("prefix", j.spec.name), ("kind", _kind(j)),
        ("state", j.state), ("stage", j.stage), ("progress", _progress(j) or "-"),
        ("model", j.spec.model_fingerprint), ("budget", j.spec.budget or "-"),
        ("base version", j.base_version or "-"), ("version", j.version or "-"),
        ("worker", j.worker_id or "-"), ("attempts", j.attempts),
        ("error", j.error or "-"),
        ("submitted", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at))),
    ]  # fmt: skip
    return "\n".join(f"{k:<13} {v}" for k, v in lines)
