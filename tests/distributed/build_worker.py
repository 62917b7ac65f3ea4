"""Build every recipe's megatron-core model in a world of one and report what was built (JSON), so
tests can hold the config-only counters (hymoe.model.counting) and the precision plan against it."""

import contextlib
import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from hymoe.parallel.setup import init_distributed, initialize_model_parallel  # noqa: E402
from hymoe.precision.apply import plan  # noqa: E402
from hymoe.train.config import validate  # noqa: E402
from hymoe.train.recipe import list_recipes, load_recipe  # noqa: E402


def main():
    out = {}
    init_distributed()
    for recipe in list_recipes():
        # One process: the recipe's own layout (long-context recipes: cp8·tp8·pp4) is a cluster's;
        # parameter counts and the precision plan do not depend on it.
        cfg = load_recipe(recipe, ["precision=nvfp4", "data.path=unused", "parallel=single"])
        validate(cfg, 1)
        initialize_model_parallel(cfg.parallel, seed=1)
        from hymoe.model.build import build_model, build_transformer_config

        from hymoe.model.counting import count_params

        vocab = 512
        # Published-size recipes (Nano: ~126 GB in fp32) are built on the meta device: same
        # modules and shapes, no memory.
        big = count_params(cfg.model, vocab)["total"] > 2e9
        with torch.device("meta") if big else contextlib.nullcontext():
            tconfig = build_transformer_config(cfg.model, params_dtype=torch.float32,
                                               perform_initialization=not big)
            model = build_model(cfg.model, tconfig, vocab_size=vocab)
        out[recipe] = {
            "vocab": vocab,
            "params": sum(p.numel() for p in model.parameters()),
            "plan": plan(model, cfg.precision, cfg.model.num_layers),
        }
        del model
    json.dump(out, open(sys.argv[1], "w"))


if __name__ == "__main__":
    main()
