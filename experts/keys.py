"""An expert's key as people and reports write it: "layer:expert", e.g. "3:7"."""


def expert_key(layer: int, expert: int) -> str:
    return f"{layer}:{expert}"


def parse_expert_key(key: str) -> tuple[int, int]:
    """(layer, expert) of "layer:expert"; ValueError naming the key otherwise."""
    layer, _, expert = str(key).partition(":")
    if not (layer.isdigit() and expert.isdigit()):
        raise ValueError(f'expert {key!r} must be "layer:expert", e.g. "3:7"')
    return int(layer), int(expert)
