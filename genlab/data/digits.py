"""sklearn's 8x8 handwritten digits as a small labelled image set (no download: it ships with scikit-learn).

1797 grey 8x8 images with values 0..16, ten classes, from the UCI "Optical Recognition of Handwritten
Digits" data (Alpaydin and Kaynak 1998), loaded by ``sklearn.datasets.load_digits``.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from genlab.core.bounds import PositiveInt, Range
from genlab.core.errors import ConfigError, did_you_mean
from genlab.core.registry import register
from genlab.data.images import LabelledImages

DIGITS_SIZES: tuple[int, ...] = (8, 16, 32)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a handwritten digit {word}", "the number {digit}", "a handwritten {word}",
                     "the digit {digit}", "{word}")  # the first is the prompt a class is sampled with
_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """``images: [1797, 8, 8]`` float32 in 0..16 and ``targets: [1797]`` int64, read once per process."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digits_split(split: str, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Indices into the 1797 digits of ``split``: a stratified, shuffled split fixed by ``seed``.

    ``"train"`` and ``"test"`` are disjoint, shuffled and cover every class in proportion
    (``sklearn.model_selection.train_test_split`` with ``stratify``); ``"all"`` is ``0..1796`` in order.
    """
    if split not in _SPLITS:
        raise ConfigError(f"digits: unknown split {split!r}; valid: {', '.join(_SPLITS)}{did_you_mean(split, _SPLITS)}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    _, targets = _load()
    everything = np.arange(len(targets))
    if split == "all":
        return everything
    from sklearn.model_selection import train_test_split

    try:
        train, test = train_test_split(everything, test_size=test_fraction, random_state=seed, stratify=targets)
    except ValueError as e:  # a side too small to hold every class
        raise ConfigError(f"digits: test_fraction {test_fraction} leaves a split without every class ({e})") from e
    return train if split == "train" else test


@register("dataset", "digits")
class Digits(LabelledImages):
    """sklearn's digits: ``data: [N, 1, S, S]`` float32 in [-1, 1], ``labels: [N]`` long, 10 classes.

    ``split`` is ``"train"``, ``"test"`` (a stratified ``test_fraction`` of the 1797 images, fixed by
    ``seed``; see ``digits_split``) or ``"all"``. Pixels 0..16 map to ``x / 8 - 1``; the 8x8 images are
    resized to ``image_size`` (8, 16 or 32) with ``F.interpolate`` (bilinear, antialiased).
    ``classes`` (optional) keeps only those digits; ``unlabelled`` digits keep their images with label
    -1, the null class (a model sees them only unconditionally: a class held out from the labels, for
    textual inversion). ``n`` (optional) sets the length by tiling the split in its fixed order
    (after ``classes``): item ``i`` is item ``i mod len(split)``, so a smaller ``n`` keeps the first
    ``n`` items and a larger one repeats the split.

    ``control="stroke"`` also gives each item a control image for a ControlNet, ``control: [N, 1, S, S]``:
    the digit's **stroke mask**, the image at its training size thresholded, 1 where the pixel exceeds
    ``stroke_threshold`` (in [-1, 1] units; 0: half ink), else 0 (:func:`stroke_mask`). The mask
    is of the resized image, not the 8x8 original, so that :meth:`make_control` of a sample (the
    same threshold) is comparable with it pixel for pixel (the stroke IoU of the evaluation).

    ``captions="templates"`` also gives each item a caption (``captions``: a list of N strings) for a
    text-conditioned model: one of :data:`CAPTION_TEMPLATES` filled with the digit as a word ("seven") or a
    numeral ("7"), the template drawn from (``seed``, the image's index among the 1797), so an image keeps
    its caption across splits and options. :meth:`prompt` is a class's caption for sampling ("a
    handwritten digit seven").

    Ranges: test_fraction in (0, 1), seed in [0, 2^32) (sklearn's random_state), n >= 1, digits in 0..9,
    stroke_threshold in (-1, 1).
    """

    def __init__(
        self,
        image_size: Literal[8, 16, 32] = 16,
        split: Literal["train", "test", "all"] = "train",
        test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.2,
        seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,
        n: PositiveInt | None = None,
        classes: list[int] | None = None,
        unlabelled: list[int] | None = None,
        control: Literal["stroke"] | None = None,
        stroke_threshold: Annotated[float, Range(gt=-1, lt=1)] = 0.0,
        captions: Literal["templates"] | None = None,
    ) -> None:
        if image_size not in DIGITS_SIZES:
            raise ConfigError(f"digits: image_size must be one of 8, 16, 32, got {image_size!r}")
        for key, digits in (("classes", classes), ("unlabelled", unlabelled)):
            if digits is not None and (not digits or not all(isinstance(d, int) and 0 <= d <= 9 for d in digits)):
                raise ConfigError(f"digits: {key} must be a non-empty list of digits 0..9, got {digits!r}")
        index = digits_split(split, test_fraction, seed)
        images, targets = _load()
        if classes is not None:
            index = index[np.isin(targets[index], classes)]
        if n is not None:
            index = index[np.arange(n) % len(index)]
        x = rearrange(torch.from_numpy(images[index]), "n h w -> n 1 h w") / 8 - 1
        if image_size != 8:
            size = (image_size, image_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
        self.split, self.image_size = split, image_size
        self.data = x.contiguous()
        labels = torch.from_numpy(targets[index]).long()
        self.labels = labels if unlabelled is None else torch.where(torch.isin(labels, torch.tensor(unlabelled)), -1, labels)
        self.class_names = tuple(str(d) for d in range(10))
        self.stroke_threshold = stroke_threshold
        self.control = None if control is None else self.make_control(self.data)
        self.captions = None if captions is None else [digit_caption(int(targets[i]), int(i), seed) for i in index]

    def prompt(self, label: int) -> str:
        """The caption class ``label`` is sampled with (the first template: "a handwritten digit seven")."""
        return CAPTION_TEMPLATES[0].format(word=DIGIT_WORDS[label], digit=label)

    def make_control(self, images: Tensor) -> Tensor:
        """The control image of ``images: [N, 1, S, S]`` in [-1, 1] (samples too), made as the items'
        are: their stroke masks ``[N, 1, S, S]`` in {0, 1}."""
        return stroke_mask(images, self.stroke_threshold)


def stroke_mask(images: Tensor, threshold: float = 0.0) -> Tensor:
    """1 where ``images: [N, C, H, W]`` exceed ``threshold``, else 0 (same shape, dtype and device):
    the ink of a digit drawn light on dark."""
    return (images > threshold).to(images.dtype)


def digit_caption(digit: int, index: int, seed: int = 0) -> str:
    """The caption of image ``index`` (among the 1797) showing ``digit``: a template of
    :data:`CAPTION_TEMPLATES` drawn from (``seed``, ``index``), filled with the digit."""
    template = CAPTION_TEMPLATES[int(np.random.default_rng((seed, index)).integers(len(CAPTION_TEMPLATES)))]
    return template.format(word=DIGIT_WORDS[digit], digit=digit)
