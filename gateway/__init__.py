"""The WebSocket gateway: the only public-facing roombus service."""
