"""Write the data of the GRPO subtraction demo: training prompts and the 100 held-out items of the demo model's card.

    python examples/subtraction_data.py OUT_DIR [--train 2000] [--heldout 100]

`OUT_DIR/train.jsonl` holds subtraction questions (`messages` ending with the user's turn, and the `answer` column
that `--reward exact_match` compares with); `OUT_DIR/heldout.jsonl` holds the held-out items in the same form, which
`nomoat eval --data` scores. The held-out items are the subtraction items that `nomoat.demo.score.evaluate_model`
drew for the shipped model's `accuracy.json` (its `sub` figure); the training prompts come from another seed and never
ask about a held-out pair of numbers (in any phrasing), so the held-out accuracy measures what generalises.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from nomoat.demo.score import EVAL_SEED
from nomoat.demo.tasks import SCORED, Item, generate_items

TRAIN_SEED = 20_000  # neither the pretraining seeds (below EVAL_SEED) nor the held-out one


def heldout_items(n: int = 100) -> list[Item]:
    """The first `n` subtraction items of the model card's evaluation (n per task, tasks taken in turn)."""
    items = generate_items(n * len(SCORED), seed=EVAL_SEED, tasks=SCORED)
    return [it for it in items if it.task == "sub"][:n]


def numbers(item: Item) -> tuple[int, ...]:
    """The numbers a subtraction question asks about, larger first (the same pair whatever the phrasing)."""
    return tuple(sorted((int(n) for n in re.findall(r"\d+", item.prompt[-1]["content"])), reverse=True))


def train_items(n: int, heldout: int = 100) -> list[Item]:
    """`n` subtraction questions from the training seed, none about a pair of numbers of the first `heldout` items.

    Drawn in order from the training seed, skipping questions on a held-out pair: the first `n` kept.
    """
    excluded = {numbers(it) for it in heldout_items(heldout)}
    drawn = generate_items(2 * n + 16, seed=TRAIN_SEED, tasks=("sub",))  # about 2% of the pairs are held out
    return [it for it in drawn if numbers(it) not in excluded][:n]


def write(items: list[Item], path: Path) -> None:
    """One JSON line per item: the question's `messages` and the `answer`."""
    lines = [json.dumps({"messages": it.prompt, "answer": it.answer}) for it in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    """Parse the arguments and write both files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="Folder to write train.jsonl and heldout.jsonl into.")
    parser.add_argument("--train", type=int, default=2000, help="Training prompts.")
    parser.add_argument("--heldout", type=int, default=100, help="Held-out items (at most 100 are the card's).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write(train_items(args.train, max(args.heldout, 100)), args.out / "train.jsonl")
    write(heldout_items(args.heldout), args.out / "heldout.jsonl")
    print(f"wrote {args.out / 'train.jsonl'} ({args.train}) and {args.out / 'heldout.jsonl'} ({args.heldout})")


if __name__ == "__main__":
    main()
