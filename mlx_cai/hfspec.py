"""The one grammar of Hugging Face dataset specs, `hf:REPO[:DATA_DIR][@SPLIT]`. Parsing only: reads and writes nothing.

  REPO       a Hub dataset id (OWNER/NAME) or a local dataset folder, each read by `datasets.load_dataset`
  DATA_DIR   its `data_dir`, a sub-folder of the dataset (e.g. hh-rlhf's `red-team-attempts`)
  SPLIT      a split name; `#SPLIT` is read the same (the older spelling of evaluation suites)

Prompt sources (mlx_cai.prompts), evaluation suites (mlx_cai.evalsets) and the helpful sets of `clean` (prompt
sources) all parse their `hf:` specs here. A spec without a split leaves it to the caller: prompt sources read
`train`, an evaluation suite the dataset's only split.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "hf:"
GRAMMAR = "hf:REPO[:DATA_DIR][@SPLIT]"
_SPLIT_MARKS = ("@", "#")


class HubSpecError(ValueError):
    """A spec that names no dataset; one line."""


@dataclass(frozen=True)
class HubSpec:
    repo: str
    data_dir: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        """The spec in its canonical spelling (`@SPLIT`)."""
        return PREFIX + self.repo + (f":{self.data_dir}" if self.data_dir else "") + (
            f"@{self.split}" if self.split else "")


def is_hub(spec: object) -> bool:
    """Whether `spec` is an `hf:` spec."""
    return str(spec).startswith(PREFIX)


def parse(spec: str) -> HubSpec:
    """`hf:REPO[:DATA_DIR][@SPLIT]` (or `#SPLIT`) -> HubSpec; empty parts are None. HubSpecError without a REPO."""
    if not is_hub(spec):
        raise HubSpecError(f"'{spec}' is not a Hugging Face dataset spec; use {GRAMMAR}")
    rest = spec[len(PREFIX):]
    cut = min((i for i in (rest.find(mark) for mark in _SPLIT_MARKS) if i >= 0), default=len(rest))
    rest, split = rest[:cut], rest[cut + 1:]
    repo, _, data_dir = rest.partition(":")
    if not repo:
        raise HubSpecError(f"'{spec}' names no dataset; use {GRAMMAR}")
    return HubSpec(repo, data_dir or None, split or None)
