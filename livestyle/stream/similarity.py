"""The similarity filter: skip the model when the input barely changed.

After StreamDiffusion's stochastic similarity filter (Kodaira et al. 2023, sec. 3.4):
the cosine similarity s between the current input and the last one the model ran on
decides; above the threshold T the frame is skipped with probability
(s - T) / (1 - T), so a nearly still scene costs almost nothing while slow drifts are
still followed, and never more than `max_skips` frames in a row.

It works on the small grey copy that flow estimation already made on the CPU, so the
decision costs no device work and no host sync. The grey values are centred first:
raw pixel vectors are all positive and have cosines near 1 whatever the content.
"""

from __future__ import annotations

import numpy as np


class SimilarityFilter:
    def __init__(self, threshold: float, seed: int = 0, max_skips: int = 10):
        """threshold in (0, 1): 0.98 is StreamDiffusion's default."""
        self.threshold, self.max_skips = threshold, max_skips
        self.rng = np.random.default_rng(seed)
        self.last: np.ndarray | None = None
        self.skipped = 0

    def skip(self, grey: np.ndarray) -> bool:
        """grey: uint8 (h, w), the current input's small copy. True: repeat the last output."""
        v = grey.astype(np.float32).ravel()
        v -= v.mean()
        if self.last is not None and self.last.shape == v.shape and self.skipped < self.max_skips:
            norm = float(np.linalg.norm(v) * np.linalg.norm(self.last))
            similarity = float(v @ self.last) / norm if norm > 0 else 1.0
            if similarity > self.threshold:
                p = (similarity - self.threshold) / (1 - self.threshold)
                if self.rng.random() < p:
                    self.skipped += 1
                    return True
        self.last, self.skipped = v, 0
        return False

    def reset(self) -> None:
        self.last, self.skipped = None, 0
