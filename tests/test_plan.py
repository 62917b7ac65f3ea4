"""The layout planner (hymoe.launch.plan, `hymoe plan`): its memory model against what megatron-core
holds on CPU, its parameter and FLOP split against the counters, and the published Nemotron 3
layouts — feasible, fitting, and near the top of the ranking. No timings are asserted: step
times are the planner's estimates, compared only with each other."""

import json
from pathlib import Path

import pytest
from helpers import hymoe, torchrun
from hymoe.launch.hardware import GPUS, gpu
from hymoe.launch.memory import all_stage_params, model_table, stage_layers, stage_memory
from hymoe.launch.plan import plan
from hymoe.launch.plan_cli import render
from hymoe.model.counting import count_params, layer_params
from hymoe.model.flops import layer_flops, layer_flops_by_module
from hymoe.parallel.layout import ParallelConfig
from hymoe.train.config import model_dims
from hymoe.train.recipe import load_recipe

WORKERS = Path(__file__).parent / "distributed"
PUBLISHED = ("nano_30b_a3b", "super_120b_a12b", "ultra_550b_a55b")


def recipe(name, *overrides):
    return load_recipe(name, ["data.path=unused", *overrides])


# -- memory against megatron-core --------------------------------------------------------------
@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_memory") / "memory.json"
    torchrun(WORKERS / "plan_memory_worker.py", 2, str(out))
    return json.loads(out.read_text())


# name → (layout, dp, bytes per parameter), as tests/distributed/plan_memory_worker.py builds them
MEASURED_LAYOUTS = {
    "dp2_distopt_bf16": (ParallelConfig(distributed_optimizer=True), 2, 2),
    "tp2_ep2_distopt_bf16": (ParallelConfig(tp=2, ep=2, distributed_optimizer=True), 1, 2),
    "pp2_fp32": (ParallelConfig(pp=2), 1, 4),
}


@pytest.mark.parametrize("name", list(MEASURED_LAYOUTS))
def test_weights_grads_and_optimizer_bytes_match_megatron(measured, name):
    layout, dp, param_bytes = MEASURED_LAYOUTS[name]
    cfg = recipe("tiny")
    stages = stage_memory(cfg.model, layout, dp, seq_len=32, micro_batch=1, num_micro=2, vocab=500,
                          precision=cfg.precision, recompute="none", param_bytes=param_bytes,
                          native_quantized=False)
    ranks = measured[name]
    for r in ranks:
        model = stages[r["pp_rank"]]
        assert r["dense_params"] == model["dense_params"]
        assert r["expert_params"] == model["expert_params"]
        assert r["params"] == model["params"]  # bf16, and Mamba's A_log/D/dt_bias in fp32
        assert r["grads"] == model["grads"]  # megatron DDP's fp32 main_grad buffer
        # The distributed optimizer cuts padded buckets: a rank's share is within a few params.
        assert r["optimizer"] == pytest.approx(model["optimizer"], rel=0.01)
    if layout.distributed_optimizer and dp > 1:
        assert sum(r["optimizer"] for r in ranks) == pytest.approx(dp * stages[0]["optimizer"])


# -- the model's split agrees with the counters ------------------------------------------------
@pytest.mark.parametrize("name", PUBLISHED + ("tiny",))
def test_stage_parameters_add_up_to_the_model(name):
    cfg = recipe(name, "model.vocab_size=131072")  # a multiple of 128: no padding
    table = model_table(cfg.model, cfg.precision)
    for layout in (ParallelConfig(), ParallelConfig(pp=2)):
        stages = all_stage_params(cfg.model, layout, 131072, table)
        total = sum(s.dense + s.expert - s.duplicate for s in stages)
        assert total == count_params(cfg.model, 131072)["total"]
    for s in set(cfg.model.layer_pattern):
        split = table["split"][s]
        assert split["tp"] + split["replicated"] + split["expert"] == layer_params(cfg.model, s)
        assert min(split.values()) >= 0


@pytest.mark.parametrize("name", PUBLISHED + ("tiny",))
def test_flops_by_module_add_up_to_the_layer(name):
    model = recipe(name).model
    for s in set(model.layer_pattern):
        for seq in (4096, 1048576):
            assert sum(layer_flops_by_module(model, s, seq).values()) == pytest.approx(
                layer_flops(model, s, seq))


def test_hardware_peaks():
    from hymoe.train.mfu import PEAK_BF16_TFLOPS

    for g in GPUS.values():
        assert g.bf16_tflops == PEAK_BF16_TFLOPS[g.name.upper()]
        assert g.peak_tflops("bf16") == g.bf16_tflops
    assert gpu("gb300").peak_tflops("nvfp4") == 3 * gpu("gb300").peak_tflops("mxfp8")  # the "3×"
    assert gpu("h100").peak_tflops("nvfp4") == gpu("h100").bf16_tflops  # emulated on Hopper
    with pytest.raises(ValueError, match="--gpu"):
        gpu("a100")


# -- the published runs ------------------------------------------------------------------------
def rank_of(result, tp, cp, ep, pp, etp=1):
    for i, p in enumerate(result.plans):
        lay = p.layout
        if (lay.tp, lay.cp, lay.ep, lay.pp, lay.expert_tp) == (tp, cp, ep, pp, etp):
            return i + 1, p
    raise AssertionError(f"tp{tp} cp{cp} ep{ep} pp{pp} is not among the feasible layouts")


# (recipe, overrides, GPUs, GPU, published layout (tp, cp, ep, pp), rank within this share of the
# feasible layouts, step time within this factor of the best). GPU counts: Nano's long-context run
# at dp=1 (cp·tp·pp = 256); Super at 1M at dp=1 (cp·tp = 128);
# Super's pretraining count is not published: 256 B200 (HGX boards of 8, so EP stays on NVLink).
# The global batch keeps pretraining's 25.2M tokens per step.
RUNS = {
    "nano_512k_h100": ("nano_30b_a3b", ["train.seq_len=524288", "train.global_batch=48"], 256,
                       "h100", (8, 8, 8, 4), 0.25, 1.5),
    "super_1m_gb200": ("super_120b_a12b", ["train.seq_len=1048576", "train.global_batch=24"], 128,
                       "gb200", (2, 64, 64, 1), 0.05, 1.25),
    "super_8k_b200": ("super_120b_a12b", [], 256, "b200", (4, 1, 8, 1), 0.05, 1.3),
    # Megatron-Bridge's GB200 recipe for Super (TP2, EP64): on an NVL72 domain EP64 is on NVLink.
    "super_8k_gb200": ("super_120b_a12b", [], 512, "gb200", (2, 1, 64, 1), 0.005, 1.05),
}


@pytest.fixture(scope="module")
def planned():
    cache = {}

    def get(key):
        if key not in cache:
            name, overrides, n, g = RUNS[key][:4]
            cache[key] = plan(recipe(name, *overrides), n, gpu(g))
        return cache[key]
    return get


@pytest.mark.parametrize("key", list(RUNS))
def test_published_layout_is_feasible_and_ranks_near_the_top(planned, key):
    name, overrides, n, _, (tp, cp, ep, pp), share, factor = RUNS[key]
    result = planned(key)
    rank, p = rank_of(result, tp, cp, ep, pp)
    assert p.fits, p.memory
    assert rank <= max(1, share * len(result.plans)), (rank, len(result.plans))
    assert p.time["step"] <= factor * result.plans[0].time["step"]
    assert p.layout.distributed_optimizer and p.layout.use_sequence_parallel == (tp > 1)
    # Every plan is a layout the trainer's own rules accept.
    cfg = recipe(name, *overrides)
    dims = model_dims(cfg.model, cfg.train.seq_len)
    for q in result.plans[:50]:
        assert q.layout.validate(n, dims) == q.dp
        assert cfg.train.global_batch == q.num_micro * q.micro_batch * q.dp


def test_ranking_puts_fitting_layouts_first_fastest_first(planned):
    plans = planned("super_8k_b200").plans
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    steps = [p.time["step"] for p in plans if p.fits]
    assert steps == sorted(steps)
    # Super's experts do not fit unsharded on one GPU: every fitting layout shards them.
    assert all(p.layout.ep * p.layout.expert_tp * p.layout.pp > 1 for p in plans if p.fits)


def test_activations_dominate_at_1m_tokens(planned):
    """At 1M tokens the activations dominate: the published layout's activations exceed its
    weights, gradients and optimizer state together."""
    _, p = rank_of(planned("super_1m_gb200"), 2, 64, 64, 1)
    m = p.memory
    assert m["activations"] > m["params"] + m["grads"] + m["optimizer"]


def test_table_shows_the_pinned_layout_with_its_rank(planned):
    text = render(planned("nano_512k_h100"), top=5, pins={"tp": 8, "cp": 8, "ep": 8, "pp": 4})
    rank, _ = rank_of(planned("nano_512k_h100"), 8, 8, 8, 4)
    command = "hymoe train nano_30b_a3b parallel.tp=8 parallel.pp=4 parallel.cp=8 parallel.ep=8"
    assert f"#{rank}: {command}" in text
    line = next(x for x in text.splitlines() if x.startswith(f"#{rank}: "))
    assert "train.seq_len=524288" in line  # the planned sequence length, not the recipe's
    assert "layouts pass the layout rules" in text


def test_cli_json():
    r = hymoe("plan", "super_120b_a12b", "--gpus", "128", "--gpu", "gb200", "--seq-len", "1048576",
              "train.global_batch=24", "parallel.tp=2", "parallel.cp=64", "parallel.ep=64",
              "--json", "--top", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["context"]["seq_len"] == 1048576 and out["context"]["gpus"] == 128
    assert out["plans"] and all((p["tp"], p["cp"], p["ep"]) == (2, 64, 64) for p in out["plans"])
    first = out["plans"][0]
    assert first["fits"] and first["memory_gb"]["total"] <= 0.9 * 186
    assert first["overrides"].startswith("parallel.tp=2 ")


def test_cli_errors_name_the_option():
    r = hymoe("plan", "tiny", "--gpus", "8", "--gpu", "h100", "--seq-len", "100000000")
    assert r.returncode == 2 and "--seq-len" in r.stderr


def test_virtual_pipeline_override_interleaves_every_candidate():
    """parallel.vpp=2 lays each candidate out with two interleaved stages per rank: the bubble
    shrinks with vpp, rank r holds virtual stages r and r + pp, and the first stage holds more
    microbatches' activations than under 1F1B (megatron's interleaved warm-up)."""
    cfg = recipe("nano_30b_a3b", "parallel.vpp=2")  # 52 layers: pp 2, 13, 26
    result = plan(cfg, 64, gpu("h100"))
    assert result.plans and result.rejected["parallel.vpp"]
    for p in result.plans[:20]:
        lay = p.layout
        assert lay.vpp == 2 and lay.pp > 1 and 52 % (2 * lay.pp) == 0
        assert p.num_micro % lay.pp == 0  # megatron's interleaved schedule refuses the rest
        assert p.time["bubble"] == pytest.approx((lay.pp - 1) / (2 * p.num_micro + lay.pp - 1))
        assert " parallel.vpp=2 " in p.overrides
    tiny = recipe("tiny")  # 6 layers: pp=2, vpp=3 puts one layer in each virtual stage
    layout = ParallelConfig(pp=2, vpp=3)
    assert [[i for i, _ in st] for st in stage_layers(tiny.model, 2, 3)] == [[0, 2, 4], [1, 3, 5]]
    table = model_table(tiny.model, tiny.precision)
    stages = all_stage_params(tiny.model, layout, 131072, table)
    total = sum(s.dense + s.expert for s in stages)  # untied, no MTP: no weight held twice
    assert total == count_params(tiny.model, 131072)["total"]
    kw = dict(seq_len=32, micro_batch=1, num_micro=8, vocab=512, precision=tiny.precision,
              recompute="none")
    flat, interleaved = (stage_memory(tiny.model, lay, 1, **kw)
                         for lay in (ParallelConfig(pp=2), layout))
    assert flat[0]["in_flight"] == 2 and interleaved[0]["in_flight"] == (2 + 2 * 2 + 1) / 3
