"""Test helpers: real nats-server / redis-server processes, service subprocesses, clients."""
