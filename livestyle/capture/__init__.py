"""Media edges: where frames come from and where restyled frames go.

Sources (each yields upright av.VideoFrames with pts and time_base, and a SourceInfo):
    sources.py   open_source(INPUT), SourceInfo, the synthetic test: source
    files.py     files and network streams through PyAV (rotation applied, audio packets passed on)
    camera.py    webcams through OpenCV (MJPG, size and rate requests)
    folder.py    image folders and globs in, numbered images out
    synthetic.py camera paths with exact motion over a still image

Sinks (write(frame), close(); used from one thread):
    sinks.py     video files through PyAV, with the input's audio copied or re-encoded
    vcam.py      the virtual camera (pyvirtualcam: OBS on Windows/macOS, v4l2loopback on Linux)
    window.py    the preview window (OpenCV), optionally side by side

threads.py runs a source on a reader thread and a sink on a writer thread, so that
decoding and encoding never hold up the model.
"""
