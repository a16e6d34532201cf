"""The WebRTC server (aiohttp + aiortc): pages, /offer, WHIP/WHEP, sessions (not built yet)."""
