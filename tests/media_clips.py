"""Test clips made with PyAV: H.264 video (+ AAC audio), with odd sizes, rotation or irregular timing.

Each frame shows a dark gradient that changes with time and a bright marker block in
its top-left corner, so orientation can be checked after a rotation.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 48000


def picture(t: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) RGB frame t: a moving gradient with a white block at the top left."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([(x * 3 + t * 9) % 160, (y * 2 + t * 5) % 160, np.full_like(x, 40)], axis=-1).astype(np.uint8)
    image[: max(2, h // 4), : max(2, w // 4)] = 255  # the marker: top-left quarter-by-quarter block
    return image


def make_clip(path: str | Path, size: tuple[int, int] = (64, 48), frames: int = 24, rate: int = 24,
              audio: str | None = "aac", rotation: int = 0, pts: list[int] | None = None,
              time_base: Fraction | None = None) -> Path:
    """Write a clip; returns its path.

    size: (w, h) as stored. rotation: display rotation in degrees counter-clockwise
    (what a phone writes for a portrait video). pts: explicit frame timestamps in
    `time_base` (a variable frame rate); default frame i at i / rate.
    audio: an audio codec (a 440 Hz tone as long as the video), or None.
    """
    path = Path(path)
    time_base = time_base or Fraction(1, rate)
    pts = pts or list(range(frames))
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        video.time_base = video.codec_context.time_base = time_base
        if rotation:
            video.set_display_rotation(rotation)
        sound = None
        if audio:
            sound = container.add_stream(audio, rate=SAMPLE_RATE)
            sound.layout = "stereo"
        for t, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(picture(t, size), format="rgb24")
            frame.pts, frame.time_base = stamp, time_base
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            seconds = float((pts[-1] - pts[0]) * time_base) + 1 / rate
            total, done = round(seconds * SAMPLE_RATE), 0
            while done < total:
                n = min(1024, total - done)
                tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(done, done + n) / SAMPLE_RATE)).astype(np.float32)
                chunk = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, done
                container.mux(sound.encode(chunk))
                done += n
            container.mux(sound.encode(None))
    return path


def video_facts(path: str | Path) -> dict:
    """What a file holds: frame count, size, frame times (s), duration (s), rotation, audio codec and packets."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = list(container.decode(video))
        duration = float(container.duration / av.time_base) if container.duration else None
    with av.open(str(path)) as container:
        audio = container.streams.audio[0] if container.streams.audio else None
        packets = [bytes(p) for p in container.demux(audio) if p.size] if audio else []
        audio_codec = audio.codec_context.name if audio else None
    return {"frames": len(frames), "size": (frames[0].width, frames[0].height) if frames else None,
            "times": [float(f.pts * f.time_base) for f in frames], "duration": duration,
            "rotation": frames[0].rotation if frames else 0, "audio": audio_codec, "audio_packets": packets,
            "first": frames[0].to_ndarray(format="rgb24") if frames else None}
