"""A file stream run to the end: the helper the engine tests share."""


def run(engine, settings, frames, timeout=60):
    """Submit `frames` to a new file stream (live=False: every frame is restyled), flush,
    close; returns (outputs in order, the stream's stats)."""
    outputs = []
    stream = engine.open_stream(settings, outputs.append, live=False)
    for f in frames:
        stream.submit(f)
    assert stream.flush(timeout=timeout)
    stats = stream.stats()
    stream.close()
    return outputs, stats
