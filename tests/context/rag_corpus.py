"""A tiny corpus for RAG tests: six distractor documents of several types and one planted passage, with a
question that paraphrases the planted passage (few words in common)."""

from pathlib import Path

DISTRACTORS = {
    "cooking.md": "# Bread\n\nKnead the dough for ten minutes, let it rise for an hour in a warm kitchen, then bake "
                  "it at 220 degrees until the crust is golden and sounds hollow when tapped.",
    "astronomy.txt": "Jupiter is the largest planet of the solar system. Its Great Red Spot is a storm larger than "
                     "the Earth that has raged for centuries.",
    "finance.csv": "quarter, revenue, growth\nQ1, 4.2M, 3%\nQ2, 4.8M, 14%\nQ3, 5.1M, 6%\n",
    "garden.html": "<html><body><h1>Roses</h1><p>Prune roses in late winter, just above an outward-facing bud, and "
                   "feed them in spring.</p></body></html>",
    "network.json": '{"topic": "networking", "text": "TCP retransmits lost segments after a timeout that grows '
                    'exponentially with every failure."}',
    "history.md": "The printing press, built by Gutenberg around 1440, made books cheap enough for ordinary people.",
}
PLANTED = ("Every March the villagers of Kestrel Hollow climb onto their houses and paint the roofs sky blue, a "
           "custom said to keep storms away from the harvest.")
QUESTION = "In which month do the people of that village repaint their rooftops?"


def write_corpus(folder: Path) -> Path:
    """The documents under `folder` (the planted one as notes/village.txt); returns `folder`."""
    for name, text in DISTRACTORS.items():
        (folder / name).write_text(text)
    (folder / "notes").mkdir()
    (folder / "notes" / "village.txt").write_text(PLANTED)
    return folder
