"""The demo page (app.py) as its visitors meet it: `python app.py` serving on localhost, driven through
gradio_client and in a real headless Chromium (the OS package, driven by Playwright).

One server serves the whole module (starting it costs the imports of torch and Gradio); a tiny captioner fitted
for a moment to the tiny captions (so it writes words) and a tiny CLIP are saved first and loaded by the app the way
users' folders are. The photo is a real one from ../shared/data when present, else a generated scene.
"""

import gc
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, fit_tiny_captions, serving_app, tiny_config_kwargs
from helpers import huge_png

gradio_client = pytest.importorskip("gradio_client", reason="the demo tests need the [test] extra (gradio_client)")
gr = pytest.importorskip("gradio", reason="the demo page needs the [demo] extra (gradio)")

from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration, ViTGPT2Processor  # noqa: E402
from modeling_vitgpt2.evaluation.attention_maps import attention_overlay, caption_attention_maps  # noqa: E402
from modeling_vitgpt2.evaluation.jobs import load_captioner  # noqa: E402
from modeling_vitgpt2.evaluation.zero_shot import ENSEMBLE, class_probabilities  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_torch_thread")

REAL_PHOTO = REPO.parent / "shared" / "data" / "real_images" / "git_examples" / "1.jpg"
# Flags for a headless Chromium running as root on a machine without network access.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The README's screenshot comes from the browser test: DEMO_SCREENSHOT keeps it at a path, DEMO_MODEL (and
# DEMO_IMAGE) open the page on another model (and upload another image) for it.
SCREENSHOT_ENV, MODEL_ENV, IMAGE_ENV = "DEMO_SCREENSHOT", "DEMO_MODEL", "DEMO_IMAGE"


@pytest.fixture(scope="module")
def captioner_dir(tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer)))
    processor = ViTGPT2Processor.from_timm_model(model.encoder.model, tiny_tokenizer)
    fit_tiny_captions(model, processor)
    folder = tmp_path_factory.mktemp("captioner")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(captioner_dir):
    """The saved captioner loaded as the page loads it (on a CPU: prepacked), to compare the page with."""
    return load_captioner(captioner_dir, device="cpu")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A real photo when ../shared/data is there; otherwise a generated scene, so the page is still tested."""
    if REAL_PHOTO.is_file():
        return REAL_PHOTO
    import random

    from modeling_vitgpt2.data.synthetic import draw_scene, random_scene

    path = tmp_path_factory.mktemp("photo") / "scene.png"
    draw_scene(random_scene(random.Random(0)), 160).save(path)
    return path


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    files = {"not-an-image": folder / "holiday.jpg", "bomb": folder / "bomb.png", "1x1": folder / "dot.png"}
    files["not-an-image"].write_text("hello, I am a text file with an image's name")
    huge_png(files["bomb"])  # 144 megapixels in a small file: past the pixel limit, not past Pillow's own
    Image.new("RGB", (1, 1), "red").save(files["1x1"])
    return files


@pytest.fixture(scope="module")
def example_folder(photo, tmp_path_factory) -> Path:
    """A folder as users have them: the example photo among files nobody meant to publish."""
    folder = tmp_path_factory.mktemp("home")
    shutil.copyfile(photo, folder / "example.jpg")
    (folder / "notes.txt").write_text("private notes")
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    shutil.copyfile(photo, folder / "holiday.jpg")  # an image beside the example, not given as one
    return folder


@pytest.fixture(scope="module")
def server(captioner_dir, tiny_clip, example_folder, tmp_path_factory):
    """`python app.py --model ... --clip_model ...` on a free localhost port, started as a user starts it."""
    arguments = ["--model", str(captioner_dir), "--clip_model", str(tiny_clip), "--examples",
                 str(example_folder / "example.jpg")]
    with serving_app(REPO / "app.py", arguments, cwd=tmp_path_factory.mktemp("app")) as url:
        yield url


@pytest.fixture(scope="module")
def page(server, photo, tmp_path_factory):
    """(URL, image to upload) for the browser test: the module's server and photo, unless DEMO_MODEL is set."""
    image = Path(os.environ.get(IMAGE_ENV) or photo)
    if not os.environ.get(MODEL_ENV):
        yield server, image
        return
    arguments = ["--model", os.environ[MODEL_ENV], "--examples", str(image)]
    with serving_app(REPO / "app.py", arguments, cwd=tmp_path_factory.mktemp("app")) as url:
        yield url, image


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


def caption_on_page(client, image: Path, num_beams=3, max_new_tokens=12, length_penalty=1.0, layers=("all",),
                    head="mean"):
    return client.predict(gradio_client.handle_file(str(image)), num_beams, max_new_tokens, length_penalty,
                          list(layers), head, api_name="/caption")


def fetch(server: str, path: str | Path) -> tuple[int, bytes]:
    """(HTTP status, body) of the page's file route for a local path, as any visitor can ask for it."""
    url = f"{server}gradio_api/file={urllib.parse.quote(str(path))}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def served_example_paths(server: str) -> list[str]:
    """The paths of the example images as the page's config hands them to the browser."""
    with urllib.request.urlopen(f"{server}config", timeout=30) as response:
        config = json.load(response)
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and node["path"].endswith("example.jpg"):
                found.append(node["path"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return list(dict.fromkeys(found))


def test_the_page_serves_the_example_and_no_file_beside_it(server, example_folder, captioner_dir):
    served = served_example_paths(server)
    assert served  # the premise: the page offers the example
    for path in served:
        assert fetch(server, path) == (200, (example_folder / "example.jpg").read_bytes())
        # Nothing else in the folder the example is served from.
        for name in ("notes.txt", ".env", "holiday.jpg"):
            assert fetch(server, Path(path).parent / name)[0] in (403, 404)
    # The user's folder the example came from: neither its other files nor its dotfiles, nor anything elsewhere.
    for path in (example_folder / "notes.txt", example_folder / ".env", example_folder / "holiday.jpg",
                 captioner_dir / "config.json", "/etc/passwd"):
        assert fetch(server, path)[0] in (403, 404), path


def call_api(server: str, api_name: str, data: list) -> tuple[str, list]:
    """(event, data) of one raw POST to the page's API, as any program on the network can send it (no client)."""
    request = urllib.request.Request(f"{server}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{server}gradio_api/call/{api_name}/{event_id}", timeout=120) as response:
        text = response.read().decode()
    event = text.split("\n")[0].removeprefix("event: ")
    return event, json.loads(text.split("data: ", 1)[1].split("\n")[0])


def test_the_api_reads_no_server_file_that_was_not_uploaded_or_an_example(server, client, photo, tmp_path):
    """A caller naming a server file as the image ({"path": ...} without Gradio's `meta`, which Gradio then lets
    through unchecked) must get no caption of it, and the same refusal whether the file exists or not."""
    from modeling_vitgpt2.applications import demo

    upload_folder = Path(gr.utils.get_upload_folder()).resolve()
    link = upload_folder / f"planted-link-{os.getpid()}.png"  # a link inside the folder, to a file outside it
    upload_folder.mkdir(parents=True, exist_ok=True)
    link.symlink_to(photo)
    outside = {"a private image": str(photo), "a missing file": str(tmp_path / "nothing-here.png"),
               "a system file": "/etc/passwd", "a way out with ..": os.path.relpath(photo, upload_folder),
               "a link": str(link)}
    outside["a way out with .."] = str(upload_folder / outside["a way out with .."])
    try:
        for label, path in outside.items():
            for api_name, settings in (("caption", [1, 5, 1.0, ["all"], "mean"]),
                                       ("zero_shot", ["dog, cat", "a photo of {object}."])):
                for image in ({"path": path}, {"path": path, "meta": {"_type": "gradio.FileData"}}):
                    event, data = call_api(server, api_name, [image, *settings])
                    assert event == "error", (label, api_name, image, data)
                # Through gradio_client, which shows the page's message: the same for every path.
                with pytest.raises(gradio_client.exceptions.AppError) as refusal:
                    client.predict({"path": path}, *settings, api_name=f"/{api_name}")
                assert str(refusal.value) == demo.NOT_UPLOADED, (label, api_name)
    finally:
        link.unlink()
    # The examples, as the page sends a clicked one (from Gradio's cache), are still captioned.
    example = served_example_paths(server)[0]
    event, data = call_api(server, "caption", [{"path": example, "meta": {"_type": "gradio.FileData"}}, 1, 5, 1.0,
                                               ["all"], "mean"])
    assert event == "complete" and data[0].strip()


@pytest.mark.parametrize("num_beams, max_new_tokens, length_penalty", [(3, 12, 1.0), (1, 12, 1.0), (4, 8, 2.0)])
def test_caption_is_model_generate_with_the_same_settings(client, loaded, photo, num_beams, max_new_tokens,
                                                          length_penalty):
    model, processor = loaded
    with torch.no_grad():
        output = model.generate(**processor(images=[photo]), num_beams=num_beams, max_new_tokens=max_new_tokens,
                                length_penalty=length_penalty, num_return_sequences=num_beams, output_scores=True,
                                return_dict_in_generate=True)
        expected = processor.batch_decode(model.generate(**processor(images=[photo]), num_beams=num_beams,
                                                         max_new_tokens=max_new_tokens, length_penalty=length_penalty))
    caption, beams, panels, note = caption_on_page(client, photo, num_beams, max_new_tokens, length_penalty)

    assert caption == expected[0] and caption.strip()  # and the premise: the model wrote something
    rows = beams["data"]
    assert [row[0] for row in rows] == list(range(1, num_beams + 1))
    assert [row[1] for row in rows] == processor.batch_decode(output.sequences)
    if num_beams > 1:
        np.testing.assert_allclose([row[2] for row in rows], output.sequences_scores.tolist(), atol=1e-4)
    assert note == ""
    # One panel per word of the caption, labelled with the word, each a real picture.
    assert [panel["caption"] for panel in panels] == caption.split()
    for panel in panels:
        with Image.open(panel["image"]) as picture:
            assert min(picture.size) > 0


def test_panels_are_the_attention_maps_of_the_chosen_layer_and_head(client, loaded, photo):
    model, processor = loaded
    caption, _, panels, _ = caption_on_page(client, photo, layers=["1"], head="1")
    result = caption_attention_maps(model, processor, photo, layer=[1], head=1, num_beams=3, max_new_tokens=12)
    assert result.caption == caption and len(panels) == len(result.words) > 0
    averaged = caption_on_page(client, photo, layers=["all"], head="mean")[2]
    different = 0
    for index, (panel, other) in enumerate(zip(panels, averaged)):
        with Image.open(panel["image"]) as shown, Image.open(other["image"]) as shown_averaged:
            expected = np.asarray(attention_overlay(result, index), dtype=int)
            assert np.abs(np.asarray(shown.convert("RGB"), dtype=int) - expected).max() == 0
            different += not np.array_equal(np.asarray(shown), np.asarray(shown_averaged))
    assert different > 0  # the selectors change what is shown


@pytest.mark.parametrize("kind, message", [
    ("not-an-image", "holiday.jpg is not an image this page can read: cannot identify image file"),
    ("bomb", "bomb.png is too large to decode safely: it is 12,000 x 12,000 = 144,000,000 pixels, more than "
             "this page's limit of 89,478,485. Upload a smaller image."),
    ("1x1", "The image is 1x1 pixels; the model needs at least 14 pixels on each side"),
])
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(client, hostile_files, photo, kind, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        caption_on_page(client, hostile_files[kind])
    assert caption_on_page(client, photo, max_new_tokens=4)[0]


def test_a_phone_photo_is_captioned_upright_as_its_exif_orientation_says(client, photo, tmp_path):
    """Phones store a portrait photo sideways with EXIF Orientation=6; viewers (and the page's image box) show it
    upright, and the model must see it upright too."""
    from PIL import ImageOps

    with Image.open(photo) as original:
        upright = original.convert("RGB").resize((90, 120))  # portrait
    phone = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    upright.transpose(Image.Transpose.ROTATE_90).save(phone, exif=exif.tobytes(), quality=95)
    with Image.open(phone) as stored:
        assert stored.size == (120, 90)  # the premise: stored sideways
        viewed = ImageOps.exif_transpose(stored)
    assert np.abs(np.asarray(viewed, dtype=int) - np.asarray(upright, dtype=int)).mean() < 8  # JPEG's loss only
    as_viewed = tmp_path / "as_viewed.png"
    viewed.save(as_viewed)

    caption, beams, panels, _ = caption_on_page(client, phone)
    expected = caption_on_page(client, as_viewed)
    assert (caption, beams["data"]) == (expected[0], expected[1]["data"])
    for panel, expected_panel in zip(panels, expected[2], strict=True):
        with Image.open(panel["image"]) as shown, Image.open(expected_panel["image"]) as reference:
            assert np.array_equal(np.asarray(shown), np.asarray(reference))


def test_requests_queue_and_each_gets_its_own_answer(client, photo):
    settings = [(3, 12, 1.0), (1, 5, 1.0), (2, 8, 1.0)]
    jobs = [client.submit(gradio_client.handle_file(str(photo)), *setting, ["all"], "mean", api_name="/caption")
            for setting in settings]  # submitted at once; the page runs one at a time
    answers = [job.result(timeout=120)[0] for job in jobs]
    assert answers == [caption_on_page(client, photo, *setting)[0] for setting in settings]


@pytest.mark.parametrize("setting, value, message", [
    ("num_beams", 1024, "Beams must be a whole number from 1 to 8, as on the page; got 1024"),
    ("num_beams", 0, "Beams must be a whole number from 1 to 8, as on the page; got 0"),
    ("num_beams", 2.5, "Beams must be a whole number from 1 to 8"),
    ("max_new_tokens", 0, "Maximum new tokens must be a whole number from 1 to 63, as on the page; got 0"),
    ("length_penalty", 1e9, "Length penalty must be a number from -2.0 to 2.0"),
    ("layers", ["99"], r"Decoder layers \['99'\] have no cross-attention in this model: choose from \[0, 1\]"),
    ("head", "99", "Attention head '99' does not exist: choose 'mean' or one of 0..1"),
])
def test_settings_the_sliders_forbid_get_a_message_from_the_server(client, photo, setting, value, message):
    settings = {"num_beams": 3, "max_new_tokens": 12, "length_penalty": 1.0, "layers": ["all"], "head": "mean",
                setting: value}
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        caption_on_page(client, photo, **settings)
    assert caption_on_page(client, photo, max_new_tokens=4)[0]


def scenes(folder: Path, count: int) -> list[Path]:
    """`count` different generated scenes of different sizes, so that a batch holds different images."""
    import random

    from modeling_vitgpt2.data.synthetic import draw_scene, random_scene

    paths = []
    for index in range(count):
        path = folder / f"scene{index}.png"
        draw_scene(random_scene(random.Random(index)), 40 + 10 * index).save(path)
        paths.append(path)
    return paths


def batched_page(captioner_dir, max_batch_size: int, **demo_options):
    """The page served in this process (so that the test sees how requests were grouped): (URL, page, the sizes
    of the `generate` calls made for captions)."""
    from modeling_vitgpt2.applications import demo as demo_module

    model, processor = load_captioner(captioner_dir, device="cpu")
    demo = demo_module.Demo(model, processor, **demo_options)
    batch_sizes = []
    caption_images = demo.caption_images
    demo.caption_images = lambda images, settings: batch_sizes.append(len(images)) or caption_images(images, settings)
    page = demo_module.build_page(demo, [], title="batched", max_batch_size=max_batch_size)
    page.queue(default_concurrency_limit=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/", page, batch_sizes


@pytest.mark.parametrize("max_batch_size", [4, 1])
def test_concurrent_callers_are_batched_and_each_gets_its_single_call_caption(captioner_dir, photo, hostile_files,
                                                                               tmp_path, max_batch_size):
    images = [photo, *scenes(tmp_path, 5)]
    url, page, batch_sizes = batched_page(captioner_dir, max_batch_size)
    try:
        client = gradio_client.Client(url, verbose=False)
        # One call at a time: every caption alone in its batch.
        alone = {(image, beams): caption_on_page(client, image, num_beams=beams) for image in images for beams in (3, 1)}
        assert set(batch_sizes) == {1}
        batch_sizes.clear()

        def call(request):
            image, beams = request
            try:
                return caption_on_page(client, image, num_beams=beams)
            except gradio_client.exceptions.AppError as error:
                return error

        # A burst: 12 valid callers at once (two beam settings) and one caller with a text file for an image.
        burst = [*alone, (hostile_files["not-an-image"], 3)]
        with ThreadPoolExecutor(len(burst)) as pool:
            answers = dict(zip(burst, pool.map(call, burst)))
        assert "holiday.jpg is not an image this page can read" in str(answers.pop(burst[-1]))
        for request, answer in answers.items():
            assert not isinstance(answer, Exception), (request, answer)
            caption, beams, panels, note = answer
            assert (caption, beams["data"], note) == (alone[request][0], alone[request][1]["data"], alone[request][3])
            assert [panel["caption"] for panel in panels] == [panel["caption"] for panel in alone[request][2]]
        assert sum(batch_sizes) == len(alone)
        assert max(batch_sizes) == max_batch_size if max_batch_size == 1 else 1 < max(batch_sizes) <= max_batch_size
    finally:
        page.close()


def test_the_panel_folder_keeps_only_the_panels_still_in_use(captioner_dir, photo, tmp_path):
    """Each request writes its panels to the Demo's folder, and Gradio serves its own copies of them: a page running
    for months must not keep every panel it ever drew. With a lifetime of 0 s, each request deletes the panels of
    the requests before it, and its own are still served."""
    url, page, _ = batched_page(captioner_dir, max_batch_size=1, panel_lifetime_s=0)
    folder = Path(page.captioner.demo.panel_folder.name)
    try:
        client = gradio_client.Client(url, verbose=False)
        for image in [photo, *scenes(tmp_path, 3), photo]:
            panels = caption_on_page(client, image)[2]
            served = {hashlib.sha256(Path(panel["image"]).read_bytes()).hexdigest() for panel in panels}
            assert served  # every panel reached the caller (the client downloads each)
            assert {path.stem for path in folder.iterdir()} == served
        client.close()
    finally:
        page.close()


def test_a_server_batching_int8_requests_is_told_their_captions_depend_on_the_batch():
    """Dynamic int8 quantizes a layer's activations with one scale per call, so in int8 a request's caption depends
    on what it is batched with (measured: 5-7 of 16 equal at the real size with random weights); the operator hears
    it at start, with the setting that avoids it."""
    from modeling_vitgpt2.applications.demo import batching_notice, parse_args

    notice = batching_notice(parse_args(["--quantize", "int8-compiled"]))
    assert "one scale per batch" in notice and "--max_batch_size 1" in notice
    assert batching_notice(parse_args(["--quantize", "int8", "--max_batch_size", "1"])) is None
    assert batching_notice(parse_args([])) is None  # float32 batches give exactly the single-call captions


@pytest.mark.parametrize("arguments, message", [
    (["--server_port", "99999"], "--server_port must be from 1 to 65535 (leave it out for Gradio's default); got 99999"),
    (["--server_port", "0"], "--server_port must be from 1 to 65535 (leave it out for Gradio's default); got 0"),
    (["--max_file_size", "20"], "argument --max_file_size: give a whole number and a unit (b, kb, mb or gb), e.g. "
                                "20MB; got '20'"),
])
def test_a_bad_port_or_upload_size_is_one_line_and_exit_2(arguments, message, capsys):
    from modeling_vitgpt2.applications.demo import DEFAULT_MAX_FILE_SIZE, parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(arguments)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"app.py: error: {message}"
    accepted = parse_args(["--server_port", "7860", "--max_file_size", "5mb"])
    assert (accepted.server_port, accepted.max_file_size) == (7860, "5mb")
    assert parse_args([]).max_file_size == DEFAULT_MAX_FILE_SIZE


def test_examples_are_the_image_files_of_a_folder_and_copies_never_collide(tmp_path):
    """A folder named like an image (`old.png/`) is no example (copying it stopped the page from starting); two
    examples with one file name, one through `..`, each get their own copy."""
    from modeling_vitgpt2.applications.demo import find_examples, private_copies

    for folder, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8), colour).save(tmp_path / folder / "cat.png")
    (tmp_path / "a" / "old.png").mkdir()
    examples = find_examples([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "b" / ".." / "a" / "cat.png")])
    assert examples == [str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png"),
                        str(tmp_path / "b" / ".." / "a" / "cat.png")]
    (tmp_path / "served").mkdir()
    copies = private_copies(examples, tmp_path / "served")
    assert len(set(copies)) == 3
    assert [Path(copy).read_bytes() for copy in copies] == [Path(example).read_bytes() for example in examples]


def test_the_captioner_thread_answers_every_caller_whatever_its_batch_function_does():
    """A batch function that answers too few requests, or raises what is no `Exception` (SystemExit), must give its
    callers an error, and the thread must serve the next batch: otherwise every later visitor waits forever."""
    from modeling_vitgpt2.applications.demo import CaptionBatcher

    calls = []

    def misbehaving(requests):
        calls.append(requests)
        if len(calls) == 1:
            return []
        if len(calls) == 2:
            raise SystemExit(3)
        return [request * 2 for request in requests]

    batcher = CaptionBatcher(misbehaving, max_batch_size=4)
    assert "gave 0 answers to 1 requests" in repr(outcome_within(30, batcher, 1))
    assert "stopped (SystemExit: 3)" in repr(outcome_within(30, batcher, 1))
    assert outcome_within(30, batcher, 21) == 42


def test_closing_the_batcher_lets_the_running_batch_answer_and_refuses_the_rest_at_once():
    """`close` while a batch runs: that batch still answers its caller, the callers waiting behind it and any that
    come later get the closed page's error at once (not when the batch ends, and never a wait forever), none of
    theirs runs, and the thread ends."""
    from modeling_vitgpt2.applications.demo import CaptionBatcher

    running, release = threading.Event(), threading.Event()
    batches = []

    def slow(requests):
        batches.append(list(requests))
        running.set()
        release.wait(timeout=60)
        return [request * 2 for request in requests]

    batcher = CaptionBatcher(slow, max_batch_size=4)
    outcomes = {}

    def call(request):
        outcomes[request] = _outcome(batcher, request)

    callers = {request: threading.Thread(target=call, args=(request,), daemon=True) for request in (1, 2, 3)}
    callers[1].start()
    assert running.wait(timeout=30), "the first batch never started"
    callers[2].start()
    callers[3].start()
    deadline = time.monotonic() + 30
    while batcher.waiting.qsize() < 2:
        assert time.monotonic() < deadline, "the second and third callers never queued"
        time.sleep(0.01)

    batcher.close()
    for request in (2, 3):
        callers[request].join(timeout=30)
        assert not callers[request].is_alive(), f"caller {request}, queued before the close, was left waiting"
        assert isinstance(outcomes[request], gr.Error) and "page was closed" in str(outcomes[request])
    late = outcome_within(30, batcher, 4)
    assert isinstance(late, gr.Error) and "page was closed" in str(late)
    assert 1 not in outcomes and batcher.thread.is_alive(), "the close did not wait for the running batch"

    release.set()
    callers[1].join(timeout=30)
    assert outcomes.get(1) == 2
    batcher.thread.join(timeout=30)
    assert not batcher.thread.is_alive()
    assert batches == [[1]]
    batcher.close()  # a second close is harmless


def test_closing_the_page_ends_its_captioner_thread_and_lets_go_of_the_model(captioner_dir, photo):
    """A closed page's caption-batches thread served on, holding the model, for the life of the process: one model
    per page built (tests, a notebook rebuilding the page). Gradio keeps a closed page referenced (FastAPI's caches
    hold its routes), so the model must be let go while the page object itself lives on."""
    from modeling_vitgpt2.applications.demo import Demo, build_page
    from modeling_vitgpt2.utils.errors import UserError

    url, page, _ = batched_page(captioner_dir, max_batch_size=2)
    model = weakref.ref(page.captioner.demo.model)
    thread = page.captioner.batcher.thread
    try:
        client = gradio_client.Client(url, verbose=False)
        assert caption_on_page(client, photo)[0]
        client.close()
    finally:
        page.close()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the caption-batches thread outlived its page"
    gc.collect()
    assert model() is None, "the closed page still holds its model"

    refused = outcome_within(30, page.captioner.caption, {"path": str(photo)}, 1, 12, 1.0, ["all"], "mean")
    assert isinstance(refused, gr.Error) and "page was closed" in str(refused)
    with pytest.raises(UserError, match="build a new page"):
        page.launch(prevent_thread_lock=True, quiet=True)

    # A page that was built but never launched: Gradio's own close does nothing for it, the thread still ends.
    unlaunched = build_page(Demo(*load_captioner(captioner_dir, device="cpu")), [], title="never launched")
    model, thread = weakref.ref(unlaunched.captioner.demo.model), unlaunched.captioner.batcher.thread
    unlaunched.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    gc.collect()
    assert model() is None


def outcome_within(seconds: float, function, *arguments):
    """`function(*arguments)`'s answer or error, from another thread; a call left waiting fails the test instead of
    hanging it."""
    outcomes = []
    caller = threading.Thread(target=lambda: outcomes.append(_outcome(function, *arguments)), daemon=True)
    caller.start()
    caller.join(timeout=seconds)
    assert outcomes, f"no answer within {seconds} s"
    return outcomes[0]


def _outcome(function, *arguments):
    try:
        return function(*arguments)
    except Exception as error:
        return error


def test_zero_shot_gives_clips_probabilities_per_template(client, tiny_clip, photo):
    templates = ["a photo of {object}.", "a drawing of {object}."]
    plot = client.predict(gradio_client.handle_file(str(photo)), "dog, cat, diagram", "\n".join(templates),
                          api_name="/zero_shot")
    rows = plot["value"]["data"] if "value" in plot else plot["data"]
    expected = class_probabilities([photo], ["dog", "cat", "diagram"], templates, clip=str(tiny_clip), ensemble=True,
                                   progress=False)
    shown = {(row[1], row[0]): row[2] for row in rows}  # (template, prompt) -> probability
    assert len(shown) == 3 * 3
    for template, probabilities in expected.items():
        label = "ensemble of the templates" if template == ENSEMBLE else template
        for name, value in zip(["dog", "cat", "diagram"], probabilities[0].tolist()):
            prompt = name if template == ENSEMBLE else template.replace("{object}", name)
            assert shown[(label, prompt)] == pytest.approx(value, abs=1e-5)
    with pytest.raises(gradio_client.exceptions.AppError, match="no {object} placeholder"):
        client.predict(gradio_client.handle_file(str(photo)), "dog, cat", "a photo", api_name="/zero_shot")
    with pytest.raises(gradio_client.exceptions.AppError, match="Cat, cat: each class name once"):
        client.predict(gradio_client.handle_file(str(photo)), "cat, dog, Cat", "a photo of {object}.",
                       api_name="/zero_shot")


def test_without_the_default_model_it_says_in_one_line_how_to_make_it(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "app.py")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2
    # The last line (libraries imported before it may warn about themselves first).
    assert result.stderr.strip().splitlines()[-1] == (
        "app.py: error: no model at outputs/synthetic-default: make it with `python train.py` (a few minutes on 2 "
        "CPU cores), or pass --model a model folder, adapter folder or Hub id"
    )


def test_a_hub_id_is_downloaded_and_loaded_like_its_folder(captioner_dir, monkeypatch, capsys):
    from modeling_vitgpt2.applications import demo
    from modeling_vitgpt2.inference import loading

    asked = []
    monkeypatch.setattr(loading, "snapshot_download", lambda repo_id: asked.append(repo_id) or str(captioner_dir))
    page = demo.load_demo(demo.parse_args(["--model", "someone/vitgpt2-lora"]))
    assert asked == ["someone/vitgpt2-lora"] and page.layers == [0, 1]
    assert "[app] loaded someone/vitgpt2-lora" in capsys.readouterr().out


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (`apt-get install -y chromium`; .ci/run installs it)")
    return path


def test_in_a_real_browser(page, hostile_files, tmp_path):
    url, photo = page
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs the [test] extra")
    browser_path = chromium()
    with playwright.sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=browser_path, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            tab = context.new_page()
            tab.goto(url, wait_until="networkidle", timeout=60_000)
            tab.locator("#caption-image input[type=file]").set_input_files(str(photo))
            tab.wait_for_function("document.querySelector('#caption-text textarea').value.trim().length > 0",
                                   timeout=60_000)
            caption = tab.locator("#caption-text textarea").input_value()
            panels = tab.locator("#attention-panels img")
            playwright.expect(panels).to_have_count(len(caption.split()), timeout=30_000)
            tab.wait_for_function("[...document.querySelectorAll('#attention-panels img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
            for index in range(panels.count()):
                box = panels.nth(index).bounding_box()
                assert box is not None and box["width"] > 0 and box["height"] > 0
            screenshot = tmp_path / "demo_page.png"
            tab.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copyfile(screenshot, os.environ[SCREENSHOT_ENV])

            # Clicking a word's panel shows its map large, named by the word.
            thumbnail = panels.nth(0).bounding_box()
            panels.nth(0).click()
            large = tab.locator("#attention-panels [data-testid='detailed-image']")
            playwright.expect(large).to_have_attribute("alt", caption.split()[0], timeout=10_000)
            assert large.bounding_box()["width"] > 2 * thumbnail["width"]

            # A text file named like a photo: the page says so, and the next upload is captioned again.
            tab.get_by_label("Remove Image").click()
            tab.locator("#caption-image input[type=file]").set_input_files(str(hostile_files["not-an-image"]))
            toast = tab.locator("[data-testid='toast-body']")
            playwright.expect(toast).to_contain_text("holiday.jpg is not an image this page can read",
                                                     timeout=30_000)
            tab.get_by_label("Remove Image").click()
            playwright.expect(tab.locator("#caption-text textarea")).to_have_value("", timeout=30_000)
            tab.locator("#caption-image input[type=file]").set_input_files(str(photo))
            playwright.expect(tab.locator("#caption-text textarea")).to_have_value(caption, timeout=60_000)
        finally:
            context.close()
    with Image.open(screenshot) as picture:
        assert picture.width == 1280 and picture.height >= 1000
