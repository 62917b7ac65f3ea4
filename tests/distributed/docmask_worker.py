"""Build the tiny hybrid (Mamba, attention, MoE, MLP) in a world of one and measure how much the
per-token loss of document B changes when document A, packed before it in the same row, changes:
with seq_idx (document masks) and without. Prints JSON."""

import json
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from hymoe.model.build import build_model, build_transformer_config  # noqa: E402
from hymoe.model.config import ModelConfig  # noqa: E402
from hymoe.parallel.layout import ParallelConfig  # noqa: E402
from hymoe.parallel.setup import init_distributed, initialize_model_parallel  # noqa: E402


def main():
    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=3)
    cfg = ModelConfig(pattern="M*EM-*", mamba_chunk_size=8)
    model = build_model(cfg, build_transformer_config(cfg, params_dtype=torch.float32), vocab_size=128)
    model.eval()
    g = torch.Generator().manual_seed(0)
    s, cut = 40, 17  # document A = tokens [0, 17), document B = [17, 40); 17 is inside a chunk
    tokens = torch.randint(1, 128, (2, s + 1), generator=g)
    seq_idx = (torch.arange(s) >= cut).int().expand(2, s).contiguous()
    other = tokens.clone()
    other[:, :cut] = torch.randint(1, 128, (2, cut), generator=g)  # a different document A
    out = {}
    with torch.no_grad():
        for name, idx in (("masked", seq_idx), ("unmasked", None)):
            a = model(tokens[:, :-1], None, None, labels=tokens[:, 1:], seq_idx=idx)
            b = model(other[:, :-1], None, None, labels=other[:, 1:], seq_idx=idx)
            out[name] = float((a[:, cut:] - b[:, cut:]).abs().max())
            out[name + "_docA"] = float((a[:, :cut] - b[:, :cut]).abs().max())
    # Multi-Token Prediction: the depth losses counted for document B (loss mask on B's positions)
    # are the same whatever document A holds — MTP never predicts across the boundary from A.
    cfg = ModelConfig(pattern="M*EM-*/*-/*-", mamba_chunk_size=8)
    model = build_model(cfg, build_transformer_config(cfg, params_dtype=torch.float32), vocab_size=128)
    model.eval()
    on_b = (torch.arange(s) >= cut).float().expand(2, s)
    with torch.no_grad():
        for name, idx in (("mtp_masked", seq_idx), ("mtp_unmasked", None)):
            reports = []
            for t in (tokens, other):
                model.mtp_report.zero_()
                model(t[:, :-1], None, None, labels=t[:, 1:], loss_mask=on_b, seq_idx=idx)
                reports.append(model.mtp_report.clone())
            out[name] = float((reports[0] - reports[1]).abs().max())
            out[name + "_tokens"] = reports[0][:, 1].tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
