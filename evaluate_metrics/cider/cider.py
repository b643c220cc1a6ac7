"""CIDEr-D as coco-caption computes it (PTB tokenizer + Cider), as a Hugging Face `evaluate` module, without Java.

Load it offline from a checkout with `evaluate.load("evaluate_metrics/cider")` (a path relative to the repository root) or
an absolute path. The implementation lives in `modeling_vitgpt2.evaluation.cider`; this file only adapts it to `evaluate`.
"""

import datasets
import evaluate

from modeling_vitgpt2.evaluation.cider import corpus_cider

_CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

_DESCRIPTION = """\
CIDEr-D exactly as the coco-caption toolkit (pycocoevalcap) reports it: captions are tokenized like the Stanford
PTB tokenizer (lower-cased, punctuation removed), then scored with TF-IDF weighted n-grams (n = 1..4, document
frequencies over the references of the evaluated set), clipped cosine similarity and a Gaussian length penalty
(sigma 6), times 10. Agrees with the Java pipeline to floating-point rounding.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated captions, one per image.
    references: list of lists of reference captions (or one reference string per image).
    tokenize: (optional, default True) run the PTB tokenizer first; False for pre-tokenized text.
Returns:
    cider: corpus CIDEr-D (coco-caption scale, e.g. 0.77).
    cider_per_image: the per-image scores, in input order.
Examples:
    >>> cider = evaluate.load("evaluate_metrics/cider")
    >>> cider.compute(predictions=["i am a boy", "she is a girl"],
    ...               references=[["am i a boy ?"], ["is she a girl ?"]])["cider"]
    3.333...
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cider(evaluate.Metric):
    """CIDEr-D (coco-caption) for image captioning."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/tylin/coco-caption", "https://arxiv.org/abs/1411.5726"],
        )

    def _compute(self, predictions, references, tokenize=True):
        references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
        result = corpus_cider(list(predictions), references, tokenize=tokenize)
        return {"cider": result.score, "cider_per_image": result.per_image}
