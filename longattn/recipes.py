"""Named recipes: small TOML files in `patches/` naming a method, its parameters and the paper they follow.

    method = "dense"
    paper = "..."            # where this configuration comes from
    description = "..."      # one line
    layers = "all"           # optional: "all", a slice like "2:", or a list of layer indices
    [params]
    backend = "auto"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheels carry the recipes inside the package; a source checkout has them at the repository root.
RECIPE_DIRS = (_PACKAGE_DIR / "patches", _PACKAGE_DIR.parent / "patches")


@dataclass
class Recipe:
    name: str
    method: str
    params: dict = field(default_factory=dict)
    layers: object = None
    paper: str = ""
    description: str = ""


def recipe_paths() -> dict[str, Path]:
    found = {}
    for d in RECIPE_DIRS:
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def recipe_names() -> list[str]:
    return sorted(recipe_paths())


def find_recipe(name_or_path) -> Path | None:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return p
    if p.suffix == ".toml":
        raise FileNotFoundError(f"recipe file not found: {p}")
    return recipe_paths().get(str(name_or_path))


def load_recipe(path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    if "method" not in data or not isinstance(data["method"], str):
        raise ValueError(f"{path}: a recipe needs a string field 'method'")
    unknown = set(data) - {"method", "params", "layers", "paper", "description"}
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: method, params, layers, paper, "
                         "description")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"{path}: 'params' must be a table")
    return Recipe(path.stem, data["method"], params, data.get("layers"), data.get("paper", ""),
                  data.get("description", ""))
