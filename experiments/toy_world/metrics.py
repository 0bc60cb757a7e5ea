"""What the toy world measures on a set of samples (docs/EXPERIMENTS.md).

* ``saturation``: the proxy reward (the reward server's ``saturation`` model, the same function).
* ``kid``: the per-caption kernel inception distance to held-out references: for each caption, the
  unbiased MMD^2 with KID's cubic polynomial kernel (Binkowski et al. 2018) between that caption's
  samples and that caption's references, averaged over captions (the class-conditional form, as
  intra-class FID). On the features of ``experiments.toy_world.features``, a network neither reward
  uses. x1000, as KID is usually quoted; 0 when samples and references come from one distribution,
  up to noise (it can go slightly below 0). Per caption rather than over the whole set: the
  evaluation set holds every caption equally often, not independent draws, and an unconditional
  estimate between such sets is biased (measured: -88 x1000 between two sets of rendered scenes).
* ``colour``, ``shape``, ``both``: the caption checker's accuracy (``advgrpo.common.toy_domain``).
* ``diversity``: the mean distance between the features of two samples of the same caption, over
  the same mean for the held-out references (1: as varied as the data, 0: every sample of a
  caption alike).
* ``night``: the fraction of samples in the night style (``toy_domain.style_of``).
* ``kid_<name>``: ``kid`` against each held-out reference set, whichever the run aims at.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from advgrpo.common import toy_domain as td
from advgrpo.reward_server.models.noop import saturation


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets ``x`` [n, d] and ``y`` [m, d], kernel (x.y / d + 1)^3."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def by_caption(texts: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        groups[t].append(i)
    return dict(groups)


def caption_kid(x: np.ndarray, x_texts: Sequence[str], y: np.ndarray, y_texts: Sequence[str]) -> float:
    """``kid`` between each caption's rows of ``x`` and of ``y``, averaged over the captions of ``x``."""
    ys = by_caption(y_texts)
    values = []
    for text, idx in by_caption(x_texts).items():
        if len(idx) < 2 or len(ys.get(text, ())) < 2:
            raise ValueError(f"caption_kid: {text!r} needs at least 2 samples and 2 references")
        values.append(kid(x[idx], y[ys[text]]))
    return float(np.mean(values))


def spread(feats: np.ndarray, texts: Sequence[str]) -> float:
    """Mean Euclidean distance between two features of the same caption, averaged over captions."""
    values = []
    for idx in by_caption(texts).values():
        if len(idx) < 2:
            continue
        f = feats[idx]
        d = np.sqrt(np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0.0))
        k = len(idx)
        values.append(float(d.sum() / (k * (k - 1))))
    if not values:
        raise ValueError("spread: no caption has two samples")
    return float(np.mean(values))


class Measure:
    """Measures sample sets against held-out reference sets (their features computed once): every
    metric against the ``target`` set, and ``kid_<name>`` against each set."""

    def __init__(self, references: dict[str, tuple[Sequence[np.ndarray], Sequence[str]]]):
        from experiments.toy_world.features import features, load_feature_net

        self._features = features
        self.net = load_feature_net()
        self.references = {
            name: (features(self.net, list(images)), list(texts)) for name, (images, texts) in references.items()
        }
        self.spreads = {name: spread(f, texts) for name, (f, texts) in self.references.items()}

    def __call__(self, images: Sequence[np.ndarray], texts: Sequence[str], target: str) -> dict[str, float]:
        f = self._features(self.net, list(images))
        acc = td.caption_accuracy(images, texts)
        kids = {name: 1000 * caption_kid(f, texts, rf, rt) for name, (rf, rt) in self.references.items()}
        return {
            "saturation": float(np.mean([saturation(img) for img in images])),
            "kid": kids[target],
            "colour": acc["colour"],
            "shape": acc["shape"],
            "both": acc["both"],
            "diversity": spread(f, texts) / self.spreads[target],
            "night": float(np.mean([td.style_of(img) == "night" for img in images])),
            **{f"kid_{name}": value for name, value in kids.items()},
        }
