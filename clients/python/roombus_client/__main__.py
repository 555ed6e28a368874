"""``python -m roombus_client tail|send|chat ROOM ...`` (as ``roombus tail|send|chat``)."""

import sys

from .cli import main

sys.exit(main())
