"""Generated stubs are committed; this regenerates them from protos/ and compares (README: "Generated code")."""

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").glob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    assert protoc.main(args + [str(ROOT / p) for p in protos]) == 0
    generated = sorted((tmp_path / "protos").iterdir())
    assert generated, "protoc generated nothing"
    for fresh in generated:
        committed = ROOT / "protos" / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed: run the command in README 'Generated code'"
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: regenerate it"
