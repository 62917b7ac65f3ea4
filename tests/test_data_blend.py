"""Blending and phases (hymoe.data.blend): the deficit rule's bound, realised proportions read
from the rows themselves, the phase switch at a token count, the config schema, and exact resume
and DP change with a blend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hymoe.data import Blend, DataError, PackedStream, Source, build_stream, train_bpe
from hymoe.data.blend import blend_from_config, choose
from hymoe.data.config import DataConfig
from omegaconf import OmegaConf
from test_data_helpers import assert_same, band_of, make_dataset, make_tokenizer, take

S, B = 32, 4
BANDS = {"web": (2, 100), "code": (100, 200), "math": (200, 300)}
WEIGHTS = {"web": 0.5, "code": 0.3, "math": 0.2}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Three datasets with disjoint token-id bands, so every row says which one it came from."""
    base = tmp_path_factory.mktemp("blend")
    tok = make_tokenizer(base)
    for i, (name, band) in enumerate(BANDS.items()):
        make_dataset(base / name, tok, 80 + 20 * i, 3, 40, band=band, seed=i)
    return base


def blend(root, phases=(), context=None):
    return Blend({n: Source(root / n, context if n == "code" else None) for n in BANDS},
                 WEIGHTS, phases)


def classify(batches) -> list[str]:
    full = [r for b in batches for r in b["tokens"].tolist()]
    return [band_of(r, BANDS) for r in full]


def test_deficit_rule_keeps_counts_within_a_row_and_a_half():
    """The bound the proportion tests rely on: after every row, each dataset's count is within
    1.5 rows of weight * rows (over 300 random weight vectors with up to 8 datasets; the worst
    seen is ~1.2, and < 1 for up to 3 datasets)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 9))
        w = rng.random(k) ** 3 * (rng.random(k) > 0.2)
        w = w / w.sum() if w.sum() else np.eye(k)[0]
        counts = [0] * k
        for t in range(1, 300):
            counts[choose(list(w), counts, 1)] += 1
            assert max(abs(c - x * t) for c, x in zip(counts, w)) <= (1.5 if k > 3 else 1.0)
            assert all(c == 0 for c, x in zip(counts, w) if x == 0)


def test_realised_proportions_match_the_weights(root):
    """400 rows over 4 streams: each stream keeps each dataset within 1.5 rows of its weight,
    so the rank within 4 * 1.5 = 6 rows — checked on the rows' own tokens, and the counts the
    stream reports for logging are exactly those."""
    s = PackedStream(blend(root), S, B, num_streams=4)
    batches = take(s, 100)
    got = classify(batches)
    for name, w in WEIGHTS.items():
        assert abs(got.count(name) - w * len(got)) <= 6, (name, got.count(name))
    assert s.blend_tokens() == [{n: got.count(n) * S for n in BANDS}]
    m = s.metrics()
    assert m["data/phase"] == 0 and m["data/skipped_shards"] == 0
    assert all(abs(m[f"data/share/{n}"] - w) < 6 / 400 for n, w in WEIGHTS.items())


def test_phase_switch_at_token_count(root):
    """Phase 2 (math only) from 94% of the run's tokens, on 2 DP ranks: every micro-batch that
    starts at or after the switch is phase 2, every one before is phase 1, on both ranks."""
    steps = 50
    total = steps * B * S * 2
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "path": str(root),
        "datasets": {n: {"path": n} for n in BANDS},
        "blend": {"web": 1, "code": 1},
        "phases": [{"start_fraction": 0.94, "blend": {"math": 1}}],
    }))
    start = round(0.94 * total)
    switch = -(-start // (B * S * 2))  # first micro-batch index whose start is >= the phase start
    for rank in range(2):
        s = build_stream(cfg, S, B, rank, 2, seed=1, total_tokens=total)
        got = [set(classify([b])) for b in take(s, steps)]
        assert all(g <= {"web", "code"} for g in got[:switch])
        assert all(g == {"math"} for g in got[switch:])
        assert s.metrics()["data/phase"] == 1
        assert s.blend_tokens()[1] == {"math": (steps - switch) * B * S}


def test_resume_and_dp_change_with_phases_and_workers(root):
    """A blend whose phase switches between batch 40 and 48 resumes exactly (workers on), and a
    DP change keeps every stream's counts: the run's totals stay exact."""
    phases = [(44 * B * S * 2, {"math": 2, "web": 1})]
    kw = {"seq_len": S, "micro_batch": B, "dp_size": 2, "seed": 3, "num_streams": 4}
    for rank in range(2):
        ref = take(PackedStream(blend(root, phases, context=8), dp_rank=rank, **kw), 48)
        with PackedStream(blend(root, phases, context=8), dp_rank=rank, num_workers=2, **kw) as a:
            take(a, 40)
            state = json.loads(json.dumps(a.state_dict()))
        with PackedStream(blend(root, phases, context=8), dp_rank=rank, num_workers=2, **kw) as b:
            b.load_state_dict(state)
            assert_same(take(b, 8), ref[40:])
    old = [PackedStream(blend(root, phases), dp_rank=r, **kw) for r in range(2)]
    for s in old:
        take(s, 46)
    totals = [sum(s.blend_tokens()[p].get(n, 0) for s in old) for p in (0, 1) for n in BANDS]
    new = PackedStream(blend(root, phases), S, B, seed=3)
    new.load_rank_states([s.state_dict() for s in old])
    assert new.num_streams == 4 and new.tokens == 46 * B * S * 2
    assert [new.blend_tokens()[p].get(n, 0) for p in (0, 1) for n in BANDS] == totals


def test_config_errors_name_the_field(root):
    def cfg(**kw):
        return DataConfig(path=str(root), **kw)

    from hymoe.data.config import DatasetEntry, PhaseConfig
    two = {"web": DatasetEntry("web"), "code": DatasetEntry("code")}
    with pytest.raises(DataError, match="give weights"):
        blend_from_config(cfg(datasets=two))
    with pytest.raises(DataError, match=r"blend: \['nope'\] are not datasets"):
        blend_from_config(cfg(datasets=two, blend={"nope": 1}))
    with pytest.raises(DataError, match=r"phases\[0\]: set exactly one"):
        blend_from_config(cfg(datasets=two, blend={"web": 1}, phases=[PhaseConfig({"code": 1})]))
    with pytest.raises(DataError, match="needs the run's total tokens"):
        blend_from_config(cfg(datasets=two, blend={"web": 1},
                              phases=[PhaseConfig({"code": 1}, start_fraction=0.9)]))
    with pytest.raises(DataError, match="data.on_corrupt"):
        cfg(on_corrupt="ignore").validate()
    with pytest.raises(DataError, match="need data.datasets"):
        blend_from_config(cfg(blend={"web": 1}))
    b = blend_from_config(cfg(datasets=two, blend={"web": 3, "code": 1}))
    assert b.describe() == [{"start_tokens": 0, "weights": {"web": 0.75, "code": 0.25}}]


def test_datasets_must_share_a_tokenizer(root, tmp_path):
    (tmp_path / "t.txt").write_text("another tokenizer " * 50)
    other = train_bpe([tmp_path / "t.txt"], 310, tmp_path / "tokenizer.json")
    make_dataset(tmp_path / "x", other, 30, 3, 10, band=(2, 250))
    with pytest.raises(DataError, match="different tokenizers"):
        PackedStream(Blend({"web": root / "web", "x": tmp_path / "x"}, {"web": 1, "x": 1}), S, B)
