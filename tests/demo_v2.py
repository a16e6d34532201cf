"""The demo model as v2 was: the shipped v3 without its decoder's guide head.

v3 is v2 with a guide head trained on top (README, the demo model); its U-Net, styles,
encoder and decoder are v2's, bit for bit. Tests whose recorded figures or frames come
from v2 run on this.
"""

import dataclasses

from livestyle.models.demo import DEMO_MODEL, load_demo
from livestyle.models.lite_autoencoder import LiteAutoencoder, LiteAutoencoderConfig
from livestyle.models.loading import Pipeline, load_autoencoder


def v2_autoencoder() -> LiteAutoencoder:
    """v2's autoencoder: the shipped one's weights less the guide head's."""
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=16, width=48))
    shipped = load_autoencoder(DEMO_MODEL / "vae")
    vae.load_state_dict({k: v for k, v in shipped.state_dict().items() if not k.startswith("guide.")})
    return vae.eval()


def load_demo_v2() -> Pipeline:
    """The demo pipeline with v2's autoencoder (an Engine loader, like load_demo)."""
    return dataclasses.replace(load_demo(), autoencoder=v2_autoencoder())
