"""Write the prompts of the DPO demo: training prompts for `nomoat synth --mode pairs` and held-out items to score.

    python examples/dpo_data.py OUT_DIR [--task compare] [--train 600] [--heldout 100]

`OUT_DIR/prompts.jsonl` holds questions of one task of the demo model (`messages` ending with the user's turn, and
the `answer` column that `--reward exact_match` compares with); `OUT_DIR/heldout.jsonl` holds held-out items in the
same form, which `nomoat eval --data` scores. The held-out items are the task's items that
`nomoat.demo.score.evaluate_model` drew for the shipped model's `accuracy.json`; the training prompts come from
another seed, so they are not the held-out questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nomoat.demo.score import EVAL_SEED
from nomoat.demo.tasks import SCORED, Item, generate_items

TRAIN_SEED = 30_000  # neither the pretraining seeds (below EVAL_SEED), the held-out one, nor the GRPO demo's


def heldout_items(task: str, n: int = 100) -> list[Item]:
    """The first `n` items of `task` in the model card's evaluation (100 per task, tasks taken in turn)."""
    items = generate_items(100 * len(SCORED), seed=EVAL_SEED, tasks=SCORED)
    return [it for it in items if it.task == task][:n]


def train_items(task: str, n: int) -> list[Item]:
    """`n` questions of `task` from the training seed."""
    return generate_items(n, seed=TRAIN_SEED, tasks=(task,))


def write(items: list[Item], path: Path) -> None:
    """One JSON line per item: the question's `messages` and the `answer`."""
    lines = [json.dumps({"messages": it.prompt, "answer": it.answer}) for it in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    """Parse the arguments and write both files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="Folder to write prompts.jsonl and heldout.jsonl into.")
    parser.add_argument("--task", default="compare", choices=SCORED, help="The demo task to ask about.")
    parser.add_argument("--train", type=int, default=600, help="Training prompts.")
    parser.add_argument("--heldout", type=int, default=100, help="Held-out items (at most 100: the card's).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write(train_items(args.task, args.train), args.out / "prompts.jsonl")
    write(heldout_items(args.task, args.heldout), args.out / "heldout.jsonl")
    print(f"wrote {args.out / 'prompts.jsonl'} ({args.train}) and {args.out / 'heldout.jsonl'} ({args.heldout})")


if __name__ == "__main__":
    main()
