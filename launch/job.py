"""What every launcher does with a recipe before it starts anything: check it against the number of
ranks it will get, and pin ``run.dir`` to one absolute path.

Pinning matters because the default ``run.dir`` holds ``${now:...}``: each rank (and each start of
a requeued Slurm job) would otherwise resolve its own time and write to its own folder, and a
requeued job would not find the checkpoint it is meant to resume from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    """One training run to launch: ``hymoe train RECIPE OVERRIDES`` on ``world_size`` ranks."""

    recipe: str
    overrides: list[str]  # ends with run.dir=<absolute path>
    run_dir: Path
    world_size: int
    point: list[str]  # the sweep point's own overrides ([] outside a sweep)

    def train_argv(self) -> list[str]:
        """Arguments after ``python -m hymoe``."""
        return ["train", self.recipe, *self.overrides]


def _without_run_dir(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+").startswith("run.dir=")]


def prepare(recipe: str, overrides: list[str], world_size: int, base: Path,
            run_dir: str | None = None, point: list[str] | None = None) -> Job:
    """Compose and validate the recipe for ``world_size`` ranks (a ``ConfigError`` naming the field
    if it cannot run there) and pin its run folder: ``run_dir`` if given, else the recipe's
    ``run.dir`` resolved now; relative paths are taken from ``base`` (the job's working folder)."""
    from hymoe.train.config import validate
    from hymoe.train.recipe import load_recipe

    if run_dir is not None:
        overrides = _without_run_dir(overrides) + [f"run.dir={run_dir}"]
    cfg = load_recipe(recipe, overrides)
    validate(cfg, world_size)
    path = Path(cfg.run.dir)
    if not path.is_absolute():
        path = Path(base) / path
    return Job(recipe, _without_run_dir(overrides) + [f"run.dir={path}"], path, world_size,
               list(point or []))


def prepare_all(recipe: str, overrides: list[str], world_size: int, base: Path,
                multirun: bool) -> list[Job]:
    """One ``Job`` per sweep point (``-m a=1,2 b=x,y``: the cartesian product, as ``hymoe train -m``
    expands it), each in its own folder ``<sweep dir>/<i>``; without ``multirun``, one job."""
    from hymoe.train.sweep import split_sweep_dir, sweep_points

    if not multirun:
        return [prepare(recipe, overrides, world_size, base)]
    sweep_dir, rest = split_sweep_dir(recipe, overrides)
    points = [job for _, job in sweep_points(rest)]
    jobs = []
    for i, job_overrides in enumerate(points):
        point = [o for o in job_overrides if not all(o in p for p in points)]  # what varies
        jobs.append(prepare(recipe, job_overrides, world_size, base, f"{sweep_dir}/{i}", point))
    return jobs
