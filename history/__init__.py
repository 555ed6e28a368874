"""The history service: persists room messages to JetStream and answers history queries."""
