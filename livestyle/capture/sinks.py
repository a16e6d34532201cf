"""The file sink: restyled frames (and the input's audio) into a video file through PyAV.

Video is encoded as H.264 yuv420p by default (what every player and editor reads),
each frame at its own pts in the input's time_base, so the output has the input's
frame timing and length, a variable frame rate included. The input's audio is copied
packet for packet when the output container accepts its codec, and re-encoded (AAC,
or Opus for WebM) when it does not.

A sink is a context manager: leaving it (normally, on an error or on Ctrl-C) flushes
the encoder and closes the container, so the file is valid and playable up to the
last frame written. It is used from one thread (the writer thread, see threads.py).

MP4 and MOV are written fragmented (a fragment a second, the movie header after the
first one), as OBS's fragmented MP4 and live recorders do: a run that cannot finish its
file (a full disk, a kill) leaves every fragment written before it playable, where a
plain MP4 without its closing index plays nothing. Matroska and WebM play without
their closing index as they are.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from livestyle.errors import LivestyleError

log = logging.getLogger(__name__)

# Codecs whose encoder takes a constant rate factor; others get a bitrate.
CRF_CODECS = {"libx264": "crf", "libx265": "crf", "libvpx-vp9": "crf", "libsvtav1": "crf", "libaom-av1": "crf"}
# delay_moov: the header waits for the first fragment, so the edit list that hides the
# encoder's B-frame delay is right and frame times start where the input's do.
# flush_packets: each fragment goes to the disk when it is complete, not when FFmpeg's 32 kB
# write buffer fills (minutes of a small video).
FRAGMENTED = {"movflags": "frag_keyframe+empty_moov+delay_moov", "frag_duration": "1000000", "flush_packets": "1"}
UPSCALE = "BICUBIC"  # restyled frames at the processing size back to the input size (and the colour conversion)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class VideoEncoding:
    """How the video is encoded.

    codec: an FFmpeg encoder name (libx264, libx265, libvpx-vp9, h264_nvenc, ...); None picks
        by container: libvpx-vp9 for .webm, libx264 otherwise.
    crf: constant rate factor (quality; lower is better, 18 is visually lossless for x264).
    bitrate: bits per second instead of a quality target (e.g. 4_000_000); overrides crf.
    preset: x264/x265 speed preset; veryfast keeps up with 720p on two cores, superfast
        halves its time again for a larger file (CRF 18: about 1.8x at 1080p).
    pix_fmt: the coded pixel format; yuv420p plays everywhere.
    """

    codec: str | None = None
    crf: int = 18
    bitrate: int | None = None
    preset: str = "veryfast"
    pix_fmt: str = "yuv420p"

    def __post_init__(self):
        if self.codec is not None and self.codec not in av.codecs_available:
            raise LivestyleError(f"codec {self.codec!r}: not an encoder this FFmpeg build has")
        if not 0 <= self.crf <= 63:
            raise LivestyleError(f"crf {self.crf}: must be 0 to 63 (18 is visually lossless for H.264)")
        if self.preset not in X264_PRESETS:
            raise LivestyleError(f"encoder preset {self.preset!r}: one of {', '.join(X264_PRESETS)}")
        if self.bitrate is not None and self.bitrate <= 0:
            raise LivestyleError(f"bitrate {self.bitrate}: must be positive")


def _even(n: int) -> int:
    return max(2, n - n % 2)


class FileSink:
    """Encodes frames to a video file; the format comes from the file name (.mp4, .mkv, .mov, .webm).

    size: (w, h) of the frames written; 4:2:0 needs even sizes, so an odd side loses
        one pixel row or column (scaled away, as ffmpeg users do with scale=trunc(iw/2)*2).
    time_base: the frames' pts unit (pass the input's to keep its timing exactly).
    rate: the nominal frame rate written in the container (players show it; the pts rule).
    audio: the input's audio stream, whose packets come through write_audio().
    """

    def __init__(self, path: str | Path, size: tuple[int, int], time_base: Fraction,
                 rate: Fraction | int | None = None, encoding: VideoEncoding = VideoEncoding(),
                 audio: av.audio.stream.AudioStream | None = None):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise LivestyleError(f"{self.path}: folder {self.path.parent} does not exist")
        options = FRAGMENTED if self.path.suffix.lower() in (".mp4", ".m4v", ".mov") else {"flush_packets": "1"}
        existed = self.path.exists()
        try:
            # FFmpeg opens the file only when it writes the header, after the first frame:
            # an unwritable place is found now, before a model is loaded, by opening it here.
            with open(self.path, "ab"):
                pass
            if not existed:
                self.path.unlink()
            self.container = av.open(str(self.path), mode="w", options=options)
        except (av.FFmpegError, ValueError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise LivestyleError(f"{self.path}: cannot write this file ({why})") from None
        try:
            try:
                self._add_video(size, time_base, rate, encoding)
                self._add_audio(audio)
            except (av.FFmpegError, ValueError, TypeError) as e:  # e.g. --codec aac: not a video encoder
                raise LivestyleError(f"{self.path}: cannot set up the encoder ({e})") from None
        except BaseException:
            self.container.close()
            self.path.unlink(missing_ok=True)
            raise
        self.frames = 0
        self.dropped = 0  # frames refused for a timestamp not after the previous one
        self._last_pts: int | None = None

    def _add_video(self, size, time_base, rate, encoding: VideoEncoding) -> None:
        codec = encoding.codec or ("libvpx-vp9" if self.container.format.name == "webm" else "libx264")
        if codec not in self.container.supported_codecs:
            raise LivestyleError(f"{self.path}: a {self.container.format.name} file cannot hold {codec} video")
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = _even(size[0]), _even(size[1])
        self.stream.pix_fmt = encoding.pix_fmt
        self.stream.time_base = time_base
        self.stream.codec_context.time_base = time_base
        options = {"preset": encoding.preset} if codec in ("libx264", "libx265") else {}
        if encoding.bitrate:
            self.stream.bit_rate = encoding.bitrate
        elif codec in CRF_CODECS:
            options[CRF_CODECS[codec]] = str(encoding.crf)
            if codec == "libvpx-vp9":
                options |= {"b": "0", "deadline": "realtime", "cpu-used": "8"}  # constant quality, fast
        self.stream.options = options
        self.size = (self.stream.width, self.stream.height)

    def _add_audio(self, audio) -> None:
        """Copy the input's audio codec if this container takes it, else re-encode it."""
        self.audio_in, self.audio_out, self.audio_copy = audio, None, False
        if audio is None:
            return
        name, kind = audio.codec_context.name, self.container.format.name
        # PCM in MP4 is new in ISO-BMFF and few players read it; FFmpeg also refuses it
        # at the end of the file for channel layouts it cannot name. MOV and MKV take it.
        if name in self.container.supported_codecs and not (kind == "mp4" and name.startswith("pcm_")):
            self.audio_out = self.container.add_stream_from_template(audio)
            self.audio_copy = True
            return
        codec = "libopus" if kind == "webm" else "aac"
        rate = audio.codec_context.sample_rate or 48000
        if codec == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
            rate = 48000
        self.audio_out = self.container.add_stream(codec, rate=rate)
        self.audio_out.codec_context.layout = audio.codec_context.layout.nb_channels == 1 and "mono" or "stereo"
        log.info("%s: %s audio re-encoded as %s (a %s file cannot hold %s)", self.path, name, codec, kind, name)

    @property
    def audio_mode(self) -> str:
        """"copy", "encode" or "none": what happens to the input's audio."""
        return "none" if self.audio_out is None else "copy" if self.audio_copy else "encode"

    def write(self, frame: av.VideoFrame) -> None:
        """Encode one frame (of any size: it is scaled to the sink's); its pts (in the sink's
        time_base) sets its time in the file."""
        if frame.pts is not None and self._last_pts is not None and frame.pts <= self._last_pts:
            self.dropped += 1
            log.warning("%s: dropped a frame with pts %s, not after the previous one (%s)",
                        self.path, frame.pts, self._last_pts)
            return
        w, h = self.size
        try:
            packets = self.stream.encode(frame.reformat(width=w, height=h, format=self.stream.pix_fmt,
                                                         interpolation=UPSCALE))
            self.container.mux(packets)
        except (av.FFmpegError, OSError) as e:  # a full disk or a file size limit shows here
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise LivestyleError(f"{self.path}: writing frame {self.frames} failed ({why}); the frames "
                                 "before it are kept") from None
        self._last_pts = frame.pts
        self.frames += 1

    def write_audio(self, packet: av.Packet) -> None:
        """Copy or re-encode one packet of the input's audio stream."""
        if self.audio_out is None:
            return
        try:
            if self.audio_copy:
                packet.stream = self.audio_out
                self.container.mux(packet)
            else:
                for frame in self.audio_in.decode(packet):
                    self.container.mux(self.audio_out.encode(frame))
        except av.FFmpegError as e:
            if isinstance(e, OSError) and e.errno is not None:  # the file failed (a full disk), not the packet
                raise LivestyleError(f"{self.path}: writing audio failed ({e.strerror}); the frames before "
                                     "it are kept") from None
            log.warning("%s: skipped an audio packet at pts %s (%s)", self.path, packet.pts, e)

    def close(self) -> None:
        """Flush the encoders and write the container's index; idempotent."""
        if self.container is None:
            return
        container, self.container = self.container, None
        try:
            container.mux(self.stream.encode(None))  # the encoder's delayed frames
            if self.audio_out is not None and not self.audio_copy:
                container.mux(self.audio_out.encode(None))
            container.close()  # writes the index: without it an MP4 does not play
        except (av.FFmpegError, OSError) as e:  # a full disk, a removed drive
            with contextlib.suppress(av.FFmpegError, OSError):
                container.close()
            if self.frames == 0:
                self.path.unlink(missing_ok=True)
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise LivestyleError(f"{self.path}: could not finish the file ({why})") from None
        if self.frames == 0:  # nothing was encoded (an error or Ctrl-C before the first frame)
            log.debug("%s: removed, no frame was written", self.path)
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
