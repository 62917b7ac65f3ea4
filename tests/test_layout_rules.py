"""Layout rules that follow megatron-core 0.16.1 exactly: KV groups against TP, Mamba heads and
groups against TP·CP, virtual pipeline stages against the layers, the '|' marks and the
microbatches; the published Nemotron 3 layouts pass them; a model with fewer KV groups than TP
ranks trains as it does without TP."""

import inspect
import json
from pathlib import Path

import pytest
from helpers import hymoe, torchrun
from hymoe.parallel.layout import LayoutError, ModelDims, ParallelConfig
from hymoe.train.config import model_dims
from hymoe.train.recipe import load_recipe

WORKERS = Path(__file__).parent / "distributed"


def dims(**kw) -> ModelDims:
    return ModelDims(**{"num_layers": 4, **kw})


def refused(layout: ParallelConfig, world: int, d: ModelDims) -> str:
    with pytest.raises(LayoutError) as e:
        layout.validate(world, d)
    return str(e.value)


def test_fewer_kv_groups_than_tp_ranks_is_a_layout():
    # Nano: 32 heads, 2 KV groups, published at tp=8; megatron-core gives each group to 4 ranks.
    assert ParallelConfig(tp=8).validate(8, dims(attention_heads=32, query_groups=2)) == 1
    assert ParallelConfig(tp=4).validate(4, dims(attention_heads=4, query_groups=4)) == 1


def test_kv_groups_and_tp_must_divide_one_another():
    msg = refused(ParallelConfig(tp=4), 4, dims(attention_heads=12, query_groups=6))
    assert msg.startswith("parallel.tp:") and "num_query_groups=6" in msg and "divide" in msg


def test_tp_must_still_divide_the_heads():
    msg = refused(ParallelConfig(tp=8), 8, dims(attention_heads=12, query_groups=1))
    assert msg.startswith("parallel.tp:") and "num_attention_heads=12" in msg


def test_cp_must_divide_the_mamba_heads_per_tp_rank():
    d = dims(mamba_heads=64, mamba_groups=8)  # Nano's Mamba-2
    assert ParallelConfig(tp=8, cp=8).validate(64, d) == 1  # 8 heads per TP rank, 1 per CP rank
    msg = refused(ParallelConfig(tp=8, cp=16), 128, d)
    assert msg.startswith("parallel.cp:") and "64/8 = 8" in msg


def test_cp_and_the_mamba_groups_per_tp_rank_must_divide_one_another():
    # Fewer groups than CP ranks: megatron-core repeats them (Super: 4 groups per TP rank at tp=2,
    # shared by cp=64 ranks).
    assert ParallelConfig(tp=2, cp=64).validate(128, dims(mamba_heads=128, mamba_groups=8)) == 1
    msg = refused(ParallelConfig(cp=4), 4, dims(mamba_heads=48, mamba_groups=6))
    assert msg.startswith("parallel.cp:") and "mamba_num_groups" in msg


@pytest.mark.parametrize("recipe, world, seq_len, layout", [
    ("nano_30b_a3b", 256, 524288, ParallelConfig(tp=8, cp=8, ep=8, pp=4)),
    ("super_120b_a12b", 128, 1048576, ParallelConfig(tp=2, cp=64, ep=64)),
    ("super_120b_a12b", 1024, 8192, ParallelConfig(tp=4, ep=8)),
])
def test_published_layouts_pass(recipe, world, seq_len, layout):
    model = load_recipe(recipe, []).model
    dp = layout.validate(world, model_dims(model, seq_len))
    assert dp == world // (layout.tp * layout.cp * layout.pp)


def test_hybrid_stack_places_virtual_stages_itself():
    """megatron-core 0.16.1's MambaStack asserts virtual_pipeline_model_parallel_size is None when
    it splits layers over stages; hymoe's HybridStack replaces that split, placing chunk v of rank r
    at virtual stage v·pp + r as megatron's transformer layers number themselves."""
    import torch
    from megatron.core.ssm.mamba_block import MambaStack
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from hymoe.model.build import HybridStack, build_transformer_config
    from hymoe.model.config import ModelConfig
    from hymoe.parallel.layout import chunk_layers

    src = inspect.getsource(MambaStack._select_layers_for_pipeline_parallel)
    assert "virtual_pipeline_model_parallel_size is None" in src
    assert "_select_layers_for_pipeline_parallel" in vars(HybridStack)
    # pp=2, vpp=3, 12 layers: rank 0 holds layers 0-1, 4-5, 8-9; rank 1 holds 2-3, 6-7, 10-11.
    config = build_transformer_config(ModelConfig(pattern="M*" * 6), pipeline_model_parallel_size=2,
                                      virtual_pipeline_model_parallel_size=3,
                                      pipeline_dtype=torch.float32)
    for rank in range(2):
        for v in range(3):
            layers = chunk_layers(12, 2, 3, rank, v)
            assert layers == range(4 * v + 2 * rank, 4 * v + 2 * rank + 2)
            assert get_transformer_layer_offset(config, vp_stage=v, pp_rank=rank) == layers.start


@pytest.mark.parametrize("layout, world, d, text", [
    (ParallelConfig(vpp=2), 1, dims(), "needs pp > 1"),
    (ParallelConfig(pp=2, vpp=3), 2, dims(), "do not divide the 4 layers"),
    (ParallelConfig(pp=2, vpp=2), 2, dims(num_layers=4, stages=(2, 2)), "4 virtual stages"),
    (ParallelConfig(pp=2, vpp=0), 2, dims(), "positive integer"),
])
def test_bad_virtual_pipeline_layouts_are_refused(layout, world, d, text):
    msg = refused(layout, world, d)
    assert msg.startswith("parallel.vpp:") and text in msg and "\n" not in msg, msg


def test_virtual_pipeline_needs_microbatches_in_multiples_of_pp():
    assert ParallelConfig(pp=2, vpp=2).validate(2, dims()) == 1
    ParallelConfig(pp=2, vpp=2).check_microbatches(4)
    with pytest.raises(LayoutError, match=r"^parallel\.vpp: .* = 3, to be a multiple of pp=2$"):
        ParallelConfig(pp=2, vpp=2).check_microbatches(3)


def test_cli_refuses_a_bad_virtual_pipeline_in_one_line():
    # tiny has 6 layers: pp·vpp = 4 virtual stages cannot hold them equally.
    r = hymoe("train", "tiny", "parallel.pp=2", "parallel.vpp=2", "--print-config",
              env={"WORLD_SIZE": "2"})
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hymoe: error: parallel.vpp:"), r.stderr


def test_cli_refuses_kv_groups_that_do_not_divide_tp():
    r = hymoe("train", "tiny", "model.num_attention_heads=12", "model.num_query_groups=6",
              "parallel.tp=4", "--print-config")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hymoe: error: parallel.tp:"), r.stderr
    assert "num_query_groups=6" in lines[0]


def test_cli_accepts_fewer_kv_groups_than_tp_ranks():
    r = hymoe("train", "tiny", "model.num_query_groups=1", "parallel.tp=2", "--print-config",
              env={"WORLD_SIZE": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "num_query_groups: 1" in r.stdout


def test_fewer_kv_groups_than_tp_ranks_trains_like_dp(tmp_path):
    torchrun(WORKERS / "gqa_worker.py", 2, str(tmp_path))
    runs = json.loads((tmp_path / "gqa.json").read_text())
    for a, b in zip(runs["dp2"], runs["tp2"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("layout, d, field, text", [
    (ParallelConfig(tp=4), dims(ffn_hidden=130), "parallel.tp:", "model.ffn_hidden_size=130"),
    (ParallelConfig(tp=2, etp=2), dims(num_experts=4, moe_ffn_hidden=63), "parallel.etp:",
     "model.moe_ffn_hidden_size=63"),
    (ParallelConfig(tp=4), dims(num_experts=4, moe_ffn_hidden=64, shared_expert_hidden=66),
     "parallel.tp:", "model.moe_shared_expert_intermediate_size=66"),
])
def test_mlp_widths_split_over_their_tensor_parallel_ranks(layout, d, field, text):
    msg = refused(layout, layout.tp, d)
    assert msg.startswith(field) and text in msg, msg


def test_mlp_width_rules_come_from_the_recipe():
    d = model_dims(load_recipe("tiny", ["model.ffn_hidden_size=129"]).model)
    assert (d.ffn_hidden, d.moe_ffn_hidden, d.shared_expert_hidden) == (129, 64, 64)
    assert "ffn_hidden_size=129" in refused(ParallelConfig(tp=2), 2, d)
