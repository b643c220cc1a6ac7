"""LoRA training speed of ViTGPT2ForConditionalGeneration ("ours") against transformers' VisionEncoderDecoderModel
("peer"), with and without the encoder-feature cache.

Both start from the same random weights: a ViTModel + GPT-2 (cross-attention in every block)
VisionEncoderDecoderModel is built and converted with `convert_vision_encoder_decoder`,
dropout off everywhere. Both train the same LoRA set-up: rank 4 on the decoder's self-attention `c_attn`/`c_proj`
(`fan_in_fan_out`), cross-attention and its LayerNorm fully trained (`modules_to_save`, plus the peer's
`enc_to_dec_proj` where the widths differ), encoder frozen; ours through `apply_peft(model, "lora", ...)`. They see
the same random images and random-token captions in the same order, with the same batch size, AdamW settings and
seed, in a plain training loop, so their per-step losses must agree. Three stacks run:

- `peer`: VisionEncoderDecoderModel + peft, from pixels (the encoder runs every step);
- `ours`: our model + `apply_peft`, from pixels;
- `ours_cached`: our model + `apply_peft`, from `EncoderFeatureCache` features (`train.py --cache_encoder_features`):
  a timed pre-pass encodes every image once and pages the idle encoder out to a memory-mapped file
  (`page_out_encoder`, as `train.py` does), then every epoch reads float16 features.

Each stack lives in its own process, so that its peak memory is its own, and the parent has them train step by step
in turn (peer, ours, ours_cached, peer, ...), so that a change in the machine's load hits all three alike; an epoch's
time is the sum of its steps' times.

    python benchmarks/bench_train.py --size tiny --threads 1          # seconds; what tests/test_bench_train.py runs
    python benchmarks/bench_train.py --size small --profile --output benchmarks/results/train_cpu_fp32_small.json
    python benchmarks/bench_train.py --size real --output benchmarks/results/train_cpu_fp32_real.json

See benchmarks/README.md for the FLOP formula and how to read the output.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from common import (
    ModelShape,
    build_models,
    describe_machine,
    matmul_gflops,
    print_profile,
    profiler_activities,
    skipped_without_cuda,
    synchronize,
    top_ops,
    write_report,
)
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch.profiler import profile
from transformers import VisionEncoderDecoderModel

from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.data.feature_cache import EncoderFeatureCache, page_out_encoder
from modeling_vitgpt2.training.peft_methods import PeftArguments, apply_peft, count_parameters
from modeling_vitgpt2.training.tokenizer import train_caption_tokenizer


@dataclass(frozen=True)
class BenchSize(ModelShape):
    num_images: int
    batch_size: int
    epochs: int


SIZES = {
    # tiny and small: encoder as wide as decoder, so the peer has no `enc_to_dec_proj` and both stacks train exactly
    # the same parameters (the loss curves agree to float rounding).
    "tiny": BenchSize(
        image_size=28, patch_size=14, encoder_width=32, encoder_layers=2, encoder_heads=2, encoder_mlp_width=64,
        decoder_width=32, decoder_layers=2, decoder_heads=2, vocab_size=300, num_images=16, batch_size=4, epochs=2,
    ),
    "small": BenchSize(
        image_size=224, patch_size=16, encoder_width=256, encoder_layers=6, encoder_heads=4, encoder_mlp_width=1024,
        decoder_width=256, decoder_layers=4, decoder_heads=4, vocab_size=8192, num_images=128, batch_size=8, epochs=3,
    ),
    # ViT-L/14 at 224 px + GPT-2 small. The peer trains `enc_to_dec_proj` (1024 -> 768) and then each layer's
    # key/value projection, where ours trains the two folded into one matrix: the same function at step 0, but a
    # different parametrisation, so the loss curves drift apart slightly after the first step.
    "real": BenchSize(
        image_size=224, patch_size=14, encoder_width=1024, encoder_layers=24, encoder_heads=16, encoder_mlp_width=4096,
        decoder_width=768, decoder_layers=12, decoder_heads=12, vocab_size=50257, num_images=16, batch_size=8,
        epochs=2,
    ),
}
STACKS = ("peer", "ours", "ours_cached")
# The columns of torch.profiler's memory timeline (torch/profiler/_memory_profiler.py, _CATEGORY_TO_COLORS).
MEMORY_CATEGORIES = (
    "parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail", "unknown",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DATA_FILE = "data.pt"
TEN_EPOCHS = 10


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    dtype: str
    device: str
    threads: int
    lora_rank: int
    lora_alpha: int


# ----------------------------------------------------------------------------------------------------------------
# The models and the data (built once, in the parent, and saved for the stacks to load)


def image_processor_for(model: ViTGPT2ForConditionalGeneration) -> ViTGPT2Processor:
    """The transform both the parent (pixel inputs) and the feature cache's pre-pass apply, so both see one set of
    pixels. The processor needs a tokenizer, but the captions here are token ids already: a minimal one."""
    return ViTGPT2Processor.from_timm_model(model.encoder.model, train_caption_tokenizer(["random pixels"]))


def random_labels(count: int, positions: int, end_of_text: int, rng: np.random.Generator) -> torch.Tensor:
    """Captions of random tokens and random length (3/4 of the positions or more), closed by the end token and
    padded with -100. The model prepends the start token, so a caption is at most `positions + 1` tokens long
    counting its start and end."""
    labels = np.full((count, positions), -100, dtype=np.int64)
    for row in labels:
        length = rng.integers(3 * (positions - 1) // 4, positions)  # caption tokens before the end token
        row[:length] = rng.integers(0, end_of_text, length)
        row[length] = end_of_text
    return torch.from_numpy(labels)


def write_dataset(folder: Path, size: BenchSize, caption_tokens: int, processor: ViTGPT2Processor, seed: int) -> None:
    """Random RGB images as PNG files (the feature cache keys and reads files, as in training), their pixel values
    and one caption per image, saved in `folder`."""
    rng = np.random.default_rng(seed)
    image_paths = []
    for index in range(size.num_images):
        path = folder / f"image_{index:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size.image_size, size.image_size, 3), dtype=np.uint8)).save(path)
        image_paths.append(str(path))
    data = {
        "image_paths": image_paths,
        "pixel_values": processor(images=image_paths)["pixel_values"],
        "labels": random_labels(size.num_images, caption_tokens, size.vocab_size - 1, rng),
    }
    torch.save(data, folder / DATA_FILE)


def training_flops(size: BenchSize, images: int, caption_tokens: int) -> dict[str, float]:
    """Useful FLOPs of training once on `images` images with one caption each: 2 per multiply-add of the weight
    matrices (biases, norms, softmax, attention products and LoRA's rank-r matrices ignored). A frozen matrix costs
    a forward and an input-gradient product (4 per weight and token); a trained one also its weight gradient (6); the
    image-token key/value projection is trained but its input (the frozen encoder's output) needs no gradient (4).
    The encoder runs forward only (as bench_generate.py counts it). See benchmarks/README.md."""
    tokens, width, mlp = size.image_tokens, size.encoder_width, size.encoder_mlp_width
    encoder = images * size.encoder_layers * (2 * tokens * (4 * width**2 + 2 * width * mlp) + 4 * tokens**2 * width)

    d_model, layers = size.decoder_width, size.decoder_layers
    frozen_text_weights = layers * 12 * d_model**2 + size.vocab_size * d_model  # self-attention, MLP, LM head
    trained_text_weights = layers * 2 * d_model**2  # cross-attention query and output projections
    trained_image_weights = layers * width * 2 * d_model  # cross-attention keys/values, folded as in our model
    text_positions = images * caption_tokens
    decoder = text_positions * (4 * frozen_text_weights + 6 * trained_text_weights)
    decoder += images * tokens * 4 * trained_image_weights
    return {"encoder": float(encoder), "decoder": float(decoder)}


# ----------------------------------------------------------------------------------------------------------------
# One training stack, in its own process


class TrainingStack:
    """A model with LoRA, its AdamW optimizer and the data, trained one epoch per call; `name` is one of STACKS."""

    def __init__(self, name: str, folder: Path, settings: TrainSettings):
        self.name, self.folder, self.settings = name, folder, settings
        torch.set_num_threads(settings.threads)
        self.device = torch.device(settings.device)
        data = torch.load(folder / DATA_FILE)
        self.image_paths, self.pixel_values, self.labels = data["image_paths"], data["pixel_values"], data["labels"]
        if name == "peer":
            base = VisionEncoderDecoderModel.from_pretrained(folder / "peer")
            torch.manual_seed(settings.seed)  # LoRA's A matrices are random: same seed, same modules, same order
            model = get_peft_model(base, self.peer_lora_config(base))
        else:
            base = ViTGPT2ForConditionalGeneration.from_pretrained(folder / "ours")
            torch.manual_seed(settings.seed)
            arguments = PeftArguments(
                peft="lora", lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0
            )
            model = apply_peft(base, "lora", arguments)
        self.model = model.to(self.device).train()
        self.trainable_params = count_parameters(self.model)[0]
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        # As Trainer --bf16 does: bfloat16 autocast over fp32 weights.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=settings.dtype == "bf16")
        self.cache: EncoderFeatureCache | None = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.memory_after_load_mib = self.peak_memory_mib()

    def peer_lora_config(self, base: VisionEncoderDecoderModel) -> LoraConfig:
        """Our `apply_peft(model, "lora", ...)` set-up, in the peer's module names."""
        modules_to_save = ["crossattention", "ln_cross_attn"]
        if getattr(base, "enc_to_dec_proj", None) is not None:
            modules_to_save.append("enc_to_dec_proj")  # part of the new image-to-text path: trained like it
        return LoraConfig(
            r=self.settings.lora_rank,
            lora_alpha=self.settings.lora_alpha,
            lora_dropout=0.0,
            target_modules=r"decoder\.transformer\.h\.\d+\.attn\.(c_attn|c_proj)",  # not crossattention's
            fan_in_fan_out=True,
            modules_to_save=modules_to_save,
        )

    def peak_memory_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        # Linux reports kibibytes. The process was forked from the parent before it built anything, so this counts
        # the interpreter and libraries (alike in every stack) plus this stack's own weights, activations and state.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10

    def prepass(self) -> float:
        """Builds the encoder-feature cache (fingerprint and pre-pass), pages the idle encoder out, and trains from the
        cache from now on; seconds."""
        base = self.model.get_base_model()
        processor = image_processor_for(base)
        synchronize(self.device)
        started = time.perf_counter()
        cache = EncoderFeatureCache(self.folder / "feature-cache", base, processor)
        self.cache = cache.build(self.image_paths, batch_size=self.settings.batch_size, num_workers=2)
        page_out_encoder(base, self.folder / "feature-cache")  # as train.py does once training starts
        synchronize(self.device)
        return time.perf_counter() - started

    def batch(self, index: int, batch_size: int) -> dict:
        """Batch `index` of an epoch, in the data's fixed order."""
        rows = slice(index * batch_size, (index + 1) * batch_size)
        labels = self.labels[rows].to(self.device)
        if self.cache is None:
            return {"pixel_values": self.pixel_values[rows].to(self.device), "labels": labels}
        # float16 features as stored; the model casts them to its own dtype
        features = self.cache.batch_features(self.image_paths[rows]).to(self.device)
        return {"encoder_outputs": (features,), "labels": labels}

    def loss(self, batch: dict) -> torch.Tensor:
        with self.autocast:
            return self.model(**batch).loss

    def train_step(self, batch: dict) -> torch.Tensor:
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def warm_up(self) -> None:
        """A forward and backward on one sample, gradients dropped (the weights do not change): the one-off costs
        of a first call (thread pools, memory first touched) would otherwise land in the first timed epoch."""
        self.loss(self.batch(0, 1)).backward()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, index: int) -> tuple[float, float]:
        """Trains on batch `index`; the seconds it took (reading the batch included) and its loss."""
        synchronize(self.device)
        started = time.perf_counter()
        loss = self.train_step(self.batch(index, self.settings.batch_size))
        synchronize(self.device)
        seconds = time.perf_counter() - started
        return seconds, loss.item()  # read after timing, so that no step waits for the device twice

    def profile_step(self, top: int) -> list[dict]:
        """Top ops by self time of one training step on the first batch (run after the timed epochs: it trains)."""
        batch = self.batch(0, self.settings.batch_size)
        with profile(activities=profiler_activities(self.device)) as profiler:
            self.train_step(batch)
            synchronize(self.device)
        return top_ops(profiler, self.device, top)

    def memory_step(self) -> dict:
        """Where the memory of one training step on the first batch goes: torch.profiler's memory timeline (every
        tensor allocation, by what the tensor is) at the moment the step's tracked allocations peak, in MiB. Unlike
        peak RSS, it leaves out the interpreter and libraries and says which tensors make the difference. torch marks
        `export_memory_timeline` deprecated in favour of CUDA-only tools; on CPU it is still the only such view."""
        batch = self.batch(0, self.settings.batch_size)
        with profile(
            activities=profiler_activities(self.device), profile_memory=True, record_shapes=True, with_stack=True
        ) as profiler:
            self.train_step(batch)
            synchronize(self.device)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "timeline.json"
            device = "cpu" if self.device.type == "cpu" else f"cuda:{torch.cuda.current_device()}"
            profiler.export_memory_timeline(str(path), device=device)
            _, sizes = json.loads(path.read_text())
        # Column 0 is unused, then one column per category in the profiler's order.
        totals = [sum(row) for row in sizes]
        peak = sizes[totals.index(max(totals))]
        return {
            "peak_mib": max(totals) / 2**20,
            "at_peak_mib": {category: size / 2**20 for category, size in zip(MEMORY_CATEGORIES, peak[1:])},
        }

    def summary(self) -> dict:
        return {
            "trainable_params": self.trainable_params,
            "memory_after_load_mib": self.memory_after_load_mib,
            "peak_memory_mib": self.peak_memory_mib(),
        }


class StackFailed(RuntimeError):
    """An error in a stack process, carrying its traceback text."""


def serve(connection) -> None:
    """A stack process: builds its `TrainingStack`, then runs the methods the parent asks for until told to stop.
    An error goes back to the parent as its traceback text."""
    try:
        stack = TrainingStack(*connection.recv())
        connection.send(None)
        while (request := connection.recv()) is not None:
            method, args = request
            connection.send(getattr(stack, method)(*args))
    except Exception:
        connection.send(StackFailed(traceback.format_exc()))


class StackProcess:
    """The parent's handle on a stack process."""

    def __init__(self, context: multiprocessing.context.BaseContext, name: str):
        self.name = name
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=serve, args=(child_end,), name=name, daemon=True)
        self.process.start()

    def _answer(self):
        answer = self.connection.recv()
        if isinstance(answer, StackFailed):
            raise StackFailed(f"stack {self.name} failed:\n{answer}")
        return answer

    def open(self, folder: Path, settings: TrainSettings) -> None:
        self.connection.send((self.name, folder, settings))
        self._answer()

    def call(self, method: str, *args):
        self.connection.send((method, args))
        return self._answer()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


# ----------------------------------------------------------------------------------------------------------------
# The run


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--num_images", type=int, help="samples per epoch (one caption each); default: by --size")
    parser.add_argument("--batch_size", type=int, help="default: by --size")
    parser.add_argument("--epochs", type=int, help="timed epochs per stack; default: by --size")
    parser.add_argument("--caption_tokens", type=int, default=20, help="decoder positions per caption (start included)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="bf16 = bfloat16 autocast, as Trainer --bf16")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (1 keeps tiny runs quick on a loaded machine)")
    parser.add_argument("--profile", action="store_true", help="after the epochs, profile one step of each stack")
    parser.add_argument("--profile_top", type=int, default=12, help="how many ops --profile lists")
    parser.add_argument("--memory_profile", action="store_true",
                        help="after the epochs, break one step's peak tensor memory of each stack down by category")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def print_table(report: dict) -> None:
    stacks = report["stacks"]
    print(f"\n{'stack':<12} {'epoch s (each)':<24} {'best s':>8} {'samples/s':>9} {'%matmul':>7} "
          f"{'trainable':>11} {'mem after load':>14} {'peak mem':>9}")
    for name in STACKS:
        stack = stacks[name]
        epochs = " ".join(f"{seconds:.2f}" for seconds in stack["epoch_s"])
        print(f"{name:<12} {epochs:<24} {stack['best_epoch_s']:>8.2f} {stack['samples_per_s']:>9.2f} "
              f"{100 * stack['fraction_of_matmul']:>6.1f}% {stack['trainable_params']:>11,} "
              f"{stack['memory_after_load_mib']:>10.0f} MiB {stack['peak_memory_mib']:>5.0f} MiB")
    ten = report["ten_epochs_s"]
    print(f"\npre-pass (feature cache, {report['num_images']} images): {stacks['ours_cached']['prepass_s']:.2f} s")
    print(f"speedup, ours over peer, per epoch from pixels: {report['speedup']:.2f}x")
    print(f"{TEN_EPOCHS} epochs: peer {ten['peer']:.1f} s, ours {ten['ours']:.1f} s, ours with the cache "
          f"{ten['ours_cached']:.1f} s (pre-pass + {TEN_EPOCHS} epochs): "
          f"speedup_10_epochs_with_cache {report['speedup_10_epochs_with_cache']:.2f}x")
    print(f"%matmul: share of the measured {report['matmul_gflops']:.1f} GFLOP/s matmul throughput reached "
          "(useful FLOPs / epoch time)")

    print(f"\n{'step':>4} {'peer loss':>10} {'ours loss':>10} {'|diff|':>9} {'cached loss':>11}")
    for step, (peer, ours, cached) in enumerate(
        zip(stacks["peer"]["losses"], stacks["ours"]["losses"], stacks["ours_cached"]["losses"])
    ):
        print(f"{step:>4} {peer:>10.5f} {ours:>10.5f} {abs(peer - ours):>9.2e} {cached:>11.5f}")
    print(f"loss_max_abs_diff (peer vs ours): {report['loss_max_abs_diff']:.2e}; peer vs ours from the cache (float16 "
          f"features): {report['loss_max_abs_diff_cached']:.2e}")


def print_memory(memory: dict) -> None:
    print("\ntensor memory at the peak of one step (MiB, torch.profiler memory timeline)")
    print(f"{'stack':<12} {'peak':>7} " + " ".join(f"{category[:10]:>10}" for category in MEMORY_CATEGORIES))
    for name in STACKS:
        sizes = memory[name]["at_peak_mib"]
        print(f"{name:<12} {memory[name]['peak_mib']:>7.1f} "
              + " ".join(f"{sizes[category]:>10.1f}" for category in MEMORY_CATEGORIES))


def max_abs_diff(first: list[float], second: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(first, second, strict=True))


def main() -> None:
    arguments = parse_arguments()
    transformers.logging.set_verbosity_error()
    command = shlex.join(["python", *sys.argv])
    device = torch.device(arguments.device)
    if skipped_without_cuda(device, command, arguments.output):
        return

    # Fork the stacks before this process runs any torch op: an OpenMP thread pool or a CUDA context started before
    # a fork does not work in the child. Forked (not spawned) so that they do not import torch again.
    context = multiprocessing.get_context("fork")
    processes = {name: StackProcess(context, name) for name in STACKS}

    overrides = {key: getattr(arguments, key) for key in ("num_images", "batch_size", "epochs")}
    size = replace(SIZES[arguments.size], **{key: value for key, value in overrides.items() if value})
    settings = TrainSettings(
        batch_size=size.batch_size, lr=arguments.lr, weight_decay=arguments.weight_decay, seed=arguments.seed,
        dtype=arguments.dtype, device=device.type, threads=arguments.threads, lora_rank=PeftArguments.lora_rank,
        lora_alpha=PeftArguments.lora_alpha,
    )
    torch.set_num_threads(arguments.threads)
    machine = describe_machine(device)
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} using {machine['torch_threads']} "
          f"threads, transformers {machine['transformers']}" + (f", {machine['gpu']}" if machine["gpu"] else ""))
    load_at_start = os.getloadavg()[0]
    matmul_at_start = matmul_gflops(DTYPES[arguments.dtype], device)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        folder = Path(scratch)
        peer, ours = build_models(size, arguments.seed)
        peer_has_projection = getattr(peer, "enc_to_dec_proj", None) is not None
        peer.save_pretrained(folder / "peer")
        ours.save_pretrained(folder / "ours")
        write_dataset(folder, size, arguments.caption_tokens, image_processor_for(ours), arguments.seed)
        del peer, ours

        for process in processes.values():
            process.open(folder, settings)
        prepass_s = processes["ours_cached"].call("prepass")
        for process in processes.values():
            process.call("warm_up")
        steps_per_epoch = math.ceil(size.num_images / size.batch_size)
        steps = {name: [] for name in STACKS}  # (seconds, loss) of every step, epoch after epoch
        load_per_epoch = []
        for epoch in range(size.epochs):
            for index in range(steps_per_epoch):
                for name, process in processes.items():  # step by step in turn: load changes hit every stack alike
                    steps[name].append(process.call("step", index))
            load_per_epoch.append(os.getloadavg()[0])
            print(f"epoch {epoch + 1}/{size.epochs} done", file=sys.stderr)
        # Peak RSS first: the profilers' own bookkeeping would add to it.
        summaries = {name: process.call("summary") for name, process in processes.items()}
        profiles = (
            {name: process.call("profile_step", arguments.profile_top) for name, process in processes.items()}
            if arguments.profile
            else None
        )
        memory = (
            {name: process.call("memory_step") for name, process in processes.items()}
            if arguments.memory_profile
            else None
        )
        for process in processes.values():
            process.close()

    matmul = max(matmul_at_start, matmul_gflops(DTYPES[arguments.dtype], device))  # the least disturbed, as epochs
    load_average = {"start": load_at_start, "per_epoch": load_per_epoch, "end": os.getloadavg()[0]}
    flops = training_flops(size, size.num_images, arguments.caption_tokens)
    epoch_flops = {"peer": flops["encoder"] + flops["decoder"], "ours": flops["encoder"] + flops["decoder"],
                   "ours_cached": flops["decoder"]}
    stacks = {}
    for name in STACKS:
        step_s = [seconds for seconds, _ in steps[name]]
        epoch_s = [sum(step_s[start : start + steps_per_epoch]) for start in range(0, len(step_s), steps_per_epoch)]
        # Other jobs on a shared machine only ever add time: the fastest epoch is the least disturbed. The stacks
        # took their steps in turn, so each epoch ran under much the same load for all three.
        best_epoch_s = min(epoch_s)
        stacks[name] = {
            "epoch_s": epoch_s,
            "best_epoch_s": best_epoch_s,
            "samples_per_s": size.num_images / best_epoch_s,
            "fraction_of_matmul": epoch_flops[name] / best_epoch_s / 1e9 / matmul,
            **summaries[name],
            "losses": [loss for _, loss in steps[name]],
        }
    stacks["ours_cached"]["prepass_s"] = prepass_s
    ten_epochs_s = {
        "peer": TEN_EPOCHS * stacks["peer"]["best_epoch_s"],
        "ours": TEN_EPOCHS * stacks["ours"]["best_epoch_s"],
        "ours_cached": prepass_s + TEN_EPOCHS * stacks["ours_cached"]["best_epoch_s"],
    }
    report = {
        "command": command,
        "machine": machine,
        "size": arguments.size,
        "model": asdict(size) | {"image_tokens": size.image_tokens, "peer_has_enc_to_dec_proj": peer_has_projection},
        "dtype": arguments.dtype,
        "device": device.type,
        "num_images": size.num_images,
        "batch_size": size.batch_size,
        "epochs": size.epochs,
        "caption_tokens": arguments.caption_tokens,
        "optimizer": {"name": "AdamW", "lr": arguments.lr, "weight_decay": arguments.weight_decay},
        "lora": {"rank": settings.lora_rank, "alpha": settings.lora_alpha, "dropout": 0.0},
        "seed": arguments.seed,
        "load_average": load_average,
        "matmul_gflops": matmul,
        "epoch_flops": epoch_flops,
        "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)",
        "speedup": stacks["peer"]["best_epoch_s"] / stacks["ours"]["best_epoch_s"],
        "ten_epochs_s": ten_epochs_s,
        "speedup_10_epochs_with_cache": ten_epochs_s["peer"] / ten_epochs_s["ours_cached"],
        "loss_max_abs_diff": max_abs_diff(stacks["peer"]["losses"], stacks["ours"]["losses"]),
        "loss_max_abs_diff_cached": max_abs_diff(stacks["peer"]["losses"], stacks["ours_cached"]["losses"]),
        "stacks": stacks,
    }
    print_table(report)
    print(f"1-minute load average: {load_average['start']:.1f} at start, {load_average['end']:.1f} at end "
          f"({machine['cores']} cores)")
    if memory is not None:
        report["memory_profile"] = memory
        print_memory(memory)
    if profiles is not None:
        report["profile"] = profiles
        for name in STACKS:
            print_profile(f"{name}: top ops of one training step (self time)", profiles[name])
    write_report(report, arguments.output)


if __name__ == "__main__":
    main()
