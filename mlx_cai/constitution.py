"""Constitution: the principles and few-shot demonstrations that drive critique and revision.

Reads (never writes) one of three formats, detected by content rather than file extension:

* ours (YAML, e.g. ``configs/constitution.yaml``): ``name``, ``version``,
  ``principles: [{id, critique, revision}]`` and optional
  ``few_shot: [{id, prompt, response, critique, revision, principle}]``;
* Anthropic's critique/revision instructions JSON:
  ``{"harmful0": {"prompt": ["<critique request>"], "edit_request": "<revision request>"}}``;
* Hugging Face llm-swarm JSON: ``{"constitutions": [{"critic", "revision"}], "system_chat": [[messages]]}``
  (a bare list of ``{"critic", "revision"}`` is accepted too, as in its older examples).

Every validation problem raises ``ConstitutionError`` with a one-line message naming the file and field.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

# Editable installs import this file from the source tree, so the repo's configs/ sits next to the package.
DEFAULT_PATH: Path = Path(__file__).resolve().parent.parent / "configs" / "constitution.yaml"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_OUR_TOP = ("name", "version", "principles", "few_shot")
_PRINCIPLE_KEYS = ("id", "critique", "revision", "categories")
_DEMO_KEYS = ("id", "prompt", "response", "critique", "revision", "principle")
# Anthropic's file wraps each request in its raw-prompt framing; only the request itself is useful in a chat.
_ANTHROPIC_CRITIQUE_FRAME = (re.compile(r"^CritiqueRequest:\s*"), re.compile(r"\s*Critique:$"))
_ANTHROPIC_REVISION_FRAME = (re.compile(r"^RevisionRequest:\s*"), re.compile(r"\s*Revision:$"))
_CHAT_ROLES = ("user", "assistant") * 3


class ConstitutionError(ValueError):
    """A constitution file or selection is invalid; the message is one line naming file and field."""


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str  # critique request shown to the model after its answer
    revision: str  # revision request shown after its critique
    categories: tuple[str, ...] = ()  # prompt categories it is written for (sample_principle(..., category=))


@dataclass(frozen=True)
class Demonstration:
    """One worked red-team -> critique -> revision exchange used as a few-shot example.

    The request texts are resolved at load time so a demo renders on its own, and so imported
    conversations keep the exact wording they were written with.
    """

    id: str
    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None  # None only for imported chats whose requests match no principle
    critique_request: str
    revision_request: str

    def to_messages(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.response},
            {"role": "user", "content": self.critique_request},
            {"role": "assistant", "content": self.critique},
            {"role": "user", "content": self.revision_request},
            {"role": "assistant", "content": self.revision},
        ]


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    principles: tuple[Principle, ...]
    few_shot: tuple[Demonstration, ...] = ()

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.principles)

    def principle(self, id: str) -> Principle:
        for p in self.principles:
            if p.id == id:
                return p
        raise ConstitutionError(f"unknown principle id '{id}'; known: {', '.join(self.ids)}")


# --------------------------------------------------------------------------------------------- loading


def load(path: str | Path = DEFAULT_PATH) -> Constitution:
    """Load and validate a constitution in any supported format."""
    src = str(path)
    text = Path(path).read_text(encoding="utf-8")
    data = _parse(text, src)
    if isinstance(data, Mapping) and any(k in data for k in _OUR_TOP):
        return _from_ours(data, src)
    if isinstance(data, Mapping) and "constitutions" in data:
        return _from_llm_swarm(data, src)
    if isinstance(data, list) and data and all(isinstance(x, Mapping) and "critic" in x for x in data):
        return _from_llm_swarm({"constitutions": data}, src)
    if isinstance(data, Mapping) and data and all(
        isinstance(v, Mapping) and ("edit_request" in v or "prompt" in v) for v in data.values()
    ):
        return _from_anthropic(data, src)
    raise ConstitutionError(
        f"{src}: unknown format (expected a 'principles' mapping, llm-swarm 'constitutions', "
        "or Anthropic {id: {prompt, edit_request}} JSON)"
    )


def _parse(text: str, src: str) -> Any:
    # JSON first so JSON-only escapes parse exactly; YAML covers our own files.
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConstitutionError(f"{src}: not valid YAML or JSON{where}") from None


def _string(obj: Mapping[str, Any], key: str, field: str, src: str) -> str:
    if key not in obj or obj[key] is None:
        raise ConstitutionError(f"{src}: {field} is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise ConstitutionError(f"{src}: {field} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise ConstitutionError(f"{src}: {field} is empty")
    return value


def _mapping(obj: Any, field: str, src: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ConstitutionError(f"{src}: {field} must be a mapping, got {type(obj).__name__}")
    return obj


def _list(obj: Any, field: str, src: str) -> list[Any]:
    if not isinstance(obj, list):
        raise ConstitutionError(f"{src}: {field} must be a list, got {type(obj).__name__}")
    return obj


def _no_unknown_keys(obj: Mapping[str, Any], allowed: Sequence[str], field: str, src: str) -> None:
    # Typos like 'critque' would otherwise surface later as a confusing "is missing".
    for key in obj:
        if key not in allowed:
            where = f"{field}: " if field else ""
            raise ConstitutionError(
                f"{src}: {where}unknown key '{key}' (expected {', '.join(allowed)})"
            )


def _check_id(value: str, field: str, src: str, seen: dict[str, str]) -> None:
    if not _ID_RE.match(value):
        raise ConstitutionError(
            f"{src}: {field} '{value}' must be a slug (letters, digits, '-', '_', '.')"
        )
    if value in seen:
        raise ConstitutionError(f"{src}: {field} '{value}' duplicates {seen[value]}")
    seen[value] = field


def _principles_nonempty(principles: list[Principle], field: str, src: str) -> tuple[Principle, ...]:
    if not principles:
        raise ConstitutionError(f"{src}: {field} is empty; a constitution needs at least one principle")
    return tuple(principles)


def _from_ours(data: Mapping[str, Any], src: str) -> Constitution:
    _no_unknown_keys(data, _OUR_TOP, "", src)
    name = _string(data, "name", "name", src)
    version = _string(data, "version", "version", src)

    principles: list[Principle] = []
    seen: dict[str, str] = {}
    if data.get("principles") is None:
        raise ConstitutionError(f"{src}: principles is missing")
    for i, raw in enumerate(_list(data["principles"], "principles", src)):
        field = f"principles[{i}]"
        item = _mapping(raw, field, src)
        _no_unknown_keys(item, _PRINCIPLE_KEYS, field, src)
        pid = _string(item, "id", f"{field}.id", src)
        _check_id(pid, f"{field}.id", src, seen)
        cats = item.get("categories") or []
        if not isinstance(cats, list) or not all(isinstance(c, str) and c.strip() for c in cats):
            raise ConstitutionError(f"{src}: {field}.categories must be a list of category names, e.g. [malware]")
        principles.append(
            Principle(
                id=pid,
                critique=_string(item, "critique", f"{field}.critique", src),
                revision=_string(item, "revision", f"{field}.revision", src),
                categories=tuple(c.strip() for c in cats),
            )
        )
    # Checked before demos so an empty list isn't reported as a dangling demo principle.
    frozen = _principles_nonempty(principles, "principles", src)
    by_id = {p.id: p for p in frozen}

    demos: list[Demonstration] = []
    demo_seen: dict[str, str] = {}
    raw_shots = data.get("few_shot")
    for i, raw in enumerate(_list(raw_shots, "few_shot", src) if raw_shots is not None else []):
        field = f"few_shot[{i}]"
        item = _mapping(raw, field, src)
        _no_unknown_keys(item, _DEMO_KEYS, field, src)
        did = _string(item, "id", f"{field}.id", src)
        _check_id(did, f"{field}.id", src, demo_seen)
        texts = {k: _string(item, k, f"{field}.{k}", src) for k in _DEMO_KEYS[1:]}
        principle = by_id.get(texts["principle"])
        if principle is None:
            raise ConstitutionError(
                f"{src}: {field}.principle '{texts['principle']}' is not a principle id"
            )
        demos.append(
            Demonstration(
                id=did,
                prompt=texts["prompt"],
                response=texts["response"],
                critique=texts["critique"],
                revision=texts["revision"],
                principle=principle.id,
                critique_request=principle.critique,
                revision_request=principle.revision,
            )
        )
    return Constitution(name, version, frozen, tuple(demos))


def _unframe(text: str, frame: tuple[re.Pattern[str], re.Pattern[str]]) -> str:
    head, tail = frame
    return tail.sub("", head.sub("", text)).strip()


def _from_anthropic(data: Mapping[str, Any], src: str) -> Constitution:
    principles: list[Principle] = []
    seen: dict[str, str] = {}
    for key, raw in data.items():
        item = _mapping(raw, str(key), src)
        _check_id(str(key), "key", src, seen)
        prompts = item.get("prompt")
        if isinstance(prompts, list) and prompts:
            # The paper's file allows several phrasings per principle; the first is canonical.
            critique = _string({"prompt": prompts[0]}, "prompt", f"{key}.prompt[0]", src)
        else:
            critique = _string(item, "prompt", f"{key}.prompt", src)
        revision = _string(item, "edit_request", f"{key}.edit_request", src)
        principles.append(
            Principle(
                id=str(key),
                critique=_unframe(critique, _ANTHROPIC_CRITIQUE_FRAME),
                revision=_unframe(revision, _ANTHROPIC_REVISION_FRAME),
            )
        )
    return Constitution(
        Path(src).stem, "import:anthropic", _principles_nonempty(principles, "top level", src)
    )


def _from_llm_swarm(data: Mapping[str, Any], src: str) -> Constitution:
    principles: list[Principle] = []
    for i, raw in enumerate(_list(data["constitutions"], "constitutions", src)):
        field = f"constitutions[{i}]"
        item = _mapping(raw, field, src)
        principles.append(
            Principle(
                id=f"p{i:02d}",
                critique=_string(item, "critic", f"{field}.critic", src),
                revision=_string(item, "revision", f"{field}.revision", src),
            )
        )
    frozen = _principles_nonempty(principles, "constitutions", src)
    by_requests = {(p.critique, p.revision): p.id for p in frozen}

    chats = _list(data.get("system_chat") or [], "system_chat", src)
    if chats and all(isinstance(m, Mapping) for m in chats):
        # Flattened form (one long history, as the generation script builds it): split per exchange.
        chats = [chats[j : j + len(_CHAT_ROLES)] for j in range(0, len(chats), len(_CHAT_ROLES))]
    demos: list[Demonstration] = []
    for i, chat in enumerate(chats):
        turns = _chat_turns(chat)
        if turns is None:
            continue  # the importer only promises demos for exchanges in the canonical six-turn shape
        prompt, response, crit_req, critique, rev_req, revision = turns
        demos.append(
            Demonstration(
                id=f"chat{i:02d}",
                prompt=prompt,
                response=response,
                critique=critique,
                revision=revision,
                principle=by_requests.get((crit_req, rev_req)),
                critique_request=crit_req,
                revision_request=rev_req,
            )
        )
    return Constitution(Path(src).stem, "import:llm-swarm", frozen, tuple(demos))


def _chat_turns(chat: Any) -> tuple[str, ...] | None:
    if not isinstance(chat, list) or len(chat) != len(_CHAT_ROLES):
        return None
    out: list[str] = []
    for msg, role in zip(chat, _CHAT_ROLES):
        if not isinstance(msg, Mapping) or msg.get("role") != role:
            return None
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            return None
        out.append(content.strip())
    return tuple(out)


# ------------------------------------------------------------------------------------------ selection


def select(constitution: Constitution, ids: Sequence[str]) -> Constitution:
    """Restrict to the given principle ids (kept in constitution order).

    Few-shot demos are kept whole: they carry their own request texts and teach the
    exchange format, which matters regardless of which principles are sampled.
    """
    if isinstance(ids, str):
        raise TypeError("select() takes a list of ids, not a string")
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        raise ConstitutionError("select() needs at least one principle id")
    known = set(constitution.ids)
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise ConstitutionError(
            f"unknown principle id(s) {', '.join(repr(u) for u in unknown)}; "
            f"known: {', '.join(constitution.ids)}"
        )
    keep = tuple(p for p in constitution.principles if p.id in set(wanted))
    return Constitution(constitution.name, constitution.version, keep, constitution.few_shot)


def sample_principle(constitution: Constitution, rng: random.Random, category: str | None = None) -> Principle:
    """A principle drawn uniformly; with `category`, from the principles written for it (their `categories`),
    or from all where none is (a prompt of a category the constitution does not name)."""
    pool = [p for p in constitution.principles if category and category in p.categories]
    return rng.choice(pool or constitution.principles)


def sample_shots(constitution: Constitution, k: int, rng: random.Random) -> list[Demonstration]:
    """k distinct demonstrations (fewer if the pool is smaller), in random order."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = list(constitution.few_shot)
    return rng.sample(pool, min(k, len(pool)))


def shots_to_messages(shots: Sequence[Demonstration]) -> list[dict[str, str]]:
    """Flat chat history: per demo, prompt/response/critique request/critique/revision request/revision."""
    return [msg for shot in shots for msg in shot.to_messages()]
