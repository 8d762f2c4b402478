"""Read the collectives out of a compiled XLA program.

Tests and benchmarks assert *structure* (which collectives, how many, how big, over
which mesh axes) rather than timings, so they need the collectives of the optimised
program: `jax.jit(f).lower(*args).compile().as_text()`. This module parses that text.

Facts about the text (checked on jax 0.10.2, CPU backend) that shape the parser:
- Replica groups name *logical* device ids, i.e. positions in the flattened mesh
  (`mesh.devices.flat`), not `Device.id`: a mesh built from permuted devices prints the
  same groups. We therefore map id -> `np.unravel_index(id, mesh.devices.shape)`.
- Groups come in three spellings: explicit `{{0,1},{2,3}}`; iota `[2,4]<=[2,4]T(1,0)`;
  and XLA's mesh-axes form `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` (optionally with
  `, device_ids=([2,4]T(1,0))` and sub-axes `'axis_0':(1)2`). The mesh-axes form uses
  XLA's own anonymous mesh, so we expand it to explicit groups and map those.
- A `lax.scan` body appears once; the enclosing `while` carries
  `"known_trip_count":{"n":"K"}` in its backend_config. A while without a known trip
  count is counted as running once (the true count is data dependent), as is a
  collective in a computation that no parsed call edge reaches.
- Async pairs (`all-reduce-start`/`-done`, ...) are counted once, at the `-start`, with
  the `-done`'s result shape (the `-start` result also holds the operands/contexts).
- Operands are printed by name only (`all-gather(%fusion.2)`): their shapes are looked up
  in the same computation. Each collective keeps its operand and result dimensions, so a
  caller can tell *what* moved (e.g. a weight shard vs an activation: `tppjax.measure.analysis`).
- XLA's own `cost_analysis()` counts a loop body once, whatever its trip count; `flops` here
  counts every dot (2·M·N·K from its shapes) and elementwise op as often as it runs. Fused ops
  sit in fusion computations (`calls=`), counted with their fusion.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import numpy as np

OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
         "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128, "s4": 4, "u4": 4, "s2": 2, "u2": 2, "token": 0}

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALL_ONE = re.compile(
    r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_CALL_MANY = re.compile(r"\b(?:branch_computations|called_computations|calls)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_IOTA = re.compile(r"\[([\d,\s]+)\]<=\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?")


@dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled program (see module docstring)."""
    op: str                 # one of OPS
    bytes: int              # per device, one execution (reduce-scatter: operand size)
    count: int              # executions per call (product of enclosing trip counts)
    axes: tuple[str, ...]   # mesh axes its groups / source-target pairs span
    name: str               # metadata op_name ('' if none)
    operands: tuple[tuple[int, ...], ...] = ()  # per-device operand dims, one per array
    results: tuple[tuple[int, ...], ...] = ()   # per-device result dims, one per array

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(element type, dims) of each array in an HLO shape string, tuples flattened in order;
    layouts are ignored and a dynamic dim `<=5` counts at its bound."""
    shape = re.sub(r"\{[^{}]*\}", "", shape)  # drop layouts like {1,0} or {1,0:T(8,128)}
    return [(dtype, tuple(int(d) for d in filter(None, (d.strip().lstrip("<=")
                                                        for d in dims.split(",")))))
            for dtype, dims in _ARRAY.findall(shape)]


def shape_dims(shape: str) -> tuple[tuple[int, ...], ...]:
    """Dims of each array in an HLO shape string: `(f32[4,8]{1,0}, s32[])` -> ((4, 8), ())."""
    return tuple(dims for _, dims in _arrays(shape))


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; tuples sum their leaves; layouts are ignored."""
    total = 0
    for dtype, dims in _arrays(shape):
        if dtype not in _BITS and not dtype.startswith("f8") and not dtype.startswith("f4"):
            raise ValueError(f"unknown element type {dtype!r} in {shape!r}")
        bits = _BITS.get(dtype, 8 if dtype.startswith("f8") else 4)
        total += (int(np.prod(dims, dtype=np.int64)) * bits + 7) // 8
    return total


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside (), [], {} and quotes."""
    out, depth, cur, quoted = [], 0, [], False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "([{":
            depth += 1
        elif not quoted and ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _matching(s: str, start: int) -> int:
    """Index of the bracket closing the one at s[start]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for i in range(start, len(s)):
        if s[i] in pairs:
            stack.append(pairs[s[i]])
        elif stack and s[i] == stack[-1]:
            stack.pop()
            if not stack:
                return i
    raise ValueError(f"unbalanced brackets in {s!r}")


@dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


def _parse_instr(line: str) -> _Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):  # tuple shape: (f32[4,8]{1,0}, f32[16]{0})
        end = _matching(rest, 0) + 1
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    # Long operand lists carry comments: `%a, ..., /*index=5*/%f`.
    operands = [re.sub(r"/\*.*?\*/", "", o).strip() for o in _split_top(rest[op.end():close])]
    operands = [o for o in operands if o]
    return _Instr(name, shape, op.group(1), operands, rest[close + 1:])


def _iota(reshape: list[int], perm: list[int] | None) -> np.ndarray:
    a = np.arange(int(np.prod(reshape))).reshape(reshape)
    return a.transpose(perm) if perm else a


def _ints(s: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", s)]


def _mesh_axes_groups(spec: str) -> list[list[int]]:
    """Expand XLA's `mesh[...] [, device_ids=(...)] {axes}` form into explicit groups."""
    m = re.match(r"mesh\[([^\]]*)\](?:\s*,\s*device_ids=\((.*)\))?\s*\{(.*)\}\s*$", spec)
    if not m:
        raise ValueError(f"cannot parse replica groups {spec!r}")
    names, sizes = [], []
    for item in _split_top(m.group(1)):
        n, s = item.rsplit("=", 1)
        names.append(n.strip().strip("'\""))
        sizes.append(int(s))
    ids = m.group(2)
    if ids is None:
        devices = np.arange(int(np.prod(sizes)))
    elif (it := re.fullmatch(r"\s*\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?\s*", ids)):
        devices = _iota(_ints(it.group(1)), _ints(it.group(2)) if it.group(2) else None)
    else:
        devices = np.array(_ints(ids))
    devices = devices.reshape(sizes)
    # Per mesh dim: the sub-axes (pre_size, size) grouped over; full axis = (1, size).
    grouped: dict[int, list[tuple[int, int]]] = {}
    order: list[tuple[int, int]] = []  # (dim, pre_size) in the order listed
    for ref in filter(None, (r.strip() for r in _split_top(m.group(3)))):
        sub = re.fullmatch(r"['\"]?([^'\":]+)['\"]?(?::\((\d+)\)(\d+))?", ref)
        if not sub:
            raise ValueError(f"cannot parse mesh axis {ref!r}")
        dim = names.index(sub.group(1))
        pre, size = (int(sub.group(2)), int(sub.group(3))) if sub.group(2) else (1, sizes[dim])
        grouped.setdefault(dim, []).append((pre, size))
        order.append((dim, pre))
    # Split each grouped dim into [padding, sub-axis, ..., suffix] factors (major first).
    factors: list[int] = []
    where: dict[tuple[int, int], int] = {}
    for dim, size in enumerate(sizes):
        prefix = 1
        for pre, sub_size in sorted(grouped.get(dim, [])):
            if pre != prefix:
                factors.append(pre // prefix)
                prefix = pre
            where[(dim, pre)] = len(factors)
            factors.append(sub_size)
            prefix *= sub_size
        if prefix != size or dim not in grouped:
            factors.append(size // prefix)
    agg = [where[k] for k in order]
    keep = [i for i in range(len(factors)) if i not in agg]
    group_size = int(np.prod([factors[i] for i in agg]))
    return devices.reshape(factors).transpose(keep + agg).reshape(-1, group_size).tolist()


def replica_groups(attrs: str) -> list[list[int]] | None:
    """Groups of logical device ids from an instruction's attributes.

    Returns [] for `{}` or no attribute (= one group of all devices), None if the
    instruction has no groups (e.g. collective-permute: see `source_target_pairs`).
    """
    pos = attrs.find("replica_groups=")
    if pos < 0:
        return None
    spec = attrs[pos + len("replica_groups="):]
    if spec.startswith("{"):
        return [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", spec[:_matching(spec, 0) + 1])
                if g.strip()]
    if spec.startswith("["):
        m = _IOTA.match(spec)
        if not m:
            raise ValueError(f"cannot parse replica groups {spec[:80]!r}")
        shape = _ints(m.group(1))
        perm = _ints(m.group(3)) if m.group(3) else None
        return _iota(_ints(m.group(2)), perm).reshape(shape).tolist()
    if spec.startswith("mesh["):
        end = _matching(spec, 4) + 1
        ids = re.match(r"\s*,\s*device_ids=", spec[end:])
        if ids:
            end = _matching(spec, end + ids.end()) + 1
        end = _matching(spec, spec.index("{", end)) + 1
        return _mesh_axes_groups(spec[:end])
    raise ValueError(f"unknown replica groups format {spec[:80]!r}")


def _axes_spanned(groups: list[list[int]], mesh: jax.sharding.Mesh,
                  agree: bool) -> tuple[str, ...]:
    """Mesh axes along which members of a group differ (in mesh order).

    With agree=True every group must span the same axes (replica groups of an SPMD
    program are regular; a mismatch means a misparse); source-target pairs take the union.
    """
    shape = mesh.devices.shape
    if not groups:  # `{}`: every device in one group
        return tuple(n for n, s in zip(mesh.axis_names, shape) if s > 1)
    spans = []
    for g in groups:
        coords = np.array(np.unravel_index(np.asarray(g, dtype=np.int64), shape))
        spans.append(frozenset(int(i) for i in np.nonzero((coords != coords[:, :1]).any(1))[0]))
    if agree and len(set(spans)) > 1:
        raise ValueError(f"replica groups span different mesh axes: {groups}")
    union = frozenset().union(*spans)
    return tuple(mesh.axis_names[i] for i in sorted(union))


def _parse_computations(text: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = _COMP_HEADER.match(line)
        if head:
            current = head.group(2)
            comps[current] = []
            if head.group(1):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            ins = _parse_instr(line)
            if ins is not None:
                comps[current].append(ins)
    if not entry:
        raise ValueError("no ENTRY computation in HLO text")
    return comps, entry


def _execution_counts(comps: dict[str, list[_Instr]], entry: str) -> dict[str, int]:
    """How often each computation runs per call: sum over call sites of caller count x
    loop multiplier (a while body runs trip-count times, its condition trip-count + 1)."""
    calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}  # callee -> (caller, mult)
    for caller, instrs in comps.items():
        for ins in instrs:
            trip = _TRIP.search(ins.attrs)
            n = int(trip.group(1)) if trip else 1
            for kind, callee in _CALL_ONE.findall(ins.attrs):
                mult = n if kind == "body" else n + 1 if kind == "condition" and trip else 1
                calls.setdefault(callee, []).append((caller, mult))
            for group in _CALL_MANY.findall(ins.attrs):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    calls.setdefault(callee, []).append((caller, 1))
    memo: dict[str, int] = {entry: 1}

    def count(c: str) -> int:
        if c not in memo:
            memo[c] = 0  # guards against cycles, which HLO does not have
            memo[c] = sum(count(caller) * m for caller, m in calls.get(c, []))
        return memo[c]

    return {c: count(c) for c in comps}


def collectives(compiled_text: str, mesh: jax.sharding.Mesh) -> list[Collective]:
    """All collectives in `compiled_text` (the output of `Compiled.as_text()`), in text order."""
    comps, entry = _parse_computations(compiled_text)
    counts = _execution_counts(comps, entry)
    found = []
    for comp, instrs in comps.items():
        shapes = {i.name: i.shape for i in instrs}
        done = {i.operands[0].split()[-1].lstrip("%"): i.shape
                for i in instrs if i.opcode.endswith("-done") and i.operands}
        for ins in instrs:
            op = ins.opcode.removesuffix("-start")
            if op not in OPS:
                continue
            # An operand is a name, or (older printers) its shape followed by its name.
            operands = [o if "[" in o else shapes[o.lstrip("%")] for o in ins.operands]
            result = done.get(ins.name, ins.shape)
            if op == "reduce-scatter":
                size = sum(shape_bytes(o) for o in operands)
            else:
                size = shape_bytes(result)
            if op == "collective-permute":
                pairs = re.search(r"source_target_pairs=(\{.*?\}\})", ins.attrs)
                groups = [_ints(p) for p in re.findall(r"\{([\d,\s]+)\}", pairs.group(1))] \
                    if pairs else []
                axes = _axes_spanned(groups, mesh, agree=False)
            else:
                axes = _axes_spanned(replica_groups(ins.attrs) or [], mesh, agree=True)
            name = _OP_NAME.search(ins.attrs)
            # A computation no parsed edge reaches (count 0) is reported once, not dropped.
            found.append(Collective(op, size, counts[comp] or 1, axes,
                                    name.group(1) if name else "",
                                    sum(map(shape_dims, operands), ()), shape_dims(result)))
    return found


# Elementwise arithmetic: one FLOP per result element. Reductions: one per operand element.
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs",
                "exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "tanh",
                "sqrt", "rsqrt", "cbrt", "power", "erf", "sine", "cosine", "compare", "select",
                "clamp", "floor", "ceil", "round-nearest-even", "sign"}
_REDUCTIONS = {"reduce", "reduce-window"}


@dataclass(frozen=True)
class Flops:
    """The arithmetic of one instruction of the compiled program."""
    kind: str   # "dot" (dot or convolution) or "elementwise" (incl. reductions)
    flops: int  # per device, one execution
    count: int  # executions per call (product of enclosing trip counts)
    name: str   # metadata op_name ('' if none)


def _dims_attr(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([\d,\s]*)\}}", attrs)
    return _ints(m.group(1)) if m else []


def _instr_flops(ins: _Instr, shapes: dict[str, str]) -> tuple[str, int] | None:
    def elements(dims) -> int:
        return int(np.prod(dims, dtype=np.int64))

    def operand(i: int) -> tuple[int, ...]:
        o = ins.operands[i]
        return shape_dims(o if "[" in o else shapes[o.lstrip("%")])[0]

    if ins.opcode in _ELEMENTWISE:
        return "elementwise", elements(shape_dims(ins.shape)[0])
    if ins.opcode in _REDUCTIONS:
        return "elementwise", elements(operand(0))
    if ins.opcode == "dot":
        k = elements([operand(0)[i] for i in _dims_attr(ins.attrs, "lhs_contracting_dims")])
        return "dot", 2 * elements(shape_dims(ins.shape)[0]) * k
    if ins.opcode == "convolution":  # per output element: the kernel's elements per output feature
        labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs).group(1)
        kernel = operand(1)
        return "dot", (2 * elements(shape_dims(ins.shape)[0]) * elements(kernel)
                       // kernel[labels.index("o")])
    return None


def flops(compiled_text: str) -> list[Flops]:
    """Every dot, convolution and elementwise instruction of `compiled_text`, with how often it
    runs. Computations applied per element (a reduction's `to_apply`) are not counted: their
    reduction counts once per operand element instead."""
    comps, entry = _parse_computations(compiled_text)
    counts = _execution_counts(comps, entry)
    applied = {callee for instrs in comps.values() for ins in instrs
               for kind, callee in _CALL_ONE.findall(ins.attrs) if kind == "to_apply"}
    name_of = _names(comps)
    found = []
    for comp, instrs in comps.items():
        if comp in applied:
            continue
        shapes = {i.name: i.shape for i in instrs}
        for ins in instrs:
            work = _instr_flops(ins, shapes)
            if work and work[1]:
                found.append(Flops(work[0], work[1], counts[comp] or 1, name_of(comp, ins)))
    return found


def _names(comps: dict[str, list[_Instr]]):
    """name_of(computation, instruction) → its op_name, or where XLA left none (the CPU
    backend's XNNPACK fusions drop the metadata of the dots they fuse) the name of what called
    its computation, else of its first named user: the op it was fused or rewritten for."""
    caller = {callee: (comp, ins) for comp, instrs in comps.items() for ins in instrs
              for kind, callee in _CALL_ONE.findall(ins.attrs) if kind == "calls"}
    users: dict[tuple[str, str], list[_Instr]] = {}
    for comp, instrs in comps.items():
        for ins in instrs:
            for o in ins.operands:
                users.setdefault((comp, o.split()[-1].lstrip("%")), []).append(ins)
    memo: dict[tuple[str, str], str] = {}

    def name_of(comp: str, ins: _Instr) -> str:
        key = (comp, ins.name)
        if key not in memo:
            memo[key] = ""  # guards against cycles
            own = _OP_NAME.search(ins.attrs)
            if own:
                memo[key] = own.group(1)
            else:
                up = [caller[comp]] if comp in caller else []
                for c, i in up + [(comp, u) for u in users.get(key, [])]:
                    if (found := name_of(c, i)):
                        memo[key] = found
                        break
        return memo[key]

    return name_of


def census(colls: list[Collective]) -> dict[str, dict]:
    """Per op kind: {'count': executions per call, 'bytes': bytes moved per device per call};
    for `Collective` rows or `tppjax.measure.census.Executed` ones (counts per stage, averaged)."""
    out: dict[str, dict] = {}
    for c in colls:
        entry = out.setdefault(c.op, {"count": 0, "bytes": 0})
        entry["count"] += c.count
        entry["bytes"] += c.total_bytes
    return out
