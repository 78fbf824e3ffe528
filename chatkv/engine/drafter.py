"""Prompt-lookup drafting: guess a turn's next tokens from its own conversation, with no draft model.

Replies often quote their context (a repeated paragraph, a summary, an edited piece of code). When the
last few tokens of prompt + reply occurred earlier in that sequence, the tokens that followed them then
are a good guess for what follows now. The engine feeds the guess with the turn's last token in one
forward and keeps the prefix the model agrees with (greedy only), so a right guess yields several tokens
for about the price of one and a wrong one costs a few rows of a forward pass.

The index is incremental: each n-gram (n = ``min_ngram``..``max_ngram``) maps to where its latest occurrence that
already has a following token ends, so a lookup and each new token cost O(``max_ngram``), whatever the
conversation's length.
"""

from __future__ import annotations

from typing import Sequence

MAX_NGRAM = 3  # longest suffix looked up: longer ones rarely find more and cost a bigger index
MIN_NGRAM = 3  # shortest suffix that may propose a guess: shorter ones match free-form text often and are rarely right


class NgramDrafter:
    def __init__(self, token_ids: Sequence[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.ids: list[int] = []
        # n -> n-gram -> index of the token that followed its latest occurrence
        self._follower: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self.extend(token_ids)

    def extend(self, token_ids: Sequence[int]) -> None:
        """Append tokens to the sequence (the prompt at first, then each token of the reply as it is accepted)."""
        for token in token_ids:
            end = len(self.ids)  # the n-grams ending just before this token now have a follower
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._follower[n][tuple(self.ids[end - n : end])] = end
            self.ids.append(token)

    def propose(self, max_tokens: int) -> list[int]:
        """``max_tokens`` tokens that followed the longest suffix (``max_ngram`` down to ``min_ngram``) seen earlier, or none."""
        if max_tokens <= 0:
            return []
        length = len(self.ids)
        for n in range(min(self.max_ngram, length), self.min_ngram - 1, -1):
            follower = self._follower[n].get(tuple(self.ids[length - n :]))
            if follower is not None:
                # what followed then runs up to now; past that, the guess copies itself, as a loop would go on
                known = self.ids[follower:]
                return [known[i % len(known)] for i in range(max_tokens)]
        return []
