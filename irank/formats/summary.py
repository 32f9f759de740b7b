"""`summary.json`, post-train's record of a run in its --out-dir: its one owner.

A typed record whose fields are the documented keys (docs/reference/json-output.md). It is rewritten after every
finished round (or unlearn's fine-tune) and read back to resume, so a field that is not yet known is absent from
the file, not null: `to_dict` leaves out None, except `layer`, where null means the probe read the head's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from irank.runtime.errors import UsageError


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self) -> str:
        return "ABSENT"  # one object, also after pickling (torchrun's processes receive rank 0's record)


ABSENT = _Absent()  # a `layer` not chosen yet (None: chosen, the head's input)


def _present(record) -> dict:
    return {item.name: getattr(record, item.name) for item in fields(record)
            if getattr(record, item.name) is not None and getattr(record, item.name) is not ABSENT}


@dataclass
class RoundRecord:
    """One finished round of gradual or rejudge."""

    round: int
    folder: str
    scored_rows: int
    removed: int
    kept: int
    removed_total: int
    boundary: str
    method: str
    removed_per_class: dict
    seconds: dict  # score, prune, refine
    layer: str | None = None  # on a refit probe
    val_accuracy: float | None = None  # with --val

    def to_dict(self) -> dict:
        return _present(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RoundRecord":
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


@dataclass
class Summary:
    """The run: what it was made from (`config`, which a resumed run must match) and how far it got."""

    irank_version: str
    config: dict
    strategy: str | None = None
    plan: dict | None = None  # budget, budget_source; gradual and rejudge also rounds, step (and estimate)
    finished: bool | None = None
    input_val_accuracy: float | None = None  # with --val
    unlearned: dict | None = None  # unlearn: model, epochs, best_epoch, seconds (and val_accuracy)
    folds: list | None = None  # crossfit: one record per finished half fine-tune (rows, manifest, model, ...)
    judgement: dict | None = None  # unlearn, crossfit and rejudge: the final ranking of every row
    refined: dict | None = None  # crossfit: the fine-tune on the rows kept (model, epochs, best_epoch, seconds)
    rounds: list[RoundRecord] | None = None  # gradual and rejudge
    method: str | None = None  # what --method auto ranked the rounds by
    final_round: int | None = None
    stopped_because: str | None = None
    layer: str | None | _Absent = ABSENT  # a refit probe's layer, chosen in round 1
    layer_choice: dict | None = None
    extra: dict = field(default_factory=dict)  # keys a later irank wrote: kept as they are

    def to_dict(self) -> dict:
        values = {key: value for key, value in _present(self).items() if key != "extra"}
        if self.layer is None:
            values["layer"] = None
        if self.rounds is not None:
            values["rounds"] = [record.to_dict() for record in self.rounds]
        return {**self.extra, **values}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "Summary":
        """The record in a summary.json (`where` names it in a one-line error when it is not one)."""
        names = {item.name for item in fields(cls)} - {"extra"}
        try:
            if not isinstance(values.get("config"), dict):
                raise TypeError("no config")
            known = {key: value for key, value in values.items() if key in names}
            if "rounds" in known:
                known["rounds"] = [RoundRecord.from_dict(record) for record in known["rounds"]]
            return cls(**known, extra={key: value for key, value in values.items() if key not in names})
        except (TypeError, AttributeError) as exc:
            raise UsageError(f"{where}: not a post-train summary ({exc}); pass --overwrite to start afresh") from None
