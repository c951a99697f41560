"""One `nomoat synth` run: open the output (resuming it), run a mode's maker, and write the provenance whatever happens.

`synthesize` is what the command calls: it returns a `SynthResult` (counts, status, paths) whether the run completed,
left failures behind, or was stopped by a fatal teacher error or Ctrl-C (then the partial file and its provenance are
written first and the error goes on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomoat.synth.instructions import InstructionMaker, InstructionSettings, load_seed_tasks
from nomoat.synth.output import SynthOutput, Tally
from nomoat.synth.pairs import PairMaker, PairsSettings, Progress, load_prompts
from nomoat.synth.teacher import Teacher
from nomoat.util.errors import UsageError
from nomoat.util.files import sha256_file

MODES = ("instructions", "pairs")


@dataclass
class SynthResult:
    """What a run did.

    Attributes:
        out: The dataset file.
        provenance: Its provenance record.
        records: Records in the file now.
        resumed: Records that were there before the run.
        tally: Written, filtered and failed in this run.
        status: `complete`, or `incomplete` (failures, or instructions that stopped short of the number wanted).
    """

    out: Path
    provenance: Path
    records: int
    resumed: int
    tally: Tally
    status: str


def synthesize(mode: str, teacher: Teacher, inputs: str, out: str | Path,
               settings: PairsSettings | InstructionSettings, progress: Progress | None = None,
               flush_every: float = 2.0) -> SynthResult:  # fmt: skip
    """Make (or complete) a dataset file with a teacher.

    Args:
        mode: `instructions` (self-instruct from the seed tasks in `inputs`) or `pairs` (from the prompts in `inputs`).
        teacher: A `LocalTeacher` or `RemoteTeacher`.
        inputs: The seed or prompt file.
        out: The JSONL file to write; records already in it are kept and their work skipped.
        settings: The mode's settings.
        progress: Called with (done, total) as work completes.
        flush_every: Seconds between rewrites of the file.

    Raises:
        UsageError: An unknown mode, bad settings, or an output file made with other settings.
        DataError: A bad input file.
        TeacherError: The teacher refused every request (the partial file and the provenance are written first).
    """
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: choose {' or '.join(MODES)}")
    if not Path(inputs).is_file():
        raise UsageError(f"{inputs}: file not found", hint="give the seed or prompt file with --prompts")
    teacher.connect()  # an unreachable server fails here, before any file is touched
    record = {k: v for k, v in vars(settings).items() if k not in ("chunk", "batch", "patience")}
    described = teacher.describe()
    ident = {"mode": mode, "teacher": described, **record}
    maker: PairMaker | InstructionMaker
    if mode == "pairs":
        assert isinstance(settings, PairsSettings)
        maker, items = PairMaker(teacher, settings), load_prompts(inputs)
    else:
        assert isinstance(settings, InstructionSettings)
        maker, items = InstructionMaker(teacher, settings), load_seed_tasks(inputs)
    output = SynthOutput(out, ident, flush_every=flush_every)
    tally = Tally()
    extra: dict[str, Any] = {"inputs": {"path": str(inputs), "sha256": sha256_file(inputs), "records": len(items)},
                             "teacher": described}  # fmt: skip
    status = "stopped"
    try:
        reached = maker.run(items, output, tally, progress)  # type: ignore[arg-type]
        status = "complete" if not tally.failures and reached is not False else "incomplete"
    finally:
        path = output.finish(tally, status, extra)
    return SynthResult(Path(out), path, len(output.records), output.resumed, tally, status)


__all__ = ["MODES", "SynthResult", "synthesize"]
