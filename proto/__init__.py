"""The wire contract of roombus as code: models, names, subjects, error codes. No I/O."""
