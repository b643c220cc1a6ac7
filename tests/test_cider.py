"""CIDEr-D without Java agrees with coco-caption's Java pipeline (pycocoevalcap) and with published values."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_vitgpt2.evaluation.cider import CiderResult, corpus_cider, ptb_tokenize, ptb_tokenize_lines

METRICS_DIR = Path(__file__).resolve().parents[1] / "evaluate_metrics"

# Captions that exercise the tokenizer rules real captions meet; the expected strings are the Java tokenizer's
# output (CoreNLP 3.4.1 via pycocoevalcap), checked when this file was written and again live when Java is present.
TOKENIZER_CASES = [
    ("A dog's ball isn't red; it's \"blue\" (mostly).", "a dog 's ball is n't red it 's blue -lrb- mostly -rrb-"),
    ("Mr. Smith and Dr. Jones went to the U.S. on Jan. 5th, e.g. yesterday etc.",
     "mr. smith and dr. jones went to the u.s. on jan. 5th e.g. yesterday etc."),
    ("They're can't won't we'll I'd you've gonna cannot",
     "they 're ca n't wo n't we 'll i 'd you 've gon na can not"),
    ("A woman in a t-shirt -- running fast!!! Really?!", "a woman in a t-shirt running fast !!! really ?!"),
    ("\u201cCurly quotes\u201d and \u2018single ones\u2019 don\u2019t vanish\u2026",
     "curly quotes and single ones do n't vanish"),
    ("A 5-year-old boy holds a $5 bill, 3.5 kg and 1/2 a cake at 10:30 a.m.",
     "a 5-year-old boy holds a $ 5 bill 3.5 kg and 1/2 a cake at 10:30 a.m."),
    ("The dogs' toys [red] {blue} & more: see www.example.com or http://example.com/a.",
     "the dogs toys -lsb- red -rsb- -lcb- blue -rcb- & more see www.example.com or http://example.com/a"),
    ("A man \u2014 in a hat \u2014 rides a bike ... slowly.", "a man in a hat rides a bike slowly"),
    ("two people , one dog .", "two people one dog"),
    ("o'clock rock 'n' roll '90s y'all ma'am O'Neil", "o'clock rock 'n' roll '90s y' all ma'am o'neil"),
    ("A CAT ON A MAT.", "a cat on a mat"),
    ("caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00bd 60\u00b0 \U0001F600",  # emoji: deleted like Java does
     "caf\u00e9 na\u00efve r\u00e9sum\u00e9 1/2 60 \u00b0"),
    ("", ""),
    ("   ", ""),
]

# More captions for the live comparison with Java only (their expected output is whatever Java says).
JAVA_ONLY_CASES = [
    "A man stands in front of the U.S. Capitol. The sky is blue.",
    "'Quoted' words, ``latex'' quotes and &quot;entities&quot; &amp; more &lt;3",
    "Two dogs (a lab and a pug) play; one's wet, the other's dry.",
    "Is that a cat?! No -- it's a fox... I think.",
    "A sign reads \"No parking 8am-6pm Mon.-Fri.\"",
    "A woman holds a 12-pack of Coca-Cola and a bag of M&Ms.",
    "3 kids, 2 dogs & 1 cat on a 4x4 truck; 100% fun :)",
    "St. Patrick's Day parade on 5th Ave. in N.Y.C.",
    "The boy's mom's car isn't here, y'know.",
    "e-mail me at someone@example.com or visit www.example.org/path/",
    "A. Lincoln's statue; U.S.A. flag; a.k.a. Honest Abe.",
    "Rock'n'roll band plays at the '80s party... Awesome!!!",
    "\u00abGuillemets\u00bb and \u201elow quotes\u201d and \u2013 en dash \u2013",
    "snowboarder in mid-air   with\ttabs and  double  spaces",
    "x-ray of a 10-year-old's arm / hand, 2nd of 3",
]


def _read_flickr8k(path: Path) -> dict:
    captions = {}
    line_format = re.compile(r"^(\S+?)#(\d+)\s+(.*)$")  # "<image>.jpg#<k>", a tab (sometimes a space), caption
    for line in path.read_text(encoding="utf-8").splitlines():
        match = line_format.match(line)
        assert match, f"unexpected line in {path}: {line!r}"
        image, index, caption = match.groups()
        captions.setdefault(image, {})[int(index)] = caption
    return captions


@pytest.fixture(scope="module")
def flickr8k(shared_data):
    """Caption #0 of each image as the prediction, #1-#4 as references (8,092 images)."""
    captions = _read_flickr8k(shared_data / "flickr8k" / "Flickr8k.token.txt")
    predictions = {image: by_index[0] for image, by_index in captions.items()}
    references = {image: [by_index[k] for k in range(1, 5)] for image, by_index in captions.items()}
    return predictions, references


def _java_tools():
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH; the reference CIDEr needs it")
    tokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    return tokenizer.PTBTokenizer(), cider.Cider()


# coco-caption's own pipeline, run in a child process so that it overlaps with the Python implementation's run
# (pycocoevalcap's Cider alone takes about 10 s on Flickr8k).
_JAVA_REFERENCE_SCRIPT = """
import json, sys
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
predictions, references = json.load(open(sys.argv[1], encoding="utf-8"))
tokenizer = PTBTokenizer()
res = tokenizer.tokenize({image: [{"caption": caption}] for image, caption in predictions.items()})
gts = tokenizer.tokenize({image: [{"caption": ref} for ref in refs] for image, refs in references.items()})
score, per_image = Cider().compute_score(gts, res)
json.dump({"res": res, "gts": gts, "score": float(score), "per_image": dict(zip(gts, map(float, per_image)))},
          open(sys.argv[2], "w", encoding="utf-8"))
"""


class _JavaReferenceRun:
    def __init__(self, predictions, references, folder):
        inputs, self.output = folder / "inputs.json", folder / "java_reference.json"
        inputs.write_text(json.dumps([predictions, references]), encoding="utf-8")
        self.process = subprocess.Popen([sys.executable, "-c", _JAVA_REFERENCE_SCRIPT, str(inputs), str(self.output)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._result = None

    def result(self) -> dict:
        if self._result is None:
            _, stderr = self.process.communicate(timeout=600)
            assert self.process.returncode == 0, f"the Java reference run failed:\n{stderr}"
            self._result = json.loads(self.output.read_text(encoding="utf-8"))
        return self._result


@pytest.fixture(scope="module")
def java_flickr8k(flickr8k, tmp_path_factory):
    """Started here, collected with `.result()`: request it BEFORE `python_flickr8k` so the two runs overlap."""
    _java_tools()
    run = _JavaReferenceRun(*flickr8k, tmp_path_factory.mktemp("java_cider"))
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.communicate()


@pytest.fixture(scope="module")
def python_flickr8k(flickr8k):
    return corpus_cider(*flickr8k)


def test_flickr8k_matches_java_reference(java_flickr8k, python_flickr8k):
    java = java_flickr8k.result()
    difference = abs(python_flickr8k.score - java["score"])
    print(f"Flickr8k CIDEr-D: python {python_flickr8k.score!r}, java {java['score']!r}, |diff| {difference:.3g}")
    assert difference < 1e-4
    assert list(python_flickr8k.per_image) == list(java["per_image"])
    worst = max(abs(python_flickr8k.per_image[image] - score) for image, score in java["per_image"].items())
    assert worst < 1e-9


def test_flickr8k_tokenization_matches_java_caption_by_caption(flickr8k, java_flickr8k):
    predictions, references = flickr8k
    java = java_flickr8k.result()
    assert ptb_tokenize_lines(list(predictions.values())) == [java["res"][image][0] for image in predictions]
    flat_references = [ref for refs in references.values() for ref in refs]
    assert ptb_tokenize_lines(flat_references) == [ref for image in references for ref in java["gts"][image]]


def test_flickr8k_published_value(python_flickr8k):
    assert round(python_flickr8k.score, 5) == 0.76986


def test_tricky_captions_match_java():
    tokenizer, _ = _java_tools()
    captions = [caption for caption, _ in TOKENIZER_CASES] + JAVA_ONLY_CASES
    java = tokenizer.tokenize({str(index): [{"caption": caption}] for index, caption in enumerate(captions)})
    assert ptb_tokenize_lines(captions) == [java[str(index)][0] for index in range(len(captions))]


@pytest.mark.parametrize("caption, expected", TOKENIZER_CASES)
def test_ptb_tokenize(caption, expected):
    assert ptb_tokenize(caption) == expected


def test_ptb_tokenize_lines_keeps_one_output_per_caption_even_with_line_breaks_inside():
    assert ptb_tokenize_lines(["a dog\non grass", "a cat\r\nsleeps", ""]) == ["a dog on grass", "a cat sleeps", ""]


def test_ptb_tokenize_rejects_non_strings():
    with pytest.raises(TypeError, match="captions must be strings"):
        ptb_tokenize_lines(["a dog", None])


def _clipscore_example(shared_data):
    folder = shared_data / "real_images" / "clipscore_example"
    references = json.loads((folder / "refs.json").read_text())
    good = json.loads((folder / "good_captions.json").read_text())
    bad = json.loads((folder / "bad_captions.json").read_text())
    return references, good, bad


def test_clipscore_example_published_values(shared_data):
    references, good, bad = _clipscore_example(shared_data)
    assert round(corpus_cider(good, references).score, 4) == 0.5637
    assert round(corpus_cider(bad, references).score, 4) == 0.2790


def test_toy_example_from_the_data_readme():
    result = corpus_cider(["i am a boy", "she is a girl"], [["am i a boy ?"], ["is she a girl ?"]])
    assert result.score == pytest.approx(3.3333333, abs=1e-7)
    assert result.per_image == pytest.approx([3.3333333, 3.3333333], abs=1e-7)


def test_result_unpacks_and_keeps_the_input_shape():
    score, per_image = corpus_cider({"b": "a dog", "a": "a cat"}, {"a": ["a cat"], "b": ["a dog runs"]})
    assert list(per_image) == ["a", "b"]  # ordered like the references
    assert score == pytest.approx(sum(per_image.values()) / 2)
    result = corpus_cider(["a dog", "a cat"], [["a dog runs"], ["a cat"]])
    assert isinstance(result, CiderResult) and isinstance(result.per_image, list)


def test_pretokenized_input_skips_the_tokenizer():
    pretokenized = corpus_cider(["a dog 's ball", "a cat"], [["the dog 's ball"], ["a cat sleeps"]], tokenize=False)
    raw = corpus_cider(["A dog's ball.", "A cat."], [["The dog's ball."], ["A cat sleeps."]])
    assert pretokenized.score > 0 and pretokenized == raw
    # without the tokenizer, "ball." and "ball" are different words
    assert corpus_cider(["A dog's ball.", "A cat."], [["The dog's ball"], ["A cat sleeps"]], tokenize=False).score \
        < raw.score


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no predictions"):
        corpus_cider({}, {})
    with pytest.raises(ValueError, match="no predictions"):
        corpus_cider([], [])
    with pytest.raises(ValueError, match="'img2' has no reference captions"):
        corpus_cider({"img1": "a dog", "img2": "a cat"}, {"img1": ["a dog"], "img2": []})
    with pytest.raises(ValueError) as error:
        corpus_cider({"img1": "a dog", "extra.jpg": "a cat"}, {"img1": ["a dog"], "lost.jpg": ["a cat"]})
    assert "'lost.jpg'" in str(error.value) and "'extra.jpg'" in str(error.value)
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        corpus_cider(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="list of strings"):
        corpus_cider(["a dog"], ["a dog"])  # references must be a list per image


@pytest.fixture(scope="module")
def offline_evaluate():
    """`evaluate` in offline mode (as HF_EVALUATE_OFFLINE=1 sets it): loading a local module may fetch nothing."""
    evaluate = pytest.importorskip("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_EVALUATE_OFFLINE", "1")
        patch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        yield evaluate


@pytest.fixture(scope="module")
def cider_module(offline_evaluate):
    return offline_evaluate.load(str(METRICS_DIR / "cider"))


def test_evaluate_module_gives_the_same_values(cider_module, shared_data, flickr8k):
    toy = cider_module.compute(predictions=["i am a boy", "she is a girl"],
                               references=[["am i a boy ?"], ["is she a girl ?"]])
    assert toy["cider"] == pytest.approx(3.3333333, abs=1e-7)
    single = cider_module.compute(predictions=["i am a boy", "she is a girl"],
                                  references=["am i a boy ?", "is she a girl ?"])
    assert single["cider"] == toy["cider"]

    references, good, _ = _clipscore_example(shared_data)
    keys = list(references)
    example = cider_module.compute(predictions=[good[key] for key in keys],
                                   references=[references[key] for key in keys])
    assert round(example["cider"], 4) == 0.5637

    predictions, references = flickr8k
    subset = list(predictions)[:1000]
    expected = corpus_cider({key: predictions[key] for key in subset}, {key: references[key] for key in subset})
    result = cider_module.compute(predictions=[predictions[key] for key in subset],
                                  references=[references[key] for key in subset])
    assert result["cider"] == pytest.approx(expected.score, abs=1e-12)
    assert result["cider_per_image"] == pytest.approx(list(expected.per_image.values()), abs=1e-12)


def test_evaluate_module_loads_from_a_path_relative_to_the_repository(offline_evaluate, monkeypatch):
    monkeypatch.chdir(METRICS_DIR.parent)
    module = offline_evaluate.load("evaluate_metrics/cider")
    assert module.compute(predictions=["a dog"], references=[["a dog"]])["cider"] == 0.0  # one image: idf is 0
