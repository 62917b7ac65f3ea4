"""Hydra multirun: one job per point of a sweep (``a=1,2 b=x,y`` → the cartesian product), each in
its own run directory under the sweep's: ``<i>`` (the job number, Hydra's default subdir) or, with
``subdir="values"``, the job's swept values (``precision=bf16,nvfp4`` → ``bf16``, ``nvfp4``).
``hymoe train -m``, ``hymoe launch … -m`` and ``make demo`` (its BF16 and NVFP4 arms) all expand
sweeps here.

Jobs run one after another in this process, as Hydra's basic launcher does; on a cluster each point
becomes its own job instead (``hymoe launch slurm -m``, docs/launch.md).
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path


def sweep_points(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(name, plain overrides) per job. The name joins the job's swept values with ``_`` (the
    job's index where there is no sweep), so `precision=bf16,nvfp4` gives jobs ``bf16`` and
    ``nvfp4``; values are parsed with Hydra's override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices, swept = [], []
    for i, o in enumerate(parsed):
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([(f"{key}={v}", v) for v in o.sweep_string_iterator()])
            swept.append(i)
        else:
            choices.append([(f"{key}={o.get_value_element_as_str()}", None)])
    points = []
    for n, combo in enumerate(itertools.product(*choices) if choices else [()]):
        name = "_".join(str(combo[i][1]) for i in swept) or str(n)
        points.append((_safe(name), [c[0] for c in combo]))
    return points


def split_sweep_dir(recipe: str, overrides: list[str]) -> tuple[str, list[str]]:
    """(the sweep's folder, the overrides without ``run.dir``): a given ``run.dir=`` is the sweep
    folder (each job gets a subfolder), else ``multirun/<recipe>/<now>``, resolved once."""
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("run.dir=")]
    rest = [o for o in overrides if not o.lstrip("+").startswith("run.dir=")]
    if given:
        return given[-1], rest
    return f"multirun/{recipe}/{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}", rest


def _safe(name: str) -> str:
    """A directory name: path separators and spaces out."""
    return "".join(c if c not in "/\\ " else "-" for c in name)


def run_sweep(recipe: str, overrides: list[str], sweep_dir: str | Path, subdir: str = "num",
              before_job: Callable[[str, object], None] | None = None,
              ) -> Iterator[tuple[str, Path, list[dict]]]:
    """Train every point of the sweep, one after another; yields (subdir, run directory, history)
    after each job. ``before_job(subdir, cfg)`` runs once the job's config is composed."""
    from hymoe.train.recipe import load_recipe
    from hymoe.train.trainer import Trainer

    points = sweep_points(overrides)
    names = [n for n, _ in points]
    if subdir == "num":
        points = [(str(i), job) for i, (_, job) in enumerate(points)]
    elif subdir != "values":
        raise ValueError(f"subdir must be 'num' or 'values', got {subdir!r}")
    elif len(set(names)) != len(names):  # e.g. a=1,01: equal names, distinct values
        points = [(f"{i}_{n}", job) for i, (n, job) in enumerate(points)]
    for name, job in points:
        run_dir = Path(sweep_dir) / name
        cfg = load_recipe(recipe, [*job, f"run.dir={run_dir}"])
        if before_job is not None:
            before_job(name, cfg)
        yield name, run_dir, Trainer(cfg).train()
