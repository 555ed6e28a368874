"""The Redis compatibility bridge: Redis ``room:<name>`` <-> NATS ``room.<name>.message``."""
