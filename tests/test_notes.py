"""Every note is true for the run it describes: each is shown when its condition holds and
absent when it does not. (The remote run's notes — "sampled with the think settings" was
said to a spec without a think phase — are tested in test_remote_failures.py.)"""

from __future__ import annotations

import pandas as pd
import pytest


def frame(think_ranks, answer_ranks) -> pd.DataFrame:
    return pd.DataFrame(
        {"condition": ["c"] * len(think_ranks), "think_beam_rank": think_ranks,
         "answer_beam_rank": answer_ranks}
    )  # fmt: skip


@pytest.mark.parametrize(
    ("think_ranks", "answer_ranks", "shown"),
    [
        ([0, 1, 2], [None] * 3, ["think"]),  # ranked reasonings
        ([None] * 3, [0, 1, 2], ["answer"]),  # ranked answers of a sampled reasoning
        ([None] * 3, [0, 0, 0], []),  # each the top answer beam after its own draw
        ([None] * 3, [None] * 3, []),  # draws
    ],
)
def test_the_beam_note_is_shown_exactly_for_ranked_rows(think_ranks, answer_ranks, shown):
    from muestra.analysis import _beam_notes

    notes = _beam_notes(frame(think_ranks, answer_ranks))
    assert [n.split("most likely ")[1].split(" ")[0] for n in notes] == shown
