"""Backend selection (auto | emulated | te) and the megatron-core kwargs of the TE backend, on CPU:
the GPU's capability and Transformer Engine's import are monkeypatched."""

import os
import sys
import types

import pytest
from hymoe.model.config import ModelConfig
from hymoe.model.counting import linear_layer_names
from hymoe.precision import backend
from hymoe.precision.config import PrecisionConfig, PrecisionConfigError
from hymoe.precision.policy import decide, layer_index


@pytest.fixture(autouse=True)
def _clean_env():
    # select_backend writes NVTE_NVFP4_* into os.environ: start each test without them and put
    # back whatever was there before.
    saved = {env: os.environ.pop(env, None) for env in backend.TE_RECIPE_ENV.values()}
    yield
    for env, value in saved.items():
        os.environ.pop(env, None)
        if value is not None:
            os.environ[env] = value


def _gpu(monkeypatch, cap, name="NVIDIA TEST"):
    monkeypatch.setattr(backend, "_cuda_device", lambda: None if cap is None else (name, cap))


def _te(monkeypatch, version=None, error=None):
    def fake():
        if error is not None:
            raise error
        return types.SimpleNamespace(__version__=version)

    monkeypatch.setattr(backend, "_import_te", fake)


def test_this_machine_auto_is_emulated_and_te_is_refused():
    # The CPU machines: no CUDA, and TE has no CPU build.
    choice = backend.select_backend(PrecisionConfig(recipe="nvfp4", backend="auto"))
    assert choice.backend == "emulated" and "no CUDA device" in choice.reason
    with pytest.raises(PrecisionConfigError, match="backend=te.*no CUDA device"):
        backend.select_backend(PrecisionConfig(recipe="nvfp4", backend="te"))


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp8"])
def test_hopper_is_emulated_and_te_names_the_capability(monkeypatch, recipe):
    _gpu(monkeypatch, (9, 0), "NVIDIA H200")
    _te(monkeypatch, "2.20.2")
    choice = backend.select_backend(PrecisionConfig(recipe=recipe, backend="auto"))
    assert choice.backend == "emulated"
    assert "NVIDIA H200 (compute capability 9.0)" in choice.reason and "10.0" in choice.reason
    with pytest.raises(PrecisionConfigError, match=r"compute capability 9\.0"):
        backend.select_backend(PrecisionConfig(recipe=recipe, backend="te"))


@pytest.mark.parametrize(
    "error", [RuntimeError("cudnn shared object not found"), ImportError("No module named te")]
)
def test_blackwell_without_an_importable_te(monkeypatch, error):
    _gpu(monkeypatch, (10, 0), "NVIDIA B200")
    _te(monkeypatch, error=error)
    choice = backend.select_backend(PrecisionConfig(recipe="nvfp4", backend="auto"))
    assert choice.backend == "emulated"
    assert type(error).__name__ in choice.reason and str(error) in choice.reason
    with pytest.raises(PrecisionConfigError, match="not importable"):
        backend.select_backend(PrecisionConfig(recipe="nvfp4", backend="te"))


@pytest.mark.parametrize(
    "version,native",
    [("2.6.0", False), ("2.7.0.dev0", True), ("2.7.0", True), ("2.20.2", True), ("garbage", False)],
)
def test_te_version_threshold(monkeypatch, version, native):
    _gpu(monkeypatch, (10, 3), "NVIDIA B300")
    _te(monkeypatch, version)
    choice = backend.select_backend(PrecisionConfig(recipe="nvfp4", backend="auto"))
    assert choice.backend == ("te" if native else "emulated")
    assert version in choice.reason and "\n" not in choice.reason
    if native:
        assert choice.reason.startswith("auto -> te: NVIDIA B300 (compute capability 10.3)")
        assert backend.select_backend(PrecisionConfig(recipe="nvfp4", backend="te")).backend == "te"


def test_explicit_emulated_and_high_precision_recipes(monkeypatch):
    _gpu(monkeypatch, (10, 0))
    _te(monkeypatch, "2.20.2")
    assert backend.select_backend(PrecisionConfig(recipe="nvfp4", backend="emulated")).backend == (
        "emulated"
    )
    # bf16 quantizes nothing: auto never asks for TE ...
    choice = backend.select_backend(PrecisionConfig(recipe="bf16", backend="auto"))
    assert choice.backend == "emulated" and "quantizes no GEMM" in choice.reason
    # ... but an explicit te still has to be able to run.
    _gpu(monkeypatch, None)
    with pytest.raises(PrecisionConfigError, match="no CUDA device"):
        backend.select_backend(PrecisionConfig(recipe="bf16", backend="te"))


def test_recipe_switches_reach_te_through_its_environment(monkeypatch):
    _gpu(monkeypatch, None)
    cfg = PrecisionConfig(recipe="nvfp4", disable_rht=True)
    assert backend.te_environment(cfg) == {
        "NVTE_NVFP4_DISABLE_RHT": "1",
        "NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING": "0",
        "NVTE_NVFP4_DISABLE_2D_QUANTIZATION": "0",
    }
    backend.select_backend(cfg)
    assert os.environ["NVTE_NVFP4_DISABLE_RHT"] == "1"
    # A conflicting value set by the user is an error naming both.
    monkeypatch.setenv("NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING", "1")
    with pytest.raises(PrecisionConfigError, match="disable_stochastic_rounding.*NVTE_NVFP4"):
        backend.select_backend(cfg)
    monkeypatch.delenv("NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING")
    # TE imported earlier with other defaults: the switch can no longer take effect.
    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    recipe_mod.NVFP4BlockScaling = type(
        "NVFP4BlockScaling",
        (),
        {"disable_rht": False, "disable_stochastic_rounding": False, "disable_2d_quantization": False},
    )
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe_mod)
    with pytest.raises(PrecisionConfigError, match="imported before"):
        backend.select_backend(cfg)
    del os.environ["NVTE_NVFP4_DISABLE_RHT"]  # a fresh process: the recipe defaults agree, fine
    backend.select_backend(PrecisionConfig(recipe="nvfp4"))


def test_te_precision_kwargs_are_megatron_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    kw = backend.te_precision_kwargs(PrecisionConfig(recipe="nvfp4"))
    assert kw == {"fp4": "e2m1", "fp4_recipe": "nvfp4"}
    c = TransformerConfig(**base, **kw)
    assert (c.fp4, c.fp4_recipe, c.fp8) == ("e2m1", "nvfp4", None)
    kw = backend.te_precision_kwargs(PrecisionConfig(recipe="mxfp8"))
    assert kw == {"fp8": "e4m3", "fp8_recipe": "mxfp8"}
    assert TransformerConfig(**base, **kw).fp8_recipe == "mxfp8"
    assert backend.te_precision_kwargs(PrecisionConfig(recipe="bf16")) == {}
    # fp4 with fp8 is rejected up front, with the field names.
    with pytest.raises(PrecisionConfigError, match="fp4='e2m1' and fp8='hybrid'"):
        backend.te_precision_kwargs(PrecisionConfig(recipe="nvfp4"), extra={"fp8": "hybrid"})
    with pytest.raises(PrecisionConfigError, match="cannot be combined"):
        backend.check_fp4_fp8({"fp4": "e2m1", "fp8": "e4m3"})
    backend.check_fp4_fp8({"fp4": "e2m1", "fp8": None})


def test_per_module_quant_recipe_follows_the_policy():
    from megatron.core.extensions.transformer_engine import TEQuantizationParams
    from megatron.core.quantization.utils import get_quant_config_or_none

    model = ModelConfig(pattern="M*E-M*E-MM", num_experts=4, moe_router_topk=2)
    cfg = PrecisionConfig(recipe="nvfp4")
    rows = [
        (n, decide(n, layer_index(n), model.num_layers, cfg)[0]) for n in linear_layer_names(model)
    ]
    assert {f for _, f in rows} == {"nvfp4", "mxfp8", "bf16"}
    recipe = backend.te_precision_kwargs(cfg, layer_formats=rows)["quant_recipe"]
    want = {
        "nvfp4": ("nvfp4", None),
        "mxfp8": (None, "mxfp8"),
        "bf16": (None, None),
    }
    for name, fmt in rows + [("embedding.word_embeddings", "bf16")]:
        qc = get_quant_config_or_none(name, recipe)
        assert qc.config_key == fmt, name
        r = TEQuantizationParams.parse_from_config(qc).training_recipe
        assert (r.fp4_quantization_recipe, r.fp8_quantization_recipe) == want[fmt], name
        # Enables quantization where the hybrid stack opened no FP4 context (MambaStack in 0.16.1).
        assert r.override_nonquantized_autocast and r.override_quantized_autocast
