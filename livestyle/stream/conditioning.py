"""What the U-Net is conditioned on: a style of the demo model, or a text prompt.

Embeddings are computed when a stream's settings change and remembered, never per frame.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from livestyle.config import SettingsError, style_blend
from livestyle.models.loading import Pipeline
from livestyle.models.prompt import PromptCache, SDXLPrompt


@dataclass(frozen=True)
class Condition:
    """One prompt's (or style's) conditioning, on the engine's device and dtype.

    context: (1, L, D) the U-Net's cross-attention context.
    pooled: (1, P) SDXL's pooled text embedding (the U-Net's `text_embeds`), else None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None


class Conditioning:
    """Conditions for the pipeline's U-Net, cached by text (the last `max_entries`).

    The demo model reads `style` (and a negative as a style: the direction to move away
    from); SD checkpoints read `prompt` and `negative` through their text encoder(s);
    SDXL's add a pooled embedding, and an empty negative is all zeros where the
    checkpoint says so (Pipeline.zero_empty_negative, diffusers' force_zeros_for_empty_prompt).
    """

    def __init__(self, pipe: Pipeline, device: torch.device | str, dtype: torch.dtype, max_entries: int = 16):
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self.prompts = pipe.prompt_cache(max_entries) if pipe.text is not None else None
        # Bounded like the prompts': a server's viewers can send any number of blends.
        self._styles: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_entries = max_entries

    def positive(self, style: str, prompt: str) -> Condition:
        if self.prompts is None:
            return Condition(self.style(style))
        return self._prompt(prompt)

    def negative(self, negative: str) -> Condition:
        if self.prompts is None:
            if not negative:
                raise SettingsError("guidance = 'full' with the demo model needs a negative style to move away from")
            return Condition(self.style(negative))
        condition = self._prompt(negative)
        if not negative and self.pipe.zero_empty_negative:
            return Condition(torch.zeros_like(condition.context),
                             None if condition.pooled is None else torch.zeros_like(condition.pooled))
        return condition

    def _prompt(self, text: str) -> Condition:
        encoded = self.prompts(text)
        if isinstance(encoded, SDXLPrompt):
            return Condition(encoded.context.to(self.device, self.dtype), encoded.pooled.to(self.device, self.dtype))
        return Condition(encoded.to(self.device, self.dtype))

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
