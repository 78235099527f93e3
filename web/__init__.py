"""Browser-side audio for the lab: the low-latency PCM WebSocket path (web.pcm) and the server (web.server)."""
