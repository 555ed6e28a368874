"""The shared service kit: settings, NATS, health/metrics HTTP, logging, lifecycle, CLI."""
