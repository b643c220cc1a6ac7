"""`--quantize int8-compiled`: the vision encoder quantized with torchao's PT2E and compiled by Inductor, the decoder in
eager int8, loaded through the same loader, CLI and demo as `--quantize int8`."""

import json
import sys

import pytest
import torch

from conftest import random_image

pytest.importorskip("torchao", reason="--quantize int8-compiled needs torchao (the test extra installs it)")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

DynamicQuantizedLinear = torch.ao.nn.quantized.dynamic.Linear


def _pixels(processor, model, count: int) -> torch.Tensor:
    side = max(model.encoder.model.patch_embed.img_size)
    return processor(images=[random_image(seed, (side, side)) for seed in range(count)],
                     return_tensors="pt")["pixel_values"]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_the_encoder_compiles_once_and_serves_every_batch_size_close_to_float32(saved_captioner, tiny_processor):
    from modeling_vitgpt2.inference.compiled_encoder import CompiledInt8VisionTrunk
    from modeling_vitgpt2.inference.loading import load_for_inference

    reference = load_for_inference(saved_captioner)
    compiled = load_for_inference(saved_captioner, quantize="int8-compiled")
    assert isinstance(compiled.encoder.model, CompiledInt8VisionTrunk)
    assert isinstance(compiled.decoder.h[0].crossattention.c_attn, DynamicQuantizedLinear)
    assert isinstance(compiled.get_output_embeddings(), DynamicQuantizedLinear)

    pixel_values = _pixels(tiny_processor, reference, 4)
    with torch.inference_mode():  # as eval.py caption runs it; the demo's thread runs under no_grad
        batch = compiled.get_encoder()(pixel_values=pixel_values).last_hidden_state
        one_by_one = [compiled.get_encoder()(pixel_values=image[None]).last_hidden_state for image in pixel_values]
        expected = reference.get_encoder()(pixel_values=pixel_values).last_hidden_state
        captions = compiled.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=8)
    with torch.no_grad():
        again = compiled.get_encoder()(pixel_values=pixel_values[:3]).last_hidden_state
    # Compiled for one image; batches of 4, 1 and 3, in inference mode or not, run it image by image.
    assert torch.equal(batch, torch.cat(one_by_one)) and torch.equal(again, batch[:3])
    assert not torch.equal(batch, expected)  # int8 really ran
    assert _cosine(batch, expected) > 0.999
    assert captions.shape[0] == 4 and (captions[:, 1:] != reference.config.pad_token_id).any()


def test_a_lora_adapter_on_the_encoder_is_merged_before_compiling(tmp_path, saved_captioner, tiny_processor):
    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.inference.loading import BASE_MODEL_FOLDER, load_for_inference

    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(load_for_inference(saved_captioner), LoraConfig(
        r=4, target_modules=["qkv", "c_attn"], init_lora_weights=False, fan_in_fan_out=False))
    peft_model.save_pretrained(adapter)
    (adapter / BASE_MODEL_FOLDER).symlink_to(saved_captioner, target_is_directory=True)

    merged = load_for_inference(adapter).merge_and_unload()
    base = load_for_inference(saved_captioner)
    compiled = load_for_inference(adapter, quantize="int8-compiled")
    pixel_values = _pixels(tiny_processor, base, 2)
    with torch.inference_mode():
        tokens = compiled.get_encoder()(pixel_values=pixel_values).last_hidden_state
        with_adapter = merged.get_encoder()(pixel_values=pixel_values).last_hidden_state
        without = base.get_encoder()(pixel_values=pixel_values).last_hidden_state
    assert (tokens - with_adapter).abs().max() < (tokens - without).abs().max() / 4


def test_the_compiled_encoder_refuses_attentions_and_saving(saved_captioner, tiny_processor, tmp_path):
    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.utils.errors import UserError

    compiled = load_for_inference(saved_captioner, quantize="int8-compiled")
    with pytest.raises(UserError, match="--quantize int8"), torch.inference_mode():
        compiled.get_encoder()(pixel_values=_pixels(tiny_processor, compiled, 1), output_attentions=True)
    with pytest.raises(RuntimeError, match="cannot be saved"):
        compiled.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_eval_caption_and_the_demo_take_int8_compiled(saved_captioner, tmp_path):
    pytest.importorskip("gradio")
    import eval as eval_cli
    from modeling_vitgpt2.applications.demo import load_demo, parse_args
    from modeling_vitgpt2.inference.compiled_encoder import CompiledInt8VisionTrunk

    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        random_image(seed, (40, 30)).save(images / f"img{seed}.png")
    output = tmp_path / "preds.json"
    assert eval_cli.main(["caption", "--model", str(saved_captioner), "--images", str(images), "--output",
                          str(output), "--quantize", "int8-compiled", "--max_new_tokens", "6", "--batch_size", "2",
                          "--num_workers", "0"]) == 0
    assert sorted(json.loads(output.read_text())) == ["img0", "img1", "img2"]

    demo = load_demo(parse_args(["--model", str(saved_captioner), "--quantize", "int8-compiled"]))
    assert isinstance(demo.model.encoder.model, CompiledInt8VisionTrunk)
    demo.warm_up()  # a caption with the cross-attention panels of every layer, from the demo's model thread


def test_without_torchao_or_a_compiler_the_message_says_what_to_do(saved_captioner, monkeypatch, tmp_path):
    from torch._inductor import cpp_builder

    from modeling_vitgpt2.inference.compiled_encoder import CACHE_ENVIRONMENT_VARIABLE
    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.utils.errors import UserError

    monkeypatch.setenv(CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "empty cache"))  # else a cached package needs neither
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "no-such-c++-compiler")
    with pytest.raises(UserError, match=r"C\+\+ compiler .*apt-get install g\+\+.*--quantize int8"):
        load_for_inference(saved_captioner, quantize="int8-compiled")
    monkeypatch.undo()

    monkeypatch.setenv(CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "empty cache"))
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)  # import fails, as uninstalled
    with pytest.raises(UserError, match=r"needs torchao: pip install 'modeling-vitgpt2\[int8-compiled\]'"):
        load_for_inference(saved_captioner, quantize="int8-compiled")


def test_compiling_lets_the_float32_encoder_go(saved_captioner):
    """Nothing keeps the float32 ViT once its int8 graph is compiled: not the exported graph module (it held the
    float32 weights beside the int8 constants), nor the lru_caches PT2E keys on modules. Either kept the whole float32
    encoder resident: 1.4 GB at the real size."""
    import gc
    import weakref

    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.inference.quantization import quantize_for_cpu

    model = load_for_inference(saved_captioner)
    weights = [weakref.ref(module.weight) for module in model.encoder.model.modules()
               if isinstance(module, torch.nn.Linear)]
    model = quantize_for_cpu(model, "int8-compiled")
    gc.collect()
    assert weights and all(weight() is None for weight in weights)


def _encoder_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.get_encoder()(pixel_values=pixel_values).last_hidden_state


def _packages(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _cache_holding_the_package_of(saved_captioner, session_cache, folder):
    """A cache folder of its own holding only the package of `saved_captioner`'s encoder, named by its digest and
    copied from the session's cache (where it is compiled at most once per test session)."""
    import shutil

    from modeling_vitgpt2.inference.compiled_encoder import int8_vision_trunk_digest
    from modeling_vitgpt2.inference.loading import load_for_inference

    load_for_inference(saved_captioner, quantize="int8-compiled")
    encoder = load_for_inference(saved_captioner).get_encoder()
    name = int8_vision_trunk_digest(encoder.model.state_dict().items(), encoder.image_size) + ".pt2"
    folder.mkdir()
    shutil.copy(session_cache / name, folder / name)
    return folder / name


def test_a_second_load_reads_the_compiled_encoder_from_the_cache_without_compiling(
        saved_captioner, compiled_encoder_cache, tiny_processor, tmp_path, monkeypatch, caplog):
    """What a restarted Space does: the second load of the same weights on the same machine loads the package the
    first one compiled (no compiler, no float32 encoder layers read), with the same results; a LoRA adapter on the
    decoder alone shares it, one on the encoder asks for its own."""
    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.inference import compiled_encoder, quantization
    from modeling_vitgpt2.inference.loading import BASE_MODEL_FOLDER, load_for_inference

    first = load_for_inference(saved_captioner, quantize="int8-compiled")
    cache = _cache_holding_the_package_of(saved_captioner, compiled_encoder_cache, tmp_path / "cache").parent
    monkeypatch.setenv(compiled_encoder.CACHE_ENVIRONMENT_VARIABLE, str(cache))
    pixel_values = _pixels(tiny_processor, first, 2)

    read = []
    real_tensor = quantization._Checkpoint.tensor
    monkeypatch.setattr(quantization._Checkpoint, "tensor", lambda self, key: read.append(key) or real_tensor(self, key))

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds this encoder")

    monkeypatch.setattr(quantization, "compile_int8_vision_trunk", no_compiling)
    with caplog.at_level("INFO", logger=compiled_encoder.__name__):
        second = load_for_inference(saved_captioner, quantize="int8-compiled")
    assert torch.equal(_encoder_tokens(second, pixel_values), _encoder_tokens(first, pixel_values))
    assert str(cache) in caplog.text
    # The encoder's linear layers were read once each, for the digest, and never kept.
    encoder_linear_keys = [key for key in read if key.startswith("encoder.") and ".blocks." in key]
    assert encoder_linear_keys and len(encoder_linear_keys) == len(set(encoder_linear_keys))

    def adapter_on(target_modules, name):
        torch.manual_seed(0)
        folder = tmp_path / name
        get_peft_model(load_for_inference(saved_captioner), LoraConfig(
            r=4, target_modules=target_modules, init_lora_weights=False)).save_pretrained(folder)
        (folder / BASE_MODEL_FOLDER).symlink_to(saved_captioner, target_is_directory=True)
        return folder

    load_for_inference(adapter_on(["c_fc"], "decoder adapter"), quantize="int8-compiled")
    assert len(_packages(cache)) == 1

    # An adapter on the encoder changes its weights: the load asks for a compile under a digest of its own (the
    # compile itself is the other tests' subject, and costs a child process and a C++ build).
    class CompileRequested(Exception):
        pass

    def record_compile(encoder_config, vit, digest):
        raise CompileRequested(digest)

    monkeypatch.setattr(quantization, "compile_int8_vision_trunk", record_compile)
    with pytest.raises(CompileRequested) as requested:
        load_for_inference(adapter_on(["fc1"], "encoder adapter"), quantize="int8-compiled")
    assert f"{requested.value}.pt2" not in _packages(cache)


def test_an_unreadable_cached_package_is_compiled_again_and_replaced(
        saved_captioner, compiled_encoder_cache, tiny_processor, tmp_path, monkeypatch, caplog):
    from modeling_vitgpt2.inference import compiled_encoder
    from modeling_vitgpt2.inference.loading import load_for_inference

    good = load_for_inference(saved_captioner, quantize="int8-compiled")
    package = _cache_holding_the_package_of(saved_captioner, compiled_encoder_cache, tmp_path / "cache")
    cache = package.parent
    monkeypatch.setenv(compiled_encoder.CACHE_ENVIRONMENT_VARIABLE, str(cache))
    package.write_bytes(package.read_bytes()[:1000])  # a copy cut short: a full disk, a killed rsync
    with caplog.at_level("WARNING", logger=compiled_encoder.__name__):
        again = load_for_inference(saved_captioner, quantize="int8-compiled")
    assert f"Cannot load the compiled encoder {package}" in caplog.text and "compiling it again" in caplog.text
    pixel_values = _pixels(tiny_processor, good, 1)
    assert torch.equal(_encoder_tokens(again, pixel_values), _encoder_tokens(good, pixel_values))
    assert _packages(cache) == [package.name] and package.stat().st_size > 1000  # and no partial file beside it


def test_with_the_cache_off_or_unwritable_nothing_is_kept_and_the_model_still_loads(
        saved_captioner, tmp_path, monkeypatch, caplog):
    from modeling_vitgpt2.inference import compiled_encoder
    from modeling_vitgpt2.inference.compiled_encoder import CompiledInt8VisionTrunk
    from modeling_vitgpt2.inference.loading import load_for_inference

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf home"))
    monkeypatch.setenv(compiled_encoder.CACHE_ENVIRONMENT_VARIABLE, "off")
    assert compiled_encoder.compiled_encoder_cache() is None
    model = load_for_inference(saved_captioner, quantize="int8-compiled")
    assert isinstance(model.encoder.model, CompiledInt8VisionTrunk)
    assert not (tmp_path / "hf home").exists()

    # A cache that cannot be written (here a file stands where its folder would be): the package is written to a
    # temporary folder instead, as with the cache off, and the log says how to keep it.
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setenv(compiled_encoder.CACHE_ENVIRONMENT_VARIABLE, str(blocked / "cache"))
    with caplog.at_level("WARNING", logger=compiled_encoder.__name__), \
            compiled_encoder._package_path("0" * 64) as package:
        assert not package.is_relative_to(blocked) and package.parent.is_dir()
    assert not package.parent.exists()
    assert f"Cannot write to the compiled-encoder cache {blocked / 'cache'}" in caplog.text
    assert compiled_encoder.CACHE_ENVIRONMENT_VARIABLE in caplog.text


def test_a_compiler_that_dies_leaves_no_package_and_says_what_to_do(saved_captioner, tmp_path, monkeypatch):
    """A compiler killed for memory (what a 2-core, 16 GB Space can meet) ends the child process that compiles, not
    the server that asked: the load fails with a message, and nothing half-written is left to be loaded later."""
    import subprocess

    from modeling_vitgpt2.inference import compiled_encoder
    from modeling_vitgpt2.inference.loading import load_for_inference

    cache = tmp_path / "cache"
    monkeypatch.setenv(compiled_encoder.CACHE_ENVIRONMENT_VARIABLE, str(cache))
    killed = subprocess.CompletedProcess(args=[], returncode=-9, stdout="", stderr="")
    monkeypatch.setattr(compiled_encoder.subprocess, "run", lambda *args, **kwargs: killed)
    with pytest.raises(RuntimeError, match=r"compiling the int8 vision encoder failed \(exit status -9\); use "
                                           r"--quantize int8"):
        load_for_inference(saved_captioner, quantize="int8-compiled")
    assert _packages(cache) == []
