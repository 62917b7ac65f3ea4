"""Training from a Hugging Face `nemotron_h` folder directly (`checkpoint.init_weights=HF_DIR`,
hymoe.model.hf_slices): each rank reads only its shards from the safetensors files. In one process
the weights read back bit for bit (LatentMoE, experts, MTP, routing bias); through `hymoe train`,
one process and TP2·PP2·EP2 on 4 processes take the same first step from the same folder; a folder
of another architecture, or asking it for optimizer state, stops at start-up naming the key."""

import json

import pytest
import torch
from helpers import hymoe, hymoe_torchrun
from test_hf_interop import CFG, VOCAB, perturb

from hymoe.model import hf
from hymoe.model.config import ModelConfig
from hymoe.model.hf_slices import load_hf_weights
from hymoe.train.recipe import load_recipe

# Tied embeddings: at pp2 the last stage's output weight is read from the HF embedding.
FAST = ["optim.warmup_steps=1", "logging.progress=false", "logging.wandb=disabled",
        "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.steps=1",
        "checkpoint.save_final=false", "model.untie_embeddings_and_output_weights=false"]


@pytest.mark.parametrize("cfg", [
    CFG,  # LatentMoE, 4 Mamba groups, 8 experts
    ModelConfig(pattern="M*E-/*E/*E", hidden_size=64, num_attention_heads=4, num_query_groups=2,
                head_dim=16, ffn_hidden_size=96, mamba_num_heads=8, mamba_head_dim=16,
                mamba_state_dim=16, mamba_num_groups=2, num_experts=4, moe_router_topk=2,
                moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48,
                mtp_shared_layer=True, untie_embeddings_and_output_weights=False),
], ids=["latent_moe", "tied_mtp"])
def test_weights_read_back_bit_for_bit(cfg, tmp_path):
    model = hf.build_single_process(cfg, VOCAB, seed=3)
    perturb(model, "expert_bias")
    out = hf.to_hf(model, tmp_path / "hf", max_shard_bytes=50_000)  # several files
    fresh = hf.build_single_process(cfg, VOCAB, seed=11)
    missing, unexpected = fresh.load_state_dict(load_hf_weights(fresh.sharded_state_dict(), out, cfg),
                                                strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    want, got = model.state_dict(), fresh.state_dict()
    for k, v in want.items():
        if not k.endswith("_extra_state"):
            assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def tiny_hf(demo_data, tmp_path_factory):
    """The tiny recipe's model (tied embeddings), randomly initialised, as an fp32 HF folder with
    the demo vocabulary."""
    cfg = load_recipe("tiny", ["model.untie_embeddings_and_output_weights=false"]).model
    vocab = json.loads((demo_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    model = hf.build_single_process(cfg, vocab, seed=5)
    perturb(model, "expert_bias")
    return hf.to_hf(model, tmp_path_factory.mktemp("hf") / "tiny")


def first_step(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.distributed
def test_any_layout_takes_the_same_first_step(demo_data, tiny_hf, tmp_path):
    args = ["train", "tiny", *FAST, f"checkpoint.init_weights={tiny_hf}", f"data.path={demo_data}"]
    r = hymoe(*args, f"run.dir={tmp_path / 'one'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised the model weights from {tiny_hf}" in r.stdout
    assert json.loads((tmp_path / "one" / "stage.json").read_text())["against"].endswith("config.json (model keys)")
    r = hymoe_torchrun(4, *args, "parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
                       f"run.dir={tmp_path / 'four'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = first_step(tmp_path / "one"), first_step(tmp_path / "four")
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # The folder's weights, not the run's own initialisation: the loss of the folder's model
    # (read by from_hf, in one process) on the first global batch.
    from hymoe.data.loader import PackedStream

    model = hf.from_hf(tiny_hf).eval()
    assert not model.hymoe_model_config.untie_embeddings_and_output_weights
    stream = PackedStream(demo_data, 32, 4, seed=load_recipe("tiny", []).train.seed)
    batch = next(stream)
    stream.close()
    with torch.no_grad():
        loss = model(batch["tokens"], None, None, labels=batch["labels"])
    assert a["loss"] == pytest.approx(float((loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()),
                                      rel=1e-5)


@pytest.mark.parametrize("extra, key", [
    (["model.num_experts=8"], "model.num_experts"),
    (["checkpoint.init_optimizer=true"], "checkpoint.init_optimizer"),
])
def test_mismatch_stops_at_start(demo_data, tiny_hf, tmp_path, extra, key):
    r = hymoe("train", "tiny", *FAST, *extra, f"checkpoint.init_weights={tiny_hf}",
              f"data.path={demo_data}", f"run.dir={tmp_path / 'run'}")
    assert r.returncode != 0
    assert key in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
