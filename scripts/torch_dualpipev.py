"""Write tests/fixtures/torch_dualpipev.json: the per-rank action order of torch's own
`ScheduleDualPipeV` (torch.distributed.pipelining), for `tests/test_schedules.py` to compare
`pipeline.schedules`' dualpipe-v against.

torch is not a dependency of this project, and `import torch` needs the CUDA libraries its
PyPI wheel links against; the order itself is plain Python. So this runs torch's code as torch
ships it: it reads `schedules.py` and `_utils.py` of a torch source tree or unpacked wheel
(`unzip torch-*.whl 'torch/distributed/pipelining/*' 'torch/version.py'`), takes out, unchanged,
`_ComputationType`, its constants, `_Action`, `generate_stage_to_rank_mapping`,
`generate_rank_to_stage_mapping` and `ScheduleDualPipeV._calculate_single_rank_operations`,
executes them, and calls the last for every rank (it reads only `self.pp_group_size` and
`self._n_microbatches`, which `ScheduleDualPipeV.__init__` sets from its stages and
`n_microbatches`).

    python scripts/torch_dualpipev.py /tmp/torchsrc/torch
"""

import argparse
import ast
import enum
import hashlib
import json
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "torch_dualpipev.json"
SIZES = [(2, 4), (2, 5), (3, 6), (4, 8), (4, 10)]  # (ranks p, micro-batches m), m >= 2p
KINDS = ("FORWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT", "UNSHARD", "RESHARD", "SEND_F",
         "RECV_F", "SEND_B", "RECV_B", "FULL_BACKWARD", "OVERLAP_F_B")


def torch_functions(torch_dir: Path) -> dict:
    """torch's definitions (see the module docstring), executed in one namespace."""
    pipelining = torch_dir / "distributed" / "pipelining"
    wanted = {
        "schedules.py": {"_ComputationType", "_Action", *KINDS},
        "_utils.py": {"generate_stage_to_rank_mapping", "generate_rank_to_stage_mapping"},
    }
    ns = {"Enum": enum.Enum, "__name__": "torch_dualpipev", **vars(typing)}
    for name, names in wanted.items():
        tree = ast.parse((pipelining / name).read_text())
        for node in tree.body:
            targets = ([node.name] if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else
                       [t.id for t in node.targets if isinstance(t, ast.Name)]
                       if isinstance(node, ast.Assign) else [])
            if names & set(targets):
                exec(compile(ast.Module([node], []), str(pipelining / name), "exec"), ns)
            if isinstance(node, ast.ClassDef) and node.name == "ScheduleDualPipeV":
                method = next(f for f in node.body if isinstance(f, ast.FunctionDef)
                              and f.name == "_calculate_single_rank_operations")
                exec(compile(ast.Module([method], []), str(pipelining / name), "exec"), ns)
    return ns


def orders(ns: dict, p: int, m: int) -> list[list[str]]:
    """Per rank, torch's actions as torch prints them: "3F1" (virtual stage 3 forward of
    micro-batch 1), "I" the input gradient, "W" the weight gradient, "B" the full backward,
    "(0F4;3B1)OVERLAP_F_B" a forward and a full backward overlapped."""
    me = types.SimpleNamespace(pp_group_size=p, _n_microbatches=m)
    return [[repr(a) for a in ns["_calculate_single_rank_operations"](me, rank)]
            for rank in range(p)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("torch_dir", type=Path, help="the `torch` package folder of a torch source "
                    "tree or unpacked wheel")
    args = ap.parse_args()
    ns = torch_functions(args.torch_dir)
    version = {}
    exec((args.torch_dir / "version.py").read_text(), version)
    schedules = args.torch_dir / "distributed" / "pipelining" / "schedules.py"
    data = {
        "source": {
            "torch": version["__version__"], "git_version": version["git_version"],
            "file": "torch/distributed/pipelining/schedules.py",
            "sha256": hashlib.sha256(schedules.read_bytes()).hexdigest(),
            "function": "ScheduleDualPipeV._calculate_single_rank_operations",
            "made_by": "scripts/torch_dualpipev.py",
        },
        "orders": {f"p={p},m={m}": orders(ns, p, m) for p, m in SIZES},
    }
    # One line per rank: the fixture reads as the schedule does.
    ranks = ",\n".join(f'  "{k}": [\n' + ",\n".join(f"   {json.dumps(r)}" for r in v) + "\n  ]"
                       for k, v in data["orders"].items())
    OUT.write_text('{\n "source": ' + json.dumps(data["source"]) + ',\n "orders": {\n' + ranks
                   + "\n }\n}\n")
    assert json.loads(OUT.read_text()) == data
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
