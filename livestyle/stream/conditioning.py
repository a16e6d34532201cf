"""What the U-Net is conditioned on: a style of the demo model, or a text prompt.

Embeddings are computed when a stream's settings change and remembered, never per frame.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from livestyle.config import SettingsError, style_blend
from livestyle.models.loading import Pipeline
from livestyle.models.prompt import PromptCache


class Conditioning:
    """Contexts (1, T, D) for the pipeline's U-Net, cached by text (the last `max_entries`).

    The demo model reads `style` (and a negative as a style: the direction to move away
    from); SD checkpoints read `prompt` and `negative` through their text encoder.
    """

    def __init__(self, pipe: Pipeline, device: torch.device | str, dtype: torch.dtype, max_entries: int = 16):
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self.prompts = PromptCache(pipe.text.encoder, pipe.text.tokenizer) if pipe.text is not None else None
        # Bounded like the prompts': a server's viewers can send any number of blends.
        self._styles: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_entries = max_entries

    def positive(self, style: str, prompt: str) -> torch.Tensor:
        if self.prompts is None:
            return self.style(style)
        return self.prompts(prompt).to(self.device, self.dtype)

    def negative(self, negative: str) -> torch.Tensor:
        if self.prompts is None:
            if not negative:
                raise SettingsError("guidance = 'full' with the demo model needs a negative style to move away from")
            return self.style(negative)
        return self.prompts(negative).to(self.device, self.dtype)

    def style(self, text: str) -> torch.Tensor:
        if text in self._styles:
            self._styles.move_to_end(text)
            return self._styles[text]
        with torch.inference_mode():
            context = self.pipe.styles.context(style_blend(text)).to(self.device, self.dtype)
        self._styles[text] = context
        if len(self._styles) > self.max_entries:
            self._styles.popitem(last=False)  # least recently used
        return context
