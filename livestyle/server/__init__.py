"""The WebRTC server (aiohttp + aiortc): `livestyle serve`.

    app.py       App (the engine, the settings, the sessions) and its routes: pages, /offer,
                 /presets, /stats, /config; ServerSettings; listening() and serve()
    whip.py      WHIP ingest and WHEP playback (RFC 9725 style)
    sessions.py  Session (one peer's stream on the shared engine) and Viewer (a WHEP player)
    tracks.py    latest-frame slots between aiortc tracks and the engine; encoders with a bitrate ceiling
    controls.py  the `control` data channel's JSON messages -> stream settings
    security.py  the bind rule, bearer tokens, size limits, CORS, page headers
    command.py   the `serve` subcommand (imports nothing heavy until it runs)
    client.py    a Python client (camera, WHIP, WHEP) for scripts, tests and benchmarks
    static/      the camera page and the viewer page
"""
