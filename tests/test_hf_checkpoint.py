"""A dist-checkpoint saved under TP=2 × EP=2 (LatentMoE hybrid with 2 MTP depths, 2 gloo
processes) converts to the HF nemotron_h format (hymoe.model.hf.checkpoint_to_hf: megatron-core
reshards it onto one process): transformers' NemotronHForCausalLM then gives the logits the
parallel model computed, and the MTP weights (mtp.*) read back by from_hf give its MTP losses."""

import pytest
import torch

from helpers import REPO, torchrun
from hymoe.model import hf

WORKER = REPO / "tests" / "distributed" / "hf_convert_worker.py"


@pytest.mark.distributed
@pytest.mark.slow  # ~25 s of torchrun start-up and imports on 2 cores; ~50 s on a loaded machine
def test_tp2_ep2_checkpoint_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    torchrun(WORKER, 2, str(tmp_path))
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_convert_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)  # for MODEL and VOCAB only (main() is not run)
    out = hf.checkpoint_to_hf(tmp_path / "ckpt", worker.MODEL, worker.VOCAB, tmp_path / "hf")
    ref = torch.load(tmp_path / "logits.pt")
    model = transformers.NemotronHForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ref["tokens"], use_cache=False).logits
    assert (logits - ref["logits"]).abs().max().item() <= 1e-4
    assert ref["logits"].abs().max() > 0.1
    assert hf.read_hf_state(out).keys() >= {"mtp.layers.3.final_layernorm.weight",
                                            "mtp.layers.2.eh_proj.weight"}
    back = hf.from_hf(out)
    with torch.no_grad():
        back.eval()(ref["tokens"], None, None, labels=ref["labels"])
    assert torch.allclose(back.mtp_report, ref["mtp_report"], rtol=1e-5)
    assert ref["mtp_report"][:, 1].tolist() == [2 * 39, 2 * 38]


def test_conversion_holds_a_layer_not_the_model(tmp_path):
    """checkpoint_to_hf reads the checkpoint one layer at a time and writes each output shard as it
    fills: its peak memory stays a fraction of the model, where loading the whole model first takes
    more than the model (benchmarks/convert.py, each conversion in a fresh process, same run). Both
    write the same tensors."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_bench", REPO / "benchmarks" / "convert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(tmp_path, layers=16, hidden=384, shard_mb=8)  # a 106 MiB model
    assert r["identical"]
    assert r["streaming"]["peak_bytes"] < 0.5 * r["model_bytes"], r  # measured: 0.30
    assert r["whole"]["peak_bytes"] > 1.0 * r["model_bytes"], r  # measured: 1.22
