"""`memdb-admin prefix ...`: build, upload, append to, inspect, move and delete memories.

`insert`, `update` and `append` submit a build job that a worker holding the model runs
(`cli_build.submit`: nothing of the worker or torch is needed here); with `--local` (and
`prefix build`) they build on this machine with the worker's builder
(`memdb_client.build.local_builder`, loaded only then; flags from
`memdb.build_options.BuildOptions`) and upload with one `PutPrefix` stream: the server makes
a version current only once the whole upload and its commit message arrived and validated,
never half of one. A Ctrl-C before the commit message was sent stores nothing; one after it
may or may not have stored the version (see `MemdbClient.put_prefix`; `prefix info` tells
which). The commands' flags are `cli_options`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import click

from memdb.build_options import spec
from memdb.errors import NotFound
from memdb.shards import encode_shard, holds_fitted_rows
from memdb_client import build, cli_build, output, portable
from memdb_client.app import EXIT_CODES, App, Failure, json_option, pass_app
from memdb_client.build_jobs import BuildSpec
from memdb_client.cli_options import (
    build_flag,
    builder_options,
    compose,
    index_options,
    input_options,
    job_options,
    model_options,
    trace_options,
)
from memdb_client.inputs import Source, read_source, unescape
from memdb_client.types import PrefixInfo


@click.group()
def prefix():
    """Build, upload, append to, inspect, export/import and delete memories."""


@dataclass
class Built:
    name: str
    blobs: list[bytes]
    fingerprint: str
    token_count: int
    params: dict[str, str]
    prefix: dict[str, Any]  # PrefixInfo-like fields for a portable file


def _read_prefix(kw: dict) -> Source:
    return read_source(
        kw["prefix_file"],
        what="prefix",
        input_format=kw["input_format"],
        template=unescape(kw["template"]),
        skip=kw["prefix_skip"],
        limit=kw["prefix_limit"],
    )


def _traces(kw: dict, pre: Source) -> tuple[list[str], str]:
    skip, limit = kw["traces_skip"], kw["traces_limit"]
    if kw["traces_file"]:
        template = unescape(kw["trace_template"] or kw["template"])
        src = read_source(
            kw["traces_file"],
            what="traces",
            input_format=kw["input_format"],
            template=template,
            skip=skip,
            limit=limit,
        )
        return src.items, src.path
    end = None if limit is None else skip + limit
    items = pre.items[skip:end]
    if not items:
        raise Failure(
            "no calibration traces: the prefix has too few examples/paragraphs for "
            "--traces-skip; pass --traces-file",
            EXIT_CODES["usage"],
        )
    return (
        items,
        f"{pre.path} (the prefix's own {'examples' if pre.kind == 'jsonl' else 'paragraphs'})",
    )


def _load(app: App, builder, kw: dict):
    if kw.get("threads"):
        builder.set_threads(kw["threads"])
    app.note(f"loading model '{kw['model']}' on {kw['device']} ...")
    t0 = time.perf_counter()
    dtype = None if kw["dtype"] == "auto" else kw["dtype"]
    loaded = builder.load_model(kw["model"], kw["device"], dtype, quiet=app.quiet)
    fp = builder.fingerprint(loaded.model)
    seconds = time.perf_counter() - t0
    app.note(f"model loaded in {seconds:.1f} s, fingerprint {output.short_fingerprint(fp)}")
    return loaded, fp


def _build(app: App, name: str, kw: dict, pre: Source | None = None) -> Built:
    """Read inputs, load the model, build the memory and encode its shards (no server)."""
    pre = pre or _read_prefix(kw)
    traces, traces_from = _traces(kw, pre)
    options = build.make_options(kw)
    builder = build.local_builder()
    loaded, fp = _load(app, builder, kw)
    tok = builder.tokenize(loaded.tokenizer, pre.text, traces)
    records = builder.check_budget(tok, kw["budget"], options)
    app.note(
        f"prefix: {len(tok.prefix)} tokens from {pre.path}; traces: {len(tok.traces)} "
        f"({tok.trace_tokens} tokens) from {traces_from}; budget M={kw['budget']} "
        f"from {records} calibration records"
    )
    chunks, size = builder.prefill_chunks(
        loaded.model, len(tok.prefix), options.chunk_tokens, options.sink_tokens
    )
    app.note(f"prefill: {len(tok.prefix)} tokens in {chunks} chunk(s) of <= {size} tokens ...")
    built = builder.build(loaded.model, loaded.tokenizer, tok, kw["budget"], options, app.progress)
    app.note(
        f"built in {built.build_seconds:.1f} s: {len(built.shards)} layers, "
        f"{output.human_bytes(built.nbytes())}"
    )
    if (line := build.heldout_summary(built.metadata)) is not None:
        app.note(line)
    extra = {
        "source": pre.path,
        "traces_source": traces_from,
        "model": kw["model"],
        "device": kw["device"],
        "built_by": "memdb-admin",
    }
    if pre.kind == "jsonl":
        extra["template"] = unescape(kw["template"])
    params = build.server_params(built.metadata, extra)
    blobs = [encode_shard(s) for s in built.shards]
    s0 = built.shards[0]
    i, m, dk = s0.keys.shape
    info = {
        "name": name,
        "version": 0,
        "tenant": "",
        "model_fingerprint": fp,
        "num_layers": len(blobs),
        "num_groups": i,
        "budget": m,
        "key_dim": dk,
        "heads_per_group": s0.out.shape[2],
        "head_dim": s0.out.shape[3],
        "dtype": str(s0.out.dtype),
        "token_count": built.token_count,
        "build_params": params,
        "extra_tensors": sorted(s0.extras),
        "bytes": sum(len(b) for b in blobs),
        "index_kind": kw.get("index_kind", "auto"),
        "metric": kw.get("metric", "cosine"),
    }
    return Built(name, blobs, fp, built.token_count, params, info)


def _upload(
    app: App,
    name: str,
    blobs: list[bytes],
    *,
    fingerprint: str,
    token_count: int,
    params: dict[str, str],
    mode: str,
    expected_version: int = 0,
    index_kind: str = "",
    metric: str = "",
) -> PrefixInfo:
    total = sum(len(b) for b in blobs)
    app.note(f"uploading {len(blobs)} layers ({output.human_bytes(total)}) to {app.server} ...")
    with output.ByteProgress(total, "upload", app.progress) as bar:
        return app.client.put_prefix(
            name,
            blobs,
            model_fingerprint=fingerprint,
            token_count=token_count,
            build_params=params,
            mode=mode,
            expected_version=expected_version,
            index_kind="" if index_kind == "auto" else index_kind,
            metric=metric,
            on_bytes=bar.update,
        )


def _check_name(app: App, name: str, *, exists: bool) -> PrefixInfo | None:
    """Fail early (before minutes of building) if NAME is taken (insert) or free (update)."""
    try:
        info = app.client.get_prefix(name)
    except NotFound:
        if exists:
            raise Failure(
                f"prefix '{name}' not found; use `prefix insert` to create it",
                EXIT_CODES["not_found"],
            ) from None
        return None
    if not exists:
        raise Failure(
            f"prefix '{name}' already exists (version {info.version}); use "
            "`prefix update` to replace it",
            EXIT_CODES["conflict"],
        )
    return info


def _done(app: App, verb: str, info: PrefixInfo) -> None:
    app.note(
        f"{verb} prefix '{info.name}' version {info.version} ({output.human_bytes(info.bytes)})"
    )
    app.emit(info, output.prefix_detail(info))


def _build_and_upload(app: App, name: str, mode: str, kw: dict) -> None:
    pre = _read_prefix(kw)  # bad input fails before anything else
    have = _check_name(app, name, exists=(mode == "update"))
    if not kw["local"]:
        traces, traces_from = _traces(kw, pre)
        spec = BuildSpec(
            name, mode, pre.text, traces, kw["budget"], build.make_options(kw).to_metadata(),
            kw["model_fingerprint"], have.version if have else 0,
            index_kind="" if kw["index_kind"] == "auto" else kw["index_kind"],
            metric=kw["metric"], build_params=_sources(kw, pre, traces_from),
        )  # fmt: skip
        _done(app, "inserted" if mode == "create" else "updated", cli_build.submit(app, spec))
        return
    b = _build(app, name, kw, pre)
    info = _upload(
        app,
        name,
        b.blobs,
        fingerprint=b.fingerprint,
        token_count=b.token_count,
        params=b.params,
        mode=mode,
        index_kind=kw["index_kind"],
        metric=kw["metric"],
    )
    _done(app, "inserted" if mode == "create" else "updated", info)


# -- build commands --------------------------------------------------------------------------------
def _sources(kw: dict, pre: Source, traces_from: str) -> dict[str, str]:
    extra = {"source": pre.path, "traces_source": traces_from, "built_by": "memdb-admin"}
    if pre.kind == "jsonl":
        extra["template"] = unescape(kw["template"])
    return extra


def _build_command(f, *, jobs: bool = True):
    """The options of a build command (`jobs`: it may run as a build job)."""
    return compose(
        input_options,
        trace_options,
        builder_options,
        *([job_options] if jobs else []),
        model_options,
        index_options,
        json_option,
        pass_app,
    )(f)


def _local_build_command(f):
    return _build_command(f, jobs=False)


@prefix.command("insert")
@click.argument("name")
@_build_command
def prefix_insert(app: App, name: str, **kw):
    """Build the memory of a new prefix NAME (a build job on a worker; --local: here) and
    store it.

    Refuses an existing NAME (use `update`). Example, TREC as a 200-example prefix with 64
    other examples as calibration traces:

    \b
      memdb-admin prefix insert trec -p train.jsonl --prefix-limit 200 \\
          -t train.jsonl --traces-skip 200 --traces-limit 64 --budget 256
    """
    _build_and_upload(app, name, "create", kw)


@prefix.command("update")
@click.argument("name")
@_build_command
def prefix_update(app: App, name: str, **kw):
    """Rebuild the memory of prefix NAME and upload it as a new version (atomically: workers
    see the old version or the new one, never a mix)."""
    _build_and_upload(app, name, "update", kw)


@prefix.command("build")
@click.argument("name")
@click.option(
    "--output",
    "-o",
    "out",
    required=True,
    metavar="FILE",
    help="Portable file to write (a .tar, or a directory), for `prefix import`.",
)
@click.option("--force", is_flag=True, help="Overwrite FILE.")
@_local_build_command
def prefix_build(app: App, name: str, out: str, force: bool, **kw):
    """Build the memory of prefix NAME into a portable file, without a server (e.g. on a GPU
    machine); load it anywhere with `prefix import`."""
    portable.check_target(out, overwrite=force)
    b = _build(app, name, kw)
    kind = portable.write(out, portable.Portable(b.prefix, b.blobs), overwrite=force)
    app.note(f"wrote {kind} {out}")
    app.emit(
        {"file": out, "kind": kind, "prefix": b.prefix},
        f"wrote memory '{name}' ({len(b.blobs)} layers, "
        f"{output.human_bytes(b.prefix['bytes'])}) to {out}",
    )


@prefix.command("append")
@click.argument("name")
@input_options
@job_options
@model_options
@build_flag(spec("chunk_tokens"))
@click.option(
    "--query-position",
    type=click.IntRange(min=0),
    default=None,
    help="RoPE position of the entries' queries on the new text (default: where "
    "calibration put the traces' tokens on average).",
)
@json_option
@pass_app
def prefix_append(app: App, name: str, query_position, **kw):
    """Add text to the memory of NAME without rebuilding it: every entry's state on the new
    text is merged into its stored state (online softmax); uploaded as a new version.

    The new text is encoded as an independent chunk (like the builder's chunks of a long
    prefix); the stored keys stay. Use the model that built the memory.
    """
    src = _read_prefix(kw)
    info = _check_name(app, name, exists=True)
    assert info is not None
    if not kw["local"]:
        options = build.make_options({"chunk_tokens": kw["chunk_tokens"]}).to_metadata()
        spec = BuildSpec(
            name, "update", src.text, options=options, append=True,
            model_fingerprint=kw["model_fingerprint"], expected_version=info.version,
            build_params={"source": src.path}, query_position=query_position,
        )  # fmt: skip
        _done(app, "appended to", cli_build.submit(app, spec))
        return
    builder = build.local_builder()
    loaded, fp = _load(app, builder, kw)
    if fp != info.model_fingerprint:
        built_with = output.short_fingerprint(info.model_fingerprint)
        raise Failure(
            f"prefix '{name}' was built with model {built_with} but --model {kw['model']} is "
            f"{output.short_fingerprint(fp)}; append with the model that built it",
            EXIT_CODES["conflict"],
        )
    app.note(f"fetching '{name}' version {info.version} ({output.human_bytes(info.bytes)}) ...")
    with output.ByteProgress(info.bytes, "download", app.progress) as bar:
        mem = app.client.fetch_memory(
            name, model_fingerprint=fp, version=info.version, on_bytes=bar.update
        )
    app.note(f"prefill of the new text and merge into {info.num_layers} layers ...")
    res = builder.append_chunk(
        loaded.model,
        loaded.tokenizer,
        mem.shards,
        src.text,
        chunk_tokens=kw["chunk_tokens"],
        query_position=query_position,
        progress=app.progress,
    )
    if holds_fitted_rows(res.metadata):
        how = f"added the {res.tokens} new tokens as rows of {len(res.shards)} layers"
    else:
        how = (
            f"merged {res.tokens} new tokens into {len(res.shards)} layers "
            f"(queries at position {res.query_position})"
        )
    app.note(f"{how}; the prefix now has {res.token_count} tokens")
    params = dict(info.build_params)
    params.update(build.server_params(res.metadata, {}))
    for k in ("calibration_records", "trace_count", "trace_tokens"):  # keep the original values
        if k in info.build_params:
            params[k] = info.build_params[k]
    sources = [s for s in [params.get("appended_sources", "")] if s]
    params["appended_sources"] = ", ".join([*sources, src.path])[-4096:]
    blobs = [encode_shard(s) for s in res.shards]
    new = _upload(
        app,
        name,
        blobs,
        fingerprint=fp,
        token_count=res.token_count,
        params=params,
        mode="update",
        expected_version=info.version,
        index_kind=info.index_kind,
        metric=info.metric,
    )
    _done(app, "appended to", new)


# -- inspection and removal ------------------------------------------------------------------------
@prefix.command("list")
@click.option("--name-prefix", default="", help="Only names starting with this.")
@json_option
@pass_app
def prefix_list(app: App, name_prefix: str):
    """List the prefixes of the key's tenant."""
    ps = app.client.list_prefixes(name_prefix=name_prefix)
    app.emit(ps, output.prefix_rows(ps))


@prefix.command("show")
@click.argument("name")
@json_option
@pass_app
def prefix_show(app: App, name: str):
    """Version, model, budget, layers, bytes, build parameters, created/updated of NAME."""
    info = app.client.get_prefix(name)
    app.emit(info, output.prefix_detail(info))


@prefix.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--version",
    "expected",
    type=click.IntRange(min=0),
    default=0,
    help="Delete only if NAME is at this version (0 = any).",
)
@json_option
@pass_app
def prefix_delete(app: App, name: str, yes: bool, expected: int):
    """Delete prefix NAME and every stored version of it."""
    if not yes:
        info = app.client.get_prefix(name)
        click.confirm(
            f"Delete prefix '{name}' (version {info.version}, {output.human_bytes(info.bytes)})?",
            abort=True,
            err=True,
        )
    version = app.client.delete_prefix(name, expected_version=expected)
    app.emit(
        {"name": name, "deleted_version": version}, f"deleted prefix '{name}' (version {version})"
    )


# -- moving memories between servers ---------------------------------------------------------------
@prefix.command("export")
@click.argument("name")
@click.argument("file")
@click.option("--force", is_flag=True, help="Overwrite FILE.")
@json_option
@pass_app
def prefix_export(app: App, name: str, file: str, force: bool):
    """Write prefix NAME to FILE: a tar of safetensors shards + manifest.json (a directory if
    FILE is one or ends with '/')."""
    portable.check_target(file, overwrite=force)
    info = app.client.get_prefix(name)
    with output.ByteProgress(info.bytes, "download", app.progress) as bar:
        got, blobs = app.client.fetch_memory_raw(
            name,
            model_fingerprint=info.model_fingerprint,
            version=info.version,
            on_bytes=bar.update,
        )
    p = portable.Portable(output.to_jsonable(got), blobs)
    kind = portable.write(file, p, overwrite=force)
    app.emit(
        {"file": file, "kind": kind, "prefix": p.prefix},
        f"exported '{name}' version {got.version} ({len(blobs)} layers, "
        f"{output.human_bytes(p.nbytes)}) to {file}",
    )


@prefix.command("import")
@click.argument("file")
@click.option("--name", default=None, help="Store under this name (default: the exported name).")
@click.option("--replace", is_flag=True, help="Replace an existing prefix as a new version.")
@json_option
@pass_app
def prefix_import(app: App, file: str, name: str | None, replace: bool):
    """Upload a memory from FILE (written by `prefix export` or `prefix build`)."""
    p = portable.read(file)
    target = name or p.name
    if not target:
        raise Failure(f"'{file}' names no prefix; pass --name", EXIT_CODES["usage"])
    if not replace:
        try:
            have = app.client.get_prefix(target)
        except NotFound:
            pass
        else:
            raise Failure(
                f"prefix '{target}' already exists (version {have.version}); pass "
                "--replace to import as its new version, or --name",
                EXIT_CODES["conflict"],
            )
    meta = p.prefix
    params = {str(k): str(v) for k, v in (meta.get("build_params") or {}).items()}
    info = _upload(
        app,
        target,
        p.blobs,
        fingerprint=str(meta.get("model_fingerprint", "")),
        token_count=int(meta.get("token_count", 0)),
        params=params,
        mode="upsert" if replace else "create",
        index_kind=str(meta.get("index_kind", "") or "auto"),
        metric=str(meta.get("metric", "") or "cosine"),
    )
    _done(app, "imported", info)
