"""BLEU and ROUGE-L equal coco-caption's (pycocoevalcap) on real captions; METEOR runs its jar or says why not;
diversity measures what its names say; one registry feeds every consumer."""

import re
from pathlib import Path

import pytest

from modeling_vitgpt2.evaluation import metrics
from modeling_vitgpt2.evaluation.cider import corpus_cider, ptb_tokenize_lines
from modeling_vitgpt2.evaluation.metrics import METRICS, compute_metrics, corpus_bleu, corpus_rouge_l, metric_names


def _flickr8k(shared_data: Path) -> tuple[dict, dict]:
    captions = {}
    for line in (shared_data / "flickr8k" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        image, index, caption = re.match(r"^(\S+?)#(\d+)\s+(.*)$", line).groups()
        captions.setdefault(image, {})[int(index)] = caption
    predictions = {image: by_index[0] for image, by_index in captions.items()}
    references = {image: [by_index[k] for k in range(1, 5)] for image, by_index in captions.items()}
    return predictions, references


def test_bleu_and_rouge_l_equal_pycocoevalcap_on_flickr8k(shared_data):
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu")
    rouge_module = pytest.importorskip("pycocoevalcap.rouge.rouge")
    predictions, references = _flickr8k(shared_data)
    names = list(predictions)
    tokenized = ptb_tokenize_lines([predictions[name] for name in names])
    flat = iter(ptb_tokenize_lines([ref for name in names for ref in references[name]]))
    tokenized_refs = [[next(flat) for _ in references[name]] for name in names]
    gts = dict(zip(names, tokenized_refs))
    res = {name: [caption] for name, caption in zip(names, tokenized)}

    expected_bleu, expected_bleu_per_image = bleu_module.Bleu(4).compute_score(gts, res, verbose=0)
    expected_rouge, expected_rouge_per_image = rouge_module.Rouge().compute_score(gts, res)
    bleu, bleu_per_image = corpus_bleu(tokenized, tokenized_refs)
    rouge, rouge_per_image = corpus_rouge_l(tokenized, tokenized_refs)

    assert bleu == pytest.approx(expected_bleu, abs=1e-6)
    assert 0.2 < bleu[3] < bleu[0] < 0.7  # real, not degenerate: BLEU-4 0.212, BLEU-1 0.635
    for ours, theirs in zip(bleu_per_image, expected_bleu_per_image):
        assert ours == pytest.approx(theirs, abs=1e-6)
    assert rouge == pytest.approx(float(expected_rouge), abs=1e-6)
    assert rouge_per_image == pytest.approx(list(expected_rouge_per_image), abs=1e-6)

    # the registry path (raw captions in, PTB tokenization inside) gives the same corpus values
    subset = names[:300]
    result = compute_metrics({n: predictions[n] for n in subset}, {n: references[n] for n in subset},
                             metrics=["bleu", "rouge_l", "cider"])
    sub_gts = {n: gts[n] for n in subset}
    sub_res = {n: res[n] for n in subset}
    assert [result.values[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(
        bleu_module.Bleu(4).compute_score(sub_gts, sub_res, verbose=0)[0], abs=1e-6)
    assert result.values["rouge_l"] == pytest.approx(rouge_module.Rouge().compute_score(sub_gts, sub_res)[0], abs=1e-6)
    assert result.values["cider"] == pytest.approx(
        corpus_cider({n: predictions[n] for n in subset}, {n: references[n] for n in subset}).score, abs=1e-12)


def test_meteor_runs_the_reference_jar_or_is_skipped_with_the_reason(monkeypatch):
    predictions = {"a": "a dog runs on the grass", "b": "a red car"}
    references = {"a": ["a dog is running on the grass", "the dog runs"], "b": ["a red car parked", "red car"]}
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    result = compute_metrics(predictions, references, metrics=["meteor", "cider"])
    assert "meteor" not in result.values and "Java" in result.skipped["meteor"]
    assert "cider" in result.values  # one skipped metric does not stop the others
    monkeypatch.undo()

    pytest.importorskip("pycocoevalcap.meteor.meteor")
    if metrics.shutil.which("java") is None:
        pytest.skip("no java on PATH")
    result = compute_metrics(predictions, references, metrics=["meteor"])
    # what coco-caption's own Meteor wrapper gives on these captions (checked against a direct jar run)
    direct = metrics._meteor_scorer(__import__("pycocoevalcap.meteor.meteor", fromlist=["Meteor"]).Meteor)
    expected, _ = direct.compute_score({"0": references["a"], "1": ["a red car parked", "red car"]},
                                       {"0": [predictions["a"]], "1": [predictions["b"]]})
    assert result.values["meteor"] == pytest.approx(expected, abs=1e-9)
    assert 0 < result.values["meteor"] < 1 and set(result.per_image["a"]) == {"meteor"}


def test_diversity_counts_words_pairs_copies_and_repeats():
    predictions = {"1": "A dog runs.", "2": "a dog runs", "3": "a cat on a mat on a mat", "4": "Two birds"}
    references = {key: ["anything at all"] for key in predictions}
    result = compute_metrics(predictions, references, metrics=["diversity", "copied"],
                             training_captions=["a dog runs!", "some other caption"])
    # words: a dog runs | a dog runs | a cat on a mat on a mat | two birds -> 16 words, 8 distinct
    assert result.values["vocabulary_size"] == 8
    assert result.values["distinct_1"] == pytest.approx(8 / 16)
    # bigrams: 2 + 2 + 7 + 1 = 12; distinct: (a,dog) (dog,runs) (a,cat) (cat,on) (on,a) (a,mat) (mat,on) (two,birds)
    assert result.values["distinct_2"] == pytest.approx(8 / 12)
    assert result.values["repeated_3gram"] == pytest.approx(1 / 4)  # "on a mat" twice
    assert result.values["copied_from_training"] == pytest.approx(2 / 4)  # PTB tokenization ignores case and "."

    without = compute_metrics(predictions, references, metrics=["copied"])
    assert "training captions" in without.skipped["copied"]


def test_one_registry_names_every_value_and_rejects_unknown_metrics():
    names = metric_names()
    assert list(names)[:6] == ["cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"]
    assert {"meteor", "clip_score", "ref_clip_score", "distinct_1", "copied_from_training"} <= set(names)
    assert all(metric.reference for metric in METRICS.values())
    # training evaluation leaves out only what is too slow to run every epoch
    assert [name for name, metric in METRICS.items() if not metric.during_training] == ["meteor"]
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics({"a": "x"}, {"a": ["x"]}, metrics=["bleurt"])
