"""The presence service: who is in which room, across all gateways."""
