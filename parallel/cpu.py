"""The CPU execution layer: lets the real megatron-core 0.16.1 run on CPU over gloo.

megatron-core assumes a GPU. It calls ``torch.cuda.current_device()``, streams and events
unconditionally, creates small bookkeeping tensors with ``device="cuda"`` literals, and checks
``param.type() == 'torch.cuda.FloatTensor'`` in the optimizer and gradient clipping. None of that
is about the math: it is about where a tensor lives. This module redirects exactly those calls to
the CPU so that megatron-core's own TP / EP / PP / DP / distributed-optimizer / dist-checkpointing
code (not a re-implementation) runs in CI and on laptops.

Three redirections, each as narrow as we could make it (docs/cpu.md has the full list and why):

1. ``torch.cuda`` entry points that megatron-core calls for placement and overlap
   (``current_device``, ``Stream``, ``Event``, ``stream``, ``synchronize``, RNG state, memory
   queries) get CPU stand-ins. ``torch.cuda.is_available()`` stays False, so code that asks
   still takes its CPU branches.
2. In megatron-core's own modules only, ``torch`` is replaced by a thin proxy whose tensor
   factories map ``device="cuda"`` to the CPU. Other libraries never see the proxy.
3. ``Tensor.type()`` answers ``torch.cuda.<T>Tensor`` for a CPU tensor only when the caller is a
   megatron-core module, which is what its dtype checks compare against.

It is never active when CUDA is available: :func:`activate` returns False and changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types

import torch

_ACTIVE = False

# megatron-core modules imported up front so their ``torch`` global can be redirected; the rest of
# megatron.core that is already imported when activate() runs is redirected too.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.validation",
)


def _cpu_device(device):
    """Map any CUDA device spec to the CPU; leave everything else as given."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    return device


def _redirect_device_kw(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        # pin_memory needs an accelerator; on CPU it is meaningless.
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    return wrapper


class _TorchOnCpu(types.ModuleType):
    """``torch`` as megatron-core's modules see it: factories never allocate on 'cuda'."""

    _FACTORIES = (
        "tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint",
        "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "linspace",
    )

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _redirect_device_kw(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)


class _Stream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_DEFAULT_STREAM = _Stream()


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.device_count = lambda: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    # RNG: megatron's model-parallel RNG tracker forks "cuda" generator state; on CPU the
    # device generator is the CPU generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Seeding "the device generator" seeds the CPU one: megatron's RNG tracker seeds a region by
    # seeding the device generator and reading its state back.
    # (torch.manual_seed itself calls cuda.manual_seed_all, so that one must not recurse.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.memory_stats = lambda device=None: {}


def _patch_rng_tracker():
    """The model-parallel RNG tracker keeps per-region CUDA generator states.

    On CPU it forks the CPU generator instead; the semantics (a separately seeded stream per
    region, restored after the region) are the same.
    """
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    # The tracker warns when the CPU generator moves inside a forked region; on CPU the forked
    # generator *is* the CPU generator, so it always moves. The warning means nothing here.
    logging.getLogger(random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )
    random._get_cuda_rng_state = lambda device=-1, clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )


def _patch_moe_split_sizes():
    """The all-to-all dispatcher converts token split sizes to numpy only for CUDA tensors
    (``maybe_move_tensor_to_cpu`` checks ``is_cuda``); on CPU they stay tensors, which
    ``all_to_all_single`` rejects. Convert CPU tensors the same way."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.detach().cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_tensor_type():
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if args or kwargs or self.is_cuda:
            return original(self, *args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        name = original(self)
        if caller.startswith("megatron.core") and name.startswith("torch.") and "cuda" not in name:
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = type_


def _redirect_module_torch(proxy):
    for name in _MEGATRON_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = proxy


def fill_missing_te_names() -> None:
    """Without Transformer Engine, megatron-core 0.16.1's router GEMM still names
    ``te_general_gemm`` (a NameError, not a fallback). Define it as None so its torch branch runs.
    Needed wherever TE is absent, GPU or not."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def activate() -> bool:
    """Make megatron-core runnable on CPU. Idempotent; a no-op (returns False) with CUDA."""
    global _ACTIVE
    fill_missing_te_names()
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    _patch_torch_cuda()
    _redirect_module_torch(_TorchOnCpu())
    _patch_rng_tracker()
    _patch_moe_split_sizes()
    _patch_tensor_type()
    _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE
