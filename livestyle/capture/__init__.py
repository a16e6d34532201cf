"""Media edges: video sources (synthetic camera paths over shipped images for now) and sinks
(video files through PyAV). Cameras, files with audio and the virtual camera come next."""
