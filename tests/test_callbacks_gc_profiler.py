"""The garbage-collection and profiler callbacks, driven by a stand-in trainer: the profiler
records exactly the configured optimizer steps (inclusive) and writes a chrome trace and an
operator table; manual GC turns the automatic collector off and collects every N steps."""

import gc
import json
from types import SimpleNamespace

import torch
from hymoe.train.callbacks import GarbageCollection, Profiler


def drive(callbacks, steps, first_step=0):
    trainer = SimpleNamespace(step=first_step, is_logger=True)
    for cb in callbacks:
        cb.on_train_start(trainer)
    for k in range(first_step + 1, steps + 1):
        with torch.profiler.record_function(f"optimizer_step_{k}"):
            torch.ones(8, 8) @ torch.ones(8, 8)
        trainer.step = k
        for cb in callbacks:
            cb.on_step_end(trainer, {"step": k})
    for cb in callbacks:
        cb.on_train_end(trainer)


def traced_steps(run_dir):
    events = json.loads((run_dir / "profile" / "trace_rank0.json").read_text())["traceEvents"]
    return sorted({int(e["name"].rsplit("_", 1)[1]) for e in events
                   if e.get("name", "").startswith("optimizer_step_")})


def test_profiler_records_the_configured_steps(tmp_path):
    drive([Profiler([3, 4], tmp_path)], steps=6)
    assert traced_steps(tmp_path) == [3, 4]
    assert "aten::mm" in (tmp_path / "profile" / "ops_rank0.txt").read_text()


def test_profiler_from_the_first_step_and_after_a_resume(tmp_path):
    drive([Profiler([1, 2], tmp_path / "a")], steps=4)
    assert traced_steps(tmp_path / "a") == [1, 2]
    drive([Profiler([6, 9], tmp_path / "b")], steps=7, first_step=5)  # ends with training
    assert traced_steps(tmp_path / "b") == [6, 7]
    drive([Profiler([], tmp_path / "c")], steps=3)
    assert not (tmp_path / "c").exists()


def test_manual_gc(monkeypatch):
    collected, seen_enabled = [], []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(gc.isenabled()) or real())

    class Probe(GarbageCollection):
        def on_step_end(self, trainer, m):
            seen_enabled.append(gc.isenabled())
            super().on_step_end(trainer, m)

    drive([Probe(3)], steps=7)
    assert seen_enabled == [False] * 7 and gc.isenabled()
    assert len(collected) == 1 + 2  # at the start, then after steps 3 and 6
