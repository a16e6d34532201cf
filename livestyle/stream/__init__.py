"""Streaming: frames in, restyled frames out, with the fewest U-Net calls per frame.

    engine.py        Engine (one worker thread owns the device) and Stream handles
    state.py         one stream's buffers: stream batch, noise, temporal cache, previous output
    plan.py          how a frame is denoised in S steps (LCM img2img, the demo model's bridge)
    guidance.py      none, full CFG, residual CFG (self, initialize)
    conditioning.py  styles and prompts -> U-Net contexts, cached
    flow.py          optical flow (DIS) and flow-guided propagation of the previous output
    similarity.py    the similarity filter
    stats.py         per-stream figures without host syncs
    samplers.py      few-step samplers as plain functions
    restyle.py       the per-frame reference path of the demo model
"""
