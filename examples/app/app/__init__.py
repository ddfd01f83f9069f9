"""A tiny stand-in for the CoachNTT API: /health, /api/notes, /ws, /metrics."""
