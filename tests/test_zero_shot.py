"""CLIP zero-shot classification agrees with a direct argmax, and bad inputs fail before anything is written."""

import json

import pytest
import torch
from PIL import Image

from conftest import direct_embeddings
from modeling_vitgpt2.evaluation.clip_score import load_clip
from modeling_vitgpt2.evaluation.zero_shot import (
    ENSEMBLE,
    class_probabilities,
    classify_images,
    format_predictions_csv,
    load_id2label,
    read_labels_file,
    write_predictions_csv,
    zero_shot_folder,
)
from modeling_vitgpt2.utils.io import InvalidJSONError, read_json, write_json_atomic, write_text_atomic

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TEMPLATES = ["This is a photo of {object}", "This is not a photo of {object}", "No {object}, no score."]
# class id -> (class name, source images under ../shared/data/real_images)
CLASSES = {
    0: ("astronaut", ["skimage/astronaut.png"]),
    1: ("cat", ["skimage/chelsea.png", "clipscore_example/image1.jpg"]),
    2: ("cup of coffee", ["skimage/coffee.png"]),
    3: ("rocket", ["skimage/rocket.jpg"]),
    4: ("motorcycle", ["skimage/motorcycle_right.png"]),
    5: ("horse", ["skimage/horse.png"]),
    6: ("page of text", ["skimage/page.png"]),
    7: ("dog", ["clipscore_example/image2.jpg"]),
}


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return load_clip(tiny_clip, device="cpu")


@pytest.fixture(scope="module")
def course_data(shared_data, tmp_path_factory):
    """The course layout: 32x32 RGB PNGs named {class_id}_{n}.png and an id2label.json, in a temporary folder."""
    root = tmp_path_factory.mktemp("p1_data")
    images = root / "val"
    images.mkdir()
    for class_id, (_, sources) in CLASSES.items():
        for n, source in enumerate(sources):
            picture = Image.open(shared_data / "real_images" / source).convert("RGB").resize((32, 32))
            picture.save(images / f"{class_id}_{n}.png")
    id2label = root / "id2label.json"
    id2label.write_text(json.dumps({str(class_id): name for class_id, (name, _) in CLASSES.items()}))
    return images, id2label


def _direct_predictions(tiny_clip, images, class_names, templates, ensemble=False):
    """Class indices by hand: unit image and prompt embeddings, then argmax of the cosine."""
    paths = sorted(images.iterdir())
    prompts = [template.replace("{object}", name) for template in templates for name in class_names]
    image_embeddings, text_embeddings = direct_embeddings(tiny_clip, paths, prompts)
    per_template = dict(zip(templates, text_embeddings.split(len(class_names))))
    if ensemble:
        mean = torch.stack(list(per_template.values())).mean(dim=0)
        per_template = {ENSEMBLE: mean / mean.norm(dim=-1, keepdim=True)}
    return {name: (image_embeddings @ text.T).argmax(dim=-1).tolist() for name, text in per_template.items()}


def test_predictions_and_accuracy_match_a_direct_argmax(tiny_clip, clip, course_data):
    images, id2label_path = course_data
    result = zero_shot_folder(images, id2label_path, TEMPLATES, clip=clip, batch_size=4, progress=False)

    class_names = [name for name, _ in CLASSES.values()]
    expected = _direct_predictions(tiny_clip, images, class_names, TEMPLATES)
    truth = [int(name.split("_")[0]) for name in result.filenames]
    assert any(len(set(chosen)) > 1 for chosen in expected.values())  # premise: not one class for every image
    assert result.filenames == sorted(path.name for path in images.iterdir())
    assert result.labels == truth
    assert set(result.predictions) == set(TEMPLATES)
    for template in TEMPLATES:
        predicted = [list(CLASSES)[index] for index in expected[template]]
        assert result.predictions[template] == predicted
        assert result.accuracy[template] == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / len(truth))


def test_ensemble_matches_the_direct_mean_of_template_embeddings(tiny_clip, clip, course_data):
    images, id2label_path = course_data
    result = zero_shot_folder(images, id2label_path, TEMPLATES, clip=clip, ensemble=True, progress=False)
    class_names = [name for name, _ in CLASSES.values()]
    expected = _direct_predictions(tiny_clip, images, class_names, TEMPLATES, ensemble=True)[ENSEMBLE]
    assert result.predictions[ENSEMBLE] == [list(CLASSES)[index] for index in expected]
    assert set(result.accuracy) == set(TEMPLATES) | {ENSEMBLE}


def test_probabilities_are_clips_own_softmax_and_agree_with_the_predictions(tiny_clip, clip, course_data):
    from transformers import CLIPModel, CLIPProcessor

    images, _ = course_data
    paths = sorted(images.iterdir())
    class_names = [name for name, _ in CLASSES.values()]
    probabilities = class_probabilities(paths, class_names, TEMPLATES[:2], clip=clip, ensemble=True, progress=False)
    predictions = classify_images(paths, class_names, TEMPLATES[:2], clip=clip, ensemble=True, progress=False)

    # The reference: CLIPModel's own forward, logits_per_image over one template's prompts.
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    pictures = [Image.open(path).convert("RGB") for path in paths]
    for template in TEMPLATES[:2]:
        inputs = processor(text=[template.replace("{object}", name) for name in class_names], images=pictures,
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = model(**inputs).logits_per_image.softmax(dim=-1)
        torch.testing.assert_close(probabilities[template], expected, atol=1e-5, rtol=1e-4)
    for name, values in probabilities.items():
        torch.testing.assert_close(values.sum(dim=-1), torch.ones(len(paths)))
        assert values.argmax(dim=-1).tolist() == predictions[name]
    assert set(probabilities) == {*TEMPLATES[:2], ENSEMBLE}


def test_labels_file_gives_the_same_ground_truth_as_course_names(clip, course_data, tmp_path):
    images, id2label_path = course_data
    by_name = zero_shot_folder(images, id2label_path, TEMPLATES[:1], clip=clip, progress=False)
    csv_labels = tmp_path / "labels.csv"
    write_predictions_csv(csv_labels, by_name.filenames, by_name.labels)
    json_labels = tmp_path / "labels.json"
    write_json_atomic(json_labels, dict(zip(by_name.filenames, by_name.labels)))
    for labels_file in (csv_labels, json_labels):
        result = zero_shot_folder(images, id2label_path, TEMPLATES[:1], labels_file=labels_file, clip=clip,
                                  progress=False)
        assert result.labels == by_name.labels and result.accuracy == by_name.accuracy

    unlabelled = zero_shot_folder(images, id2label_path, TEMPLATES[:1], labels_from_filenames=False, clip=clip,
                                  progress=False)
    assert unlabelled.labels is None and unlabelled.accuracy == {TEMPLATES[0]: None}
    assert unlabelled.predictions == by_name.predictions


def test_csv_output_format(tmp_path):
    assert format_predictions_csv(["0_0.png", "3_1.png"], [0, 7]) == "filename,label\n0_0.png,0\n3_1.png,7\n"
    written = write_predictions_csv(tmp_path / "out" / "pred.csv", ["a.png"], [2])
    assert written.read_text() == "filename,label\na.png,2\n"
    with pytest.raises(ValueError, match="2 file names but 1 predictions"):
        write_predictions_csv(tmp_path / "bad.csv", ["a.png", "b.png"], [1])
    assert not (tmp_path / "bad.csv").exists()


def _run_like_a_cli(output_dir, **kwargs):
    """What a command-line tool does: compute everything first, then write one CSV per template."""
    result = zero_shot_folder(progress=False, **kwargs)
    for index, template in enumerate(result.predictions):
        write_predictions_csv(output_dir / f"template_{index}.csv", result.filenames, result.predictions[template])
    return result


def _bad_inputs(course_data, tmp_path):
    images, id2label_path = course_data
    stray = tmp_path / "stray"
    stray.mkdir()
    for name in ("0_0.png", "99_0.png"):
        Image.new("RGB", (32, 32)).save(stray / name)
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    Image.new("RGB", (32, 32)).save(unnamed / "cat.png")
    broken_json = tmp_path / "id2label_broken.json"
    broken_json.write_text('{\n  "0": "astronaut",\n  "1": cat\n}')
    bad_key = tmp_path / "id2label_bad_key.json"
    bad_key.write_text('{"zero": "astronaut"}')
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("filename,label\n0_0.png,0\n1_0.png,42\n")
    return [
        (dict(image_dir=images, id2label=id2label_path, templates=[]), ValueError, "no prompt templates"),
        (dict(image_dir=images, id2label=id2label_path, templates=["a photo of a cat"]), ValueError,
         r"'a photo of a cat' has no \{object\}"),
        (dict(image_dir=stray, id2label=id2label_path, templates=TEMPLATES), ValueError, "'99_0.png'.*class id 99"),
        (dict(image_dir=unnamed, id2label=id2label_path, templates=TEMPLATES), ValueError, "'cat.png'.*labels file"),
        (dict(image_dir=images, id2label=id2label_path, templates=TEMPLATES, labels_file=bad_labels), ValueError,
         "labels.csv, line 3: class id 42"),
        (dict(image_dir=tmp_path / "nowhere", id2label=id2label_path, templates=TEMPLATES), FileNotFoundError,
         "image folder not found"),
        (dict(image_dir=images, id2label=broken_json, templates=TEMPLATES), InvalidJSONError,
         "id2label_broken.json is not valid JSON.*line 3, column 8"),
        (dict(image_dir=images, id2label=bad_key, templates=TEMPLATES), InvalidJSONError,
         "id2label_bad_key.json: key 'zero' is not an integer"),
    ]


def test_bad_inputs_fail_before_any_output_is_written(clip, course_data, tmp_path):
    for kwargs, error, message in _bad_inputs(course_data, tmp_path):
        output_dir = tmp_path / "predictions"
        output_dir.mkdir(exist_ok=True)
        with pytest.raises(error, match=message):
            _run_like_a_cli(output_dir, clip=clip, **kwargs)
        assert list(output_dir.iterdir()) == [], f"{message}: a file was written before the error"


def test_labels_file_must_match_the_images(course_data, tmp_path):
    images, id2label_path = course_data
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"0_0.png": 0, "ghost.png": 1}))
    with pytest.raises(ValueError, match="without a label.*'1_0.png'.*missing images.*'ghost.png'"):
        zero_shot_folder(images, id2label_path, TEMPLATES, labels_file=partial, clip="never/loaded", progress=False)


def test_id2label_and_labels_readers(course_data, tmp_path):
    _, id2label_path = course_data
    id2label = load_id2label(id2label_path)
    assert id2label == {class_id: name for class_id, (name, _) in CLASSES.items()}
    empty_name = tmp_path / "empty_name.json"
    empty_name.write_text('{"0": ""}')
    with pytest.raises(InvalidJSONError, match="empty_name.json: field '0'"):
        load_id2label(empty_name)
    not_object = tmp_path / "list.json"
    not_object.write_text('["cat", "dog"]')
    with pytest.raises(InvalidJSONError, match="list.json must hold a non-empty JSON object"):
        load_id2label(not_object)
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("0_0.png,0\n")
    with pytest.raises(ValueError, match="'filename,label' header"):
        read_labels_file(no_header, id2label)
    not_int = tmp_path / "labels.json"
    not_int.write_text('{"0_0.png": "cat"}')
    with pytest.raises(ValueError, match="labels.json, field '0_0.png': label 'cat' is not an integer"):
        read_labels_file(not_int, id2label)
    for value, shown in (("0.9", "0.9"), ("true", "True")):  # int() would have read them as 0 and 1
        not_int.write_text(f'{{"0_0.png": {value}}}')
        with pytest.raises(ValueError, match=f"field '0_0.png': label {shown} is not an integer"):
            read_labels_file(not_int, id2label)
    twins = tmp_path / "twins.json"
    twins.write_text('{"0": "crane", "5": "Crane "}')  # ImageNet names two classes "crane"
    with pytest.raises(InvalidJSONError, match="classes 0 and 5 are both named 'Crane '"):
        load_id2label(twins)


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "result.json"
    write_json_atomic(target, {"score": 0.5, "caption": "caf\u00e9"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"score": 0.5, "caption": "caf\u00e9"}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"not serialisable": object()})
    assert json.loads(target.read_text(encoding="utf-8"))["score"] == 0.5  # the old file is untouched
    write_text_atomic(target, "replaced")
    assert target.read_text() == "replaced"
    assert [path.name for path in tmp_path.iterdir()] == ["result.json"]
    with pytest.raises(IsADirectoryError):
        write_text_atomic(tmp_path, "x")


def test_read_json_names_the_file_line_and_column(tmp_path):
    broken = tmp_path / "predictions.json"
    broken.write_text('{"a": "x",\n "b": "y",}\n')
    with pytest.raises(InvalidJSONError, match=r"predictions file .*predictions.json is not valid JSON.*line 2"):
        read_json(broken, "predictions file")
    with pytest.raises(FileNotFoundError, match="predictions file not found"):
        read_json(tmp_path / "absent.json", "predictions file")
    valid = tmp_path / "ok.json"
    valid.write_text("\ufeff[1]", encoding="utf-8")  # a byte-order mark from some editors is tolerated
    assert read_json(valid) == [1]
