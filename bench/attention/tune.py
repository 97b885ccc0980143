"""Launch-shape sweeps of bench.attention (graph replays): the fused memory kernels'
`fused.Config` per batch (`tune`; skipped by --quick, which uses `fused.default_config`) and
the shared-prefix kernels' `SharedConfig` per batch (`tune_shared`)."""

from __future__ import annotations

from bench.attention import cases as A


def tune(results: dict, quick: bool) -> dict:
    """Launch shapes per batch, timed as CUDA-graph replays (GPU time, no Python launch cost)."""
    from dataclasses import replace

    from memdb_worker.attend import fused

    grid = []
    for bm in (64, 128):
        for w in (4, 8):
            for spsm in (1, 2, 4, 8):
                for st in (3, 4):
                    grid.append(fused.Config(block_m=bm, num_warps=w, scan_programs_per_sm=spsm,
                                             num_stages=st))  # fmt: skip
    if quick:
        grid = grid[:8]
    best = {}
    rows = []
    mem = A.make_memory(4096)
    for batch in A.BATCHES:
        inp = A.Inputs(batch, A.LIVE)

        def timed(cfg, only=None, inp=inp):
            from memdb_worker.attend import fused as fz

            fl = fz.prepare_layer(mem, 0)
            inv = mem.keyspace.rope.inv_freq.to(A.DEVICE)
            fn = lambda: fz.memory_attention(  # noqa: E731
                inp.q, inp.k, inp.v, None, inp.pos, fl, inv, 1.0, A.D**-0.5, config=cfg, _only=only
            )
            return A.bench(A.graphed(fn), rep=30)

        times = []
        for cfg in grid:
            try:
                t = timed(cfg)
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile
                A.log("config failed", cfg, repr(exc)[:300])
                continue
            times.append((t, cfg))
            rows.append({"batch": batch, "config": cfg.__dict__, "us": t})
        times.sort(key=lambda x: x[0])
        cfg = times[0][1]
        live_times = [(times[0][0], cfg)]
        variants = [replace(cfg, keys_a=False)]
        for lt in (True, False):
            for lp in (1, 2, 4):
                variants.append(replace(cfg, live_t=lt, live_programs_per_sm=lp))
        for c in variants:
            if c != cfg:
                try:
                    t = timed(c)
                except Exception as exc:  # noqa: BLE001
                    A.log("config failed", c, repr(exc)[:300])
                    continue
                live_times.append((t, c))
                rows.append({"batch": batch, "config": c.__dict__, "us": t})
        live_times.sort(key=lambda x: x[0])
        best[batch] = live_times[0][1]
        parts = {p: timed(best[batch], p) for p in ("scan", "live")}
        results.setdefault("breakdown", []).append(
            {"batch": batch, "M": 4096, "total_us": live_times[0][0],
             "scan_only_us": parts["scan"], "live_only_us": parts["live"]}
        )  # fmt: skip
        A.log(f"tune batch {batch}: best {live_times[0][0]:.1f} us {best[batch]}; scan alone "
            f"{parts['scan']:.1f}, live alone {parts['live']:.1f}; "
            f"worst {times[-1][0]:.1f}")  # fmt: skip
    results["tuning"] = rows
    return best


# -- one layer -----------------------------------------------------------------------------------


def tune_shared(results: dict, batches, quick: bool, n: int = 32768) -> dict:
    """Launch shapes of the shared-prefix kernels per batch at N = 32K (graph replays)."""
    from memdb_worker.attend.shared_prefix import SharedConfig

    grid = [SharedConfig(block_n=bn, prefix_programs_per_sm=pp, num_warps=w)
            for bn in (64, 128) for pp in (1, 2, 4) for w in (4, 8)]  # fmt: skip
    if quick:
        grid = [c for c in grid if c.block_n == 64]
    best, rows = {}, []
    for batch in batches:
        inp = A.SharedInputs(batch, n)
        times = []
        for cfg in grid:
            try:
                t = A.bench(A.graphed(A.shared_fn(inp, cfg)), rep=30)
            except Exception as exc:  # noqa: BLE001 - a shape that fails to compile
                A.log("shared config failed", cfg, repr(exc)[:300])
                continue
            times.append((t, cfg))
            rows.append({"batch": batch, "config": cfg.__dict__, "us": t})
        if times:
            times.sort(key=lambda x: x[0])
            best[batch] = times[0][1]
            A.log(f"tune shared B={batch}: best {times[0][0]:.1f} us {times[0][1]}")
        del inp
    results["shared_tuning"] = rows
    results["shared_configs"] = {str(b): c.__dict__ for b, c in best.items()}
    return best
