"""Wall-clock per training step of every estimator of an experiment, measured in one process,
interleaved.

The runs behind a results table may share the machine with other jobs, so their own
``ms_per_step`` mixes the estimator's cost with the load of the moment.  Here each estimator
trains ``steps`` steps in turn, for ``rounds`` rounds (estimators interleaved within a round,
so a change of load hits all of them alike), on the experiment's default model and data
(test set shrunk: evaluation is not timed anyway); the median over rounds of each run's mean
ms per step is reported.

    python -m structdsl.experiments time-steps graph-layout [--steps 30] [--rounds 3]
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile

__all__ = ["time_steps", "format_times"]


def time_steps(module, base, estimators, steps=30, rounds=3, progress=True):
    """``{estimator: (median ms per step, [ms per step of each round])}`` for the experiment
    ``module`` (:mod:`.graph_layout` or :mod:`.listops`) at configuration ``base``."""
    base = dataclasses.replace(base, num_test=min(base.num_test, 64), eval_every=steps, steps=steps)
    data = module.make_data(base)
    times = {e: [] for e in estimators}
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=rounds * len(estimators), desc="time-steps", leave=False)
        except ImportError:          # pragma: no cover
            bar = None
    with tempfile.TemporaryDirectory(prefix="structdsl-time-steps-") as tmp:
        for r in range(rounds):
            for est in estimators:
                cfg = dataclasses.replace(base, estimator=est, seed=r, out=tmp)
                rows = module.train(cfg, data, progress=False, log=None)
                times[est].append(rows[-1]["ms_per_step"])
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return {e: (statistics.median(v), v) for e, v in times.items()}


def format_times(times, labels=None, title=""):
    """A markdown table: estimator, median ms per step, every round."""
    labels = labels or {}
    lines = ([title, ""] if title else []) + ["| estimator | ms / step (median) | rounds |", "|---|---:|---|"]
    for est, (med, each) in times.items():
        lines.append(f"| {labels.get(est, est)} | {med:.1f} | {', '.join(f'{x:.1f}' for x in each)} |")
    return "\n".join(lines)
