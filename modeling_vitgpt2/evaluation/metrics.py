"""Caption metrics and their one registry, read by training evaluation, `eval.py score`, the study report and the
model card: adding a metric is one `CaptionMetric` in `METRICS`.

Every text metric sees the captions after the same PTB tokenization as CIDEr (`cider.ptb_tokenize_lines`, run once),
as coco-caption's `COCOEvalCap` does. BLEU and ROUGE-L are re-implemented here without Java, with coco-caption's
arithmetic (`pycocoevalcap.bleu.bleu_scorer`, `pycocoevalcap.rouge.rouge`), so they agree with it to rounding; METEOR
has no faithful pure-Python port (its paraphrase and stemming modules), so it runs pycocoevalcap's bundled
`meteor-1.5.jar` and is skipped, with the reason, where Java or pycocoevalcap is missing.

Diversity metrics exist because fine-tuned captioners collapse to a few stock captions, which CIDEr alone hides:
vocabulary size and distinct-1/2 (Li et al., 2016: distinct n-grams over all n-grams, corpus-wide), the share of
captions copied verbatim from the training captions, and the share of captions that repeat a word 3-gram.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .cider import _as_keyed, corpus_cider, ptb_tokenize_lines

__all__ = [
    "METRICS",
    "CaptionMetric",
    "MetricInputs",
    "MetricSkipped",
    "MetricsResult",
    "compute_metrics",
    "corpus_bleu",
    "corpus_rouge_l",
    "format_metric",
    "metric_names",
]

COUNT_VALUES = frozenset({"vocabulary_size"})
REPEATED_NGRAM = 3  # "a man a man" repeats a bigram naturally ("on the left ... on the right"), a 3-gram rarely
ROUGE_BETA = 1.2  # coco-caption's value (Rouge.beta)


class MetricSkipped(Exception):
    """Raised by a metric that cannot run on these inputs; the message says why and what would enable it."""


@dataclass(frozen=True)
class MetricInputs:
    """What a metric may read. Captions are aligned lists in `names` order; `tokenized_*` are PTB-tokenized."""

    names: list[str]
    predictions: list[str]
    references: list[list[str]]
    tokenized_predictions: list[str]
    tokenized_references: list[list[str]]
    tokenized_training_captions: frozenset[str] | None = None
    images: dict[str, object] | None = None  # name -> image file or PIL image, for image metrics
    clip: object = None  # a `clip_score.LoadedClip`, for CLIPScore
    clip_prefix: str = ""
    batch_size: int = 32
    progress: bool = False


class MetricValues(NamedTuple):
    corpus: dict[str, float]
    per_image: dict[str, list[float]] = {}  # value key -> one value per image, in `MetricInputs.names` order


@dataclass(frozen=True)
class CaptionMetric:
    """One registered metric: the values it reports (key -> display name, in table order), what it equals, how it
    is computed, and whether it is cheap enough to run at every training evaluation."""

    name: str
    values: dict[str, str]
    reference: str
    compute: Callable[[MetricInputs], MetricValues]
    during_training: bool = True


@dataclass
class MetricsResult:
    """Corpus values by key, per-image values by image then key, and `{metric name: why it was skipped}`."""

    values: dict[str, float] = field(default_factory=dict)
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# BLEU (pycocoevalcap.bleu: Papineni et al. with coco-caption's "closest" reference length and smoothing constants)


def _ngrams(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]],
                max_n: int = 4) -> tuple[list[float], list[list[float]]]:
    """BLEU-1..max_n of tokenized captions as coco-caption's `Bleu(4)` computes them.

    Returns `(corpus, per_image)`: `corpus[k]` is BLEU-(k+1) over the whole set (clipped counts and lengths summed
    over images, one brevity penalty), `per_image[k]` the sentence-level values coco-caption also returns.
    """
    small, tiny = 1e-9, 1e-15  # coco-caption's: a zero match count still gives a (tiny) finite score
    total_guess, total_correct = [0] * max_n, [0] * max_n
    total_test = total_reference = 0
    per_image: list[list[float]] = [[] for _ in range(max_n)]
    for prediction, refs in zip(predictions, references):
        words = prediction.split()
        reference_lengths, max_counts = [], Counter()
        for ref in refs:
            ref_words = ref.split()
            reference_lengths.append(len(ref_words))
            for ngram, count in _ngrams(ref_words, max_n).items():
                max_counts[ngram] = max(max_counts[ngram], count)
        test_length = len(words)
        # the reference length closest to the caption's; ties go to the shorter one
        reference_length = min((abs(length - test_length), length) for length in reference_lengths)[1]
        guess = [max(0, test_length - k + 1) for k in range(1, max_n + 1)]
        correct = [0] * max_n
        for ngram, count in _ngrams(words, max_n).items():
            correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), count)
        total_test += test_length
        total_reference += reference_length
        _accumulate_bleu(correct, guess, test_length, reference_length, per_image, small, tiny)
        for k in range(max_n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
    corpus: list[list[float]] = [[] for _ in range(max_n)]
    _accumulate_bleu(total_correct, total_guess, total_test, total_reference, corpus, small, tiny)
    return [values[0] for values in corpus], per_image


def _accumulate_bleu(correct, guess, test_length, reference_length, into: list[list[float]], small, tiny) -> None:
    """Appends BLEU-1..n (geometric means of the n-gram precisions, times the brevity penalty) to `into`."""
    product = 1.0
    for k in range(len(correct)):
        product *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        into[k].append(product ** (1.0 / (k + 1)))
    ratio = (test_length + tiny) / (reference_length + small)
    if ratio < 1:
        for k in range(len(correct)):
            into[k][-1] *= math.exp(1 - 1 / ratio)


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L (pycocoevalcap.rouge: LCS F-measure with beta 1.2 against the best-matching reference)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """Mean ROUGE-L of tokenized captions, and the per-image values, as coco-caption's `Rouge` computes them.

    Precision and recall are each the best over the references (not those of one best reference), and captions are
    split on single spaces, as coco-caption does.
    """
    scores = []
    for prediction, refs in zip(predictions, references):
        candidate = prediction.split(" ")
        precision = recall = 0.0
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, candidate)
            precision = max(precision, lcs / len(candidate))
            recall = max(recall, lcs / len(ref_tokens))
        if precision and recall:
            scores.append((1 + ROUGE_BETA ** 2) * precision * recall / (recall + ROUGE_BETA ** 2 * precision))
        else:
            scores.append(0.0)
    return math.fsum(scores) / len(scores), scores


# ---------------------------------------------------------------------------------------------------------------
# The registered metrics


def _cider(inputs: MetricInputs) -> MetricValues:
    result = corpus_cider(inputs.tokenized_predictions, inputs.tokenized_references, tokenize=False)
    return MetricValues({"cider": result.score}, {"cider": result.per_image})


def _bleu(inputs: MetricInputs) -> MetricValues:
    corpus, per_image = corpus_bleu(inputs.tokenized_predictions, inputs.tokenized_references)
    keys = [f"bleu_{n}" for n in range(1, len(corpus) + 1)]
    return MetricValues(dict(zip(keys, corpus)), dict(zip(keys, per_image)))


def _rouge_l(inputs: MetricInputs) -> MetricValues:
    mean, per_image = corpus_rouge_l(inputs.tokenized_predictions, inputs.tokenized_references)
    return MetricValues({"rouge_l": mean}, {"rouge_l": per_image})


def _meteor(inputs: MetricInputs) -> MetricValues:
    if shutil.which("java") is None:
        raise MetricSkipped("METEOR needs Java (the reference is meteor-1.5.jar): install a JRE, "
                            "e.g. `apt-get install default-jre-headless`")
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        raise MetricSkipped("METEOR runs pycocoevalcap's meteor-1.5.jar: `pip install pycocoevalcap==1.2`") from None
    keys = [str(index) for index in range(len(inputs.names))]
    # coco-caption feeds METEOR the PTB-tokenized captions; "|||" separates fields in the jar's protocol
    predictions = {key: [caption] for key, caption in zip(keys, inputs.tokenized_predictions)}
    references = {key: refs for key, refs in zip(keys, inputs.tokenized_references)}
    score, per_image = _meteor_scorer(Meteor).compute_score(references, predictions)
    return MetricValues({"meteor": float(score)}, {"meteor": [float(value) for value in per_image]})


@functools.lru_cache(maxsize=1)
def _meteor_scorer(meteor_class):
    # Starting the JVM and loading the paraphrase table takes most of METEOR's time (~20 s on 2 busy cores), so one
    # process serves every call; it ends with this process (its stdin closes).
    return meteor_class()


def _clip_score(inputs: MetricInputs) -> MetricValues:
    if inputs.clip is None or inputs.images is None:
        raise MetricSkipped("CLIPScore needs a CLIP model and the images (--clip_model and --images)")
    from .clip_score import clip_score

    images = {name: inputs.images[name] for name in inputs.names}
    captions = dict(zip(inputs.names, inputs.predictions))
    references = dict(zip(inputs.names, inputs.references))
    result = clip_score(images, captions, references, clip=inputs.clip, prefix=inputs.clip_prefix,
                        batch_size=inputs.batch_size, progress=inputs.progress)
    return MetricValues(
        {"clip_score": float(result.score), "ref_clip_score": float(result.ref_score)},
        {"clip_score": [result.per_image[name] for name in inputs.names],
         "ref_clip_score": [result.ref_per_image[name] for name in inputs.names]},
    )


def _has_repeated_ngram(words: Sequence[str], n: int) -> bool:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def _diversity(inputs: MetricInputs) -> MetricValues:
    captions = [caption.split() for caption in inputs.tokenized_predictions]
    unigrams = [word for words in captions for word in words]
    bigrams = [gram for words in captions for gram in zip(words, words[1:])]
    repeated = [_has_repeated_ngram(words, REPEATED_NGRAM) for words in captions]
    return MetricValues({
        "vocabulary_size": float(len(set(unigrams))),
        "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        f"repeated_{REPEATED_NGRAM}gram": sum(repeated) / len(repeated),
    })


def _copied(inputs: MetricInputs) -> MetricValues:
    if inputs.tokenized_training_captions is None:
        raise MetricSkipped("the share of captions copied from the training set needs the training captions "
                            "(eval.py score --train_annotations)")
    copied = [caption in inputs.tokenized_training_captions for caption in inputs.tokenized_predictions]
    return MetricValues({"copied_from_training": sum(copied) / len(copied)})


_COCO = "coco-caption (pycocoevalcap 1.2)"
METRICS: dict[str, CaptionMetric] = {metric.name: metric for metric in [
    CaptionMetric("cider", {"cider": "CIDEr"}, f"{_COCO} `Cider` (CIDEr-D, x10 scale)", _cider),
    CaptionMetric("bleu", {f"bleu_{n}": f"BLEU-{n}" for n in range(1, 5)}, f"{_COCO} `Bleu(4)`", _bleu),
    CaptionMetric("rouge_l", {"rouge_l": "ROUGE-L"}, f"{_COCO} `Rouge`", _rouge_l),
    CaptionMetric("meteor", {"meteor": "METEOR"}, f"{_COCO} `Meteor` (meteor-1.5.jar, needs Java)", _meteor,
                  during_training=False),  # a JVM start and the paraphrase table per call
    CaptionMetric("clip_score", {"clip_score": "CLIPScore", "ref_clip_score": "RefCLIPScore"},
                  "Hessel et al. 2021 (jmhessel/clipscore), w = 2.5; no text prefix unless --clip_prefix",
                  _clip_score),
    CaptionMetric("diversity", {"vocabulary_size": "Vocabulary", "distinct_1": "Distinct-1",
                                "distinct_2": "Distinct-2", f"repeated_{REPEATED_NGRAM}gram": "Repeated 3-gram"},
                  "distinct-n of Li et al. 2016 over the whole set; share of captions repeating a word 3-gram",
                  _diversity),
    CaptionMetric("copied", {"copied_from_training": "Copied"},
                  "share of captions equal, after PTB tokenization, to a training caption", _copied),
]}


def metric_names() -> dict[str, str]:
    """Every value key the registry can report, with its display name, in table order."""
    return {key: display for metric in METRICS.values() for key, display in metric.values.items()}


def format_metric(key: str, value: float) -> str:
    """A value as tables show it: counts as integers, everything else with four decimals."""
    return f"{value:.0f}" if key in COUNT_VALUES else f"{value:.4f}"


def compute_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                    training_captions: Iterable[str] | None = None, images: Mapping[str, object] | None = None,
                    clip=None, clip_prefix: str = "", metrics: Sequence[str] | None = None,
                    during_training: bool = False, batch_size: int = 32, progress: bool = False) -> MetricsResult:
    """Scores `{image: caption}` against `{image: [references]}` (the same images) with the registered metrics.

    Args:
        training_captions: the training set's captions, for the share copied verbatim (skipped without them).
        images, clip, clip_prefix: `{image: file or PIL image}` and a `LoadedClip`, for CLIPScore (skipped without).
        metrics: names from `METRICS` to run (default: all; with `during_training`, those cheap enough for it).
    Returns:
        `MetricsResult`; a metric that cannot run is listed in `skipped` with the reason instead of failing the rest.
    """
    names, candidates, reference_lists, _ = _as_keyed(dict(predictions), dict(references))
    chosen = list(metrics) if metrics is not None else [
        name for name, metric in METRICS.items() if metric.during_training or not during_training]
    unknown = [name for name in chosen if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; registered: {', '.join(METRICS)}")
    tokenized_predictions = ptb_tokenize_lines(candidates)
    # one stream for all references, in image order, as coco-caption feeds them to Java
    flat = iter(ptb_tokenize_lines([ref for refs in reference_lists for ref in refs]))
    tokenized_references = [[next(flat) for _ in refs] for refs in reference_lists]
    training = None
    if training_captions is not None and "copied" in chosen:
        training = frozenset(ptb_tokenize_lines(list(training_captions)))
    inputs = MetricInputs(names, candidates, reference_lists, tokenized_predictions, tokenized_references,
                          training, dict(images) if images is not None else None, clip, clip_prefix, batch_size,
                          progress)
    result = MetricsResult(per_image={name: {} for name in names})
    for name in chosen:
        try:
            values = METRICS[name].compute(inputs)
        except MetricSkipped as reason:
            result.skipped[name] = str(reason)
            continue
        result.values.update(values.corpus)
        for key, per_image in values.per_image.items():
            for image, value in zip(names, per_image):
                result.per_image[image][key] = value
    return result
