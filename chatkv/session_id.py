"""What a session id may be: it names files (conversation, KV snapshot), so only a safe, short file name.

One rule for the store, the snapshot tier and the engine: 1 to 64 letters, digits, '-' or '_',
starting with a letter or digit. No path separators, no dots, nothing hidden, nothing to escape.
"""

from __future__ import annotations

import re

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SESSION_ID_RULE = "1 to 64 letters, digits, '-' or '_', starting with a letter or digit"


def is_valid_session_id(session_id: object) -> bool:
    return isinstance(session_id, str) and SESSION_ID_PATTERN.fullmatch(session_id) is not None
