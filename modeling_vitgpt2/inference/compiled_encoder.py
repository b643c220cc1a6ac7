"""The vision encoder in int8 compiled for the CPU (`quantize="int8-compiled"`): torchao's PT2E quantization with the
x86 quantizer (dynamic int8 activations, int8 weights per output channel), lowered by Inductor with freezing to
oneDNN's int8 matmuls with their bias and GELU fused in.

Why this route, among those that run an int8 ViT on a CPU (benchmarks/bench_int8_encoder.py measures them on the same
weights): the eager int8 layers of `quantization.py` (fbgemm, through the deprecated `quantize_dynamic`) quantize,
multiply and dequantize each linear layer on its own and run GELU and the residual adds as separate passes over
memory, and fell behind ONNX Runtime's dynamic int8 as the batch grew. PT2E is where `quantize_dynamic`'s
deprecation points (torchao, PyTorch's own quantization library) and its x86 quantizer is the one Inductor lowers
to fused oneDNN kernels; ONNX Runtime as the encoder's runtime would match it only by exporting and keeping a second
copy of the encoder on disk, with a dependency users do not otherwise need.

The cost is paid once per encoder, not once per process: exporting and compiling takes tens of seconds, needs a C++
compiler (Inductor writes C++) and holds the float32 encoder while it compiles, so the result is kept. It is compiled
ahead of time by AOTInductor (`torch._inductor.aoti_compile_and_package`) into a `.pt2` package in
`compiled_encoder_cache()`, named by a digest of everything the compiled code depends on (the encoder's weights,
after any adapter is merged, its image size, the torch and torchao versions, the CPU instruction set Inductor
targets). A later load with the same digest reads the package, an int8 file of about a quarter of the float32
encoder, in seconds, and never reads the float32 encoder's layers. Under `$HF_HOME` by default, so a Space whose
`HF_HOME` is on persistent storage compiles once across restarts; `VITGPT2_COMPILED_ENCODER_CACHE` names another
folder, or `off` to compile into a temporary folder each time. A package is native code that the process runs: keep
the folder as private as the rest of `$HF_HOME`. It is compiled for one image
and runs a batch image by image: the encoder is bound by arithmetic, not by reading its weights, so a larger batch
gains it little, and one compiled shape means no recompiling when the demo's or `eval.py caption`'s batch size
changes. It returns the encoder's last tokens only: encoder attention weights and hidden states need the eager model
(`quantize="int8"` or none); the decoder's cross-attention maps are unaffected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from torch import nn
from torch._inductor import config as inductor_config

from ..model.configuration_vitgpt2 import ViTGPT2Config
from ..utils.errors import UserError
from ..utils.io import atomic_path, check_writable

__all__ = [
    "CACHE_ENVIRONMENT_VARIABLE",
    "CompiledInt8VisionTrunk",
    "TokenFeatures",
    "compile_int8_vision_trunk",
    "compiled_encoder_cache",
    "int8_vision_trunk_digest",
    "load_cached_int8_vision_trunk",
]

CACHE_ENVIRONMENT_VARIABLE = "VITGPT2_COMPILED_ENCODER_CACHE"
# Part of every digest: a change to how the encoder is quantized or compiled here must not load packages made before.
_RECIPE = "pt2e-x86-inductor-dynamic-int8, aoti, one image, v1"

logger = logging.getLogger(__name__)


class TokenFeatures(nn.Module):
    """The timm ViT's token features (what the encoder returns) as its `forward`, the one method exporters trace."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(pixel_values)


class CompiledInt8VisionTrunk(nn.Module):
    """Stands in for the timm ViT inside `ViTGPT2Encoder`: `forward_features` runs the compiled int8 graph one image at
    a time. It keeps what callers read from the ViT: its patch embedding (a few MB, float32: patch and image size,
    the device and dtype of the encoder's first parameter), token width and number of tokens before the patches
    (the attention maps' layout); the compiled graph holds its own weights."""

    def __init__(self, compiled: Callable, patch_embed: nn.Module, num_features: int, num_prefix_tokens: int):
        super().__init__()
        # A plain attribute, not a submodule: the compiled graph is no layer of the model for `named_modules`,
        # `state_dict` or `to` to walk (its weights are constants inside it).
        object.__setattr__(self, "_compiled", compiled)
        self.patch_embed = patch_embed
        self.num_features = num_features
        self.num_prefix_tokens = num_prefix_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        raise UserError("the compiled int8 encoder returns its last tokens only: load the model with --quantize int8 "
                        "(or without --quantize) for the encoder's attention weights or hidden states")

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self._compiled(image.contiguous()) for image in pixel_values.split(1)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixel_values)


def compiled_encoder_cache() -> Path | None:
    """The folder of compiled encoders: `$VITGPT2_COMPILED_ENCODER_CACHE`, or `modeling_vitgpt2/compiled_encoders`
    under `$HF_HOME`; None when that variable is `off` (compile each time, keep nothing)."""
    chosen = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    if chosen is not None and chosen.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    return Path(chosen).expanduser() if chosen else Path(hub_constants.HF_HOME) / "modeling_vitgpt2" / "compiled_encoders"


def int8_vision_trunk_digest(named_tensors: Iterable[tuple[str, torch.Tensor]], image_size: tuple[int, int]) -> str:
    """The name of the compiled package for a timm ViT whose float32 state (`named_tensors`, in `state_dict` order,
    taken one at a time so that they need not all be resident) is compiled for `image_size` on this machine."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    digest = hashlib.sha256(json.dumps({
        "recipe": _RECIPE, "image_size": list(image_size), "torch": torch.__version__,
        "torchao": _import_pt2e().torchao_version, "instruction_set": str(pick_vec_isa()),
    }, sort_keys=True).encode())
    for name, tensor in named_tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def load_cached_int8_vision_trunk(digest: str, vit: nn.Module) -> CompiledInt8VisionTrunk | None:
    """The compiled encoder of `digest` from the cache, standing in for `vit` (of which only the patch embedding
    need hold weights), or None when the cache has none or it cannot be loaded (then the caller compiles anew and
    the new package replaces the unreadable one)."""
    folder = compiled_encoder_cache()
    package = folder / f"{digest}.pt2" if folder is not None else None
    if package is None or not package.is_file():
        return None
    try:
        trunk = _trunk_from_package(package, vit)
    except Exception as error:  # a truncated or foreign file; AOTInductor raises RuntimeError or zip errors
        logger.warning("Cannot load the compiled encoder %s (%s: %s); compiling it again", package,
                       type(error).__name__, error)
        return None
    logger.info("Loaded the compiled int8 vision encoder from %s", package)
    return trunk


def _trunk_from_package(package: Path, vit: nn.Module) -> CompiledInt8VisionTrunk:
    with _quiet_compiling():
        runner = torch._inductor.aoti_load_package(str(package))
    return CompiledInt8VisionTrunk(runner, vit.patch_embed, vit.num_features, vit.num_prefix_tokens)


def compile_int8_vision_trunk(encoder_config: ViTGPT2Config, vit: nn.Module, digest: str) -> CompiledInt8VisionTrunk:
    """`vit` (the float32 timm ViT that `ViTGPT2Encoder` builds from `encoder_config`, left unchanged) quantized to
    int8 and compiled for one image, kept in the cache as `digest` (its `int8_vision_trunk_digest`); the compiling
    happens here, with a log line, so that the first caption does not wait for it.

    It runs in a child process, given the ViT's weights in a temporary safetensors file: Inductor keeps its
    prepacked copies of the int8 weights referenced after an ahead-of-time compile (twice the int8 encoder, which
    this process would hold for as long as it runs), and a compiler that fails or is killed for memory then ends
    the child, not the server that asked for it.
    """
    _check_compiler()
    _import_pt2e()
    started = time.perf_counter()
    logger.warning("Compiling the int8 vision encoder (once for these weights on this machine; a ViT-L takes about a "
                   "minute)...")
    with tempfile.TemporaryDirectory(prefix="vitgpt2-encoder-") as scratch, _package_path(digest) as package:
        weights, config = Path(scratch) / "vit.safetensors", Path(scratch) / "config.json"
        save_file({name: tensor.contiguous() for name, tensor in vit.state_dict().items()}, weights)
        encoder_config.to_json_file(config)
        # The child imports this package from wherever this process did (a checkout, a wheel, an editable install).
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
        finished = subprocess.run([sys.executable, "-m", __name__, str(config), str(weights), str(package)],
                                  env=environment, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            reason = finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else (
                f"exit status {finished.returncode}")
            raise RuntimeError(f"compiling the int8 vision encoder failed ({reason}); use --quantize int8, which "
                               f"does not compile. The compiler's output:\n{finished.stderr[-4000:]}")
        trunk = _trunk_from_package(package, vit)
    logger.warning("Compiled the int8 vision encoder in %.0f s", time.perf_counter() - started)
    return trunk


def _compile_package(vit: nn.Module, package: Path) -> None:
    """Writes `vit` quantized to int8 and compiled for one image as the AOTInductor package `package`."""
    quantize_pt2e = _import_pt2e()
    example = torch.randn(1, 3, *vit.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _quiet_compiling():
        exported = torch.export.export(TokenFeatures(vit).eval(), (example,)).module()
        quantizer = quantize_pt2e.X86InductorQuantizer()
        quantizer.set_global(quantize_pt2e.get_default_x86_inductor_quantization_config(is_dynamic=True))
        prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
        prepared(example)  # dynamic quantization observes activations at run time: this only completes the graph
        converted = quantize_pt2e.convert_pt2e(prepared)
        del exported, prepared
        _forget_cached_modules()
        _drop_unused_weights(converted)
        program = torch.export.export(converted, (example,))
        del converted
        # Freezing folds the int8 weights into the compiled code as constants, which is what lets Inductor prepack
        # them for oneDNN and fuse the quantize/dequantize steps. Set as global config, not as per-call options:
        # Inductor decides whether to register its int8 weight-prepacking passes from the global setting.
        with inductor_config.patch(freezing=True):
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))


def _compile_in_child(config_file: str, weights_file: str, package: str) -> None:
    """The child process of `compile_int8_vision_trunk`."""
    from ..model.modeling_vitgpt2 import ViTGPT2Encoder

    vit = ViTGPT2Encoder(ViTGPT2Config.from_json_file(config_file)).model
    vit.load_state_dict(load_file(weights_file))
    _compile_package(vit.eval(), Path(package))


@contextmanager
def _package_path(digest: str) -> Iterator[Path]:
    """Where to write the package of `digest`: a temporary file of its own in the cache folder (`atomic_path`), moved
    into place under its final name only once it is complete (a second process compiling the same encoder at the
    same time writes its own and the last move wins; a crash leaves no half-written package under the final name); a
    temporary folder when the cache is off or cannot be written."""
    folder = compiled_encoder_cache()
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            check_writable(folder / f"{digest}.pt2")
        except OSError as error:
            logger.warning("Cannot write to the compiled-encoder cache %s (%s); the compiled encoder is not kept. Set "
                           "%s to a writable folder, or to off", folder, error, CACHE_ENVIRONMENT_VARIABLE)
        else:
            with atomic_path(folder / f"{digest}.pt2") as partial:
                yield partial
            return
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch) / "encoder.pt2"


def _forget_cached_modules() -> None:
    """Empties the unbounded `lru_cache`s through which PT2E looks up a module's device: they key on the module, so
    they keep the exported float32 graph module (the whole float32 encoder) alive for as long as the process runs.
    Only a cache is cleared; a later call fills it again."""
    from torch.ao.quantization.fx import utils as fx_utils
    from torchao import utils as torchao_utils

    for cached in (getattr(torchao_utils, "_assert_and_get_unique_device", None),
                   getattr(fx_utils, "assert_and_get_unique_device", None)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _drop_unused_weights(graph_module: torch.fx.GraphModule) -> None:
    """Deletes the float32 weights the quantized graph no longer reads. Converting replaces each weight the graph
    read by an int8 constant, but the exported module still holds the float32 original as an attribute; freezing
    discards only what the graph reads, so these would keep the whole float32 encoder resident."""
    read = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in read:
            owner, _, attribute = name.rpartition(".")
            delattr(graph_module.get_submodule(owner), attribute)


class _PT2E:
    """torchao's PT2E entry points, imported on first use: torchao is an optional dependency."""

    def __init__(self):
        import torchao
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        self.torchao_version = torchao.__version__
        self.prepare_pt2e, self.convert_pt2e = prepare_pt2e, convert_pt2e
        self.X86InductorQuantizer = X86InductorQuantizer
        self.get_default_x86_inductor_quantization_config = get_default_x86_inductor_quantization_config


def _import_pt2e() -> _PT2E:
    try:
        return _PT2E()
    except ImportError as error:
        raise UserError("--quantize int8-compiled needs torchao: pip install 'modeling-vitgpt2[int8-compiled]' "
                        f"({error}); or use --quantize int8, which needs nothing more") from error


@contextmanager
def _quiet_compiling() -> Iterator[None]:
    # Inductor's int8 lowering warns about its own tensor copies, and its C++ builder that it found no CUDA: notices
    # for PyTorch's developers, repeated on every load, that users can do nothing about.
    builder_logger = logging.getLogger("torch.utils.cpp_extension")
    level = builder_logger.level
    builder_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            yield
    finally:
        builder_logger.setLevel(level)


def _check_compiler() -> None:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except Exception as error:  # Inductor raises its own types for a missing or unusable compiler
        compiler, reason = None, f"{type(error).__name__}: {error}"
    else:
        reason = f"{compiler} is not on PATH"
    if compiler is None or shutil.which(compiler) is None:
        raise UserError(f"--quantize int8-compiled compiles the encoder with a C++ compiler ({reason}): install "
                        "one (apt-get install g++) or use --quantize int8")


if __name__ == "__main__":
    _compile_in_child(*sys.argv[1:])
