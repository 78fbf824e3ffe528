"""Long user messages of a chosen token length, for the scenarios that need long conversations (memory, snapshot).

The text is a made-up project log, numbered entry by entry, so it reads like something a user would
paste into a chat and no two entries tokenize alike at the same position.
"""

from __future__ import annotations

from typing import Any

_ENTRIES = [
    "The team moved the nightly build to the new runner and the average build time fell from forty to twenty-six minutes.",
    "A customer reported that exports larger than two gigabytes stopped halfway; the cause was a 32-bit offset in the writer.",
    "We agreed to keep the old configuration format for one more release and print a warning with the new key names.",
    "The search page now caches the last hundred queries per user, which halved the load on the index during the morning peak.",
    "Two flaky tests in the payment module were traced to a shared temporary folder and now each test gets its own.",
    "The design review asked for clearer error messages when a file cannot be opened, naming the file and what to do next.",
    "Memory use of the importer dropped by a third after it stopped holding every parsed row until the end of the file.",
    "On-call handed over three open incidents: a slow dashboard, a certificate that expires next month and a noisy alert.",
]


def filler_message(tokenizer: Any, tokens: int, question: str = "Summarise the main themes of this log.") -> str:
    """A user message of about ``tokens`` tokens (within one entry): a numbered log followed by a question."""
    parts: list[str] = []
    used = len(tokenizer.encode(question, add_special_tokens=False))
    number = 1
    while True:
        entry = f"Entry {number}: {_ENTRIES[(number - 1) % len(_ENTRIES)]}\n"
        cost = len(tokenizer.encode(entry, add_special_tokens=False))
        if used + cost > tokens:
            break
        parts.append(entry)
        used += cost
        number += 1
    return "".join(parts) + question
