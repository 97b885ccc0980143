"""Where the fitted-row kernel's time goes (GPU; device tool): graph replays of the whole layer,
of its first launch alone and of a one-element torch op, with do_bench (L2 flushed) and as
back-to-back replays, at batch 8, live 64. `python -m bench.attention.profile_fitted`."""

from __future__ import annotations

import torch

from bench.attention import cases as A
from bench.attention import fitted as F


def back_to_back(replay, n=200) -> float:
    for _ in range(10):
        replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        replay()
    e.record()
    torch.cuda.synchronize()
    return 1e3 * s.elapsed_time(e) / n


def main(eager: bool = False) -> None:
    from memdb_worker.attend import fitted_rows
    from memdb_worker.attend.shared_prefix import SharedConfig

    x = torch.zeros(1, device="cuda")
    g = A.graphed(lambda: x.add_(1))
    print(f"one-element op: do_bench {A.bench(g):.1f} us, back-to-back {back_to_back(g):.1f} us")
    for batch in (1, 8):
        inp = A.Inputs(batch, 64)
        for m in (1024, 4096, 16384):
            mem = F.make_fitted(m)
            rows = fitted_rows.prepare(mem, 0)
            for cfg in (
                SharedConfig(prefix_programs_per_sm=1, num_stages=3),
                SharedConfig(block_n=128, prefix_programs_per_sm=1, num_stages=3),
            ):

                def run(only=None, cfg=cfg, rows=rows, inp=inp):
                    return fitted_rows.fitted_attention(
                        inp.q, inp.k, inp.v, None, rows, A.D**-0.5, 0.0, cfg, _only=only
                    )

                if eager:  # for ncu: three plain calls per case
                    for _ in range(3):
                        run()
                    torch.cuda.synchronize()
                    print(f"eager B={batch} M={m} bn={cfg.block_n}", flush=True)
                    continue
                full = A.graphed(run)
                p1 = A.graphed(lambda run=run: run("phase1"))
                print(
                    f"B={batch} M={m} bn={cfg.block_n}: full {A.bench(full):.1f} / "
                    f"{back_to_back(full):.1f} us (flushed / back-to-back), phase1 "
                    f"{A.bench(p1):.1f} / {back_to_back(p1):.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    import sys

    main(eager="--eager" in sys.argv)
