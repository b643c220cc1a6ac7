"""CLIPScore and RefCLIPScore (Hessel et al., 2021) as a Hugging Face `evaluate` module.

Load it offline from a checkout with `evaluate.load("evaluate_metrics/clipscore")` (relative to the repository root) or an
absolute path. The implementation lives in `modeling_vitgpt2.evaluation.clip_score`; this file only adapts it to `evaluate`.
"""

import datasets
import evaluate

from modeling_vitgpt2.evaluation.clip_score import (
    CLIP_SCORE_WEIGHT,
    DEFAULT_CLIP_MODEL,
    LoadedClip,
    clip_score,
    load_clip,
)

_CITATION = """\
@inproceedings{hessel2021clipscore,
  title={{CLIPScore:} A Reference-free Evaluation Metric for Image Captioning},
  author={Hessel, Jack and Holtzman, Ari and Forbes, Maxwell and Le Bras, Ronan and Choi, Yejin},
  booktitle={EMNLP},
  year={2021}
}
"""

_DESCRIPTION = """\
CLIPScore: w * max(cos(CLIP image embedding, CLIP caption embedding), 0) with w = 2.5, averaged over images.
By default the bare caption is embedded (the course variant); pass prefix="A photo depicts " for Hessel et al.'s
original. With references, RefCLIPScore is also returned: the harmonic mean of CLIP-S and the best
caption-reference cosine (clipped at 0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated captions.
    images: list of image file paths or PIL images, aligned with predictions.
    references: (optional) list of lists of reference captions; adds RefCLIPScore.
    clip_model: (optional) Hub id or local folder of a CLIPModel + CLIPProcessor, or a `LoadedClip`;
        default "openai/clip-vit-base-patch32".
    prefix: (optional) text put before captions and references; "" (default) or "A photo depicts ".
    weight: (optional) w, default 2.5.
    batch_size: (optional) images per forward pass, default 32.
    device: (optional) e.g. "cuda" or "cpu"; default CUDA when available.
    progress: (optional) show progress bars, default True.
Returns:
    clip_score: mean CLIP-S; clip_score_per_image: the per-image values.
    ref_clip_score, ref_clip_score_per_image: only when references are given.
Examples:
    >>> clipscore = evaluate.load("evaluate_metrics/clipscore")
    >>> clipscore.compute(predictions=["a dog on a beach"], images=["dog.jpg"], clip_model="path/to/clip")
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Clipscore(evaluate.Metric):
    """CLIPScore / RefCLIPScore for image captioning."""

    def _info(self):
        # Images travel as paths (cheap, and unreadable files get a clear error naming them) or as PIL images.
        # References are optional, but `evaluate` needs every input column, so a missing one becomes empty lists.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "images": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "images": datasets.Image(),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
            ],
            reference_urls=["https://arxiv.org/abs/2104.08718", "https://github.com/jmhessel/clipscore"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Adds predictions and images (and optionally references); see the module description for the inputs."""
        return super().add_batch(predictions=predictions, references=_no_references(predictions, references),
                                  **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Computes CLIPScore (and RefCLIPScore when references are given) for the inputs."""
        return super().compute(predictions=predictions, references=_no_references(predictions, references), **kwargs)

    def _compute(self, predictions, images, references, clip_model=DEFAULT_CLIP_MODEL, prefix="",
                 weight=CLIP_SCORE_WEIGHT, batch_size=32, device=None, progress=True):
        given = [bool(refs) for refs in references]
        if any(given) and not all(given):
            missing = [index for index, has in enumerate(given) if not has]
            raise ValueError(f"references are missing for predictions {missing[:10]}; give references for every "
                             "prediction or for none")
        clip = clip_model if isinstance(clip_model, LoadedClip) else self._cached_clip(clip_model, device)
        reference_lists = [list(refs) for refs in references] if all(given) else None
        result = clip_score(list(images), list(predictions), reference_lists, clip=clip, prefix=prefix,
                            weight=weight, batch_size=batch_size, progress=progress)
        output = {"clip_score": result.score, "clip_score_per_image": result.per_image}
        if result.ref_score is not None:
            output.update(ref_clip_score=result.ref_score, ref_clip_score_per_image=result.ref_per_image)
        return output

    def _cached_clip(self, name_or_path, device):
        """Loads the CLIP model once per module instance, so repeated `compute` calls do not reload it."""
        cache = self.__dict__.setdefault("_clip_cache", {})
        key = (str(name_or_path), str(device))
        if key not in cache:
            cache[key] = load_clip(name_or_path, device=device)
        return cache[key]


def _no_references(predictions, references):
    if references is None and predictions is not None:
        return [[] for _ in predictions]
    return references
