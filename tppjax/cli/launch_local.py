"""Run N copies of a JAX script on this machine as one multi-process job, over loopback.

    python scripts/launch_local.py --processes 2 --cpu-devices-per-process 4 -- \\
        scripts/train.py --mesh data=2,stage=2,tensor=2

Process i gets `--cpu-devices K --coordinator 127.0.0.1:PORT --num-processes N --process-id i`
(PORT: a free one). Their output is forwarded line by line with an `[i]` prefix. When one process
fails, the launcher stops the others (SIGTERM, then SIGKILL after --grace seconds), says which one
failed and exits with its code; it exits 0 only when every process did. This is the same engine
that runs GPU clusters and TPU pods, with CPU devices and gloo collectives instead.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tppjax.cli.flags import Parser, check_limits

TAG = "[launch]"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LIMITS = {"processes": (1, None), "cpu_devices_per_process": (1, None), "port": (1, 65535),
          "grace": (0, None)}


def parse_args(argv=None):
    """(flags, the command after `--`); a bad flag or no command is one line and exit 2,
    before any process starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, required=True, help="how many processes to start")
    p.add_argument("--cpu-devices-per-process", type=int, default=4)
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the others")
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        p.error("no command to run: give it after --, e.g. --processes 2 -- scripts/train.py")
    check_limits(p, args, LIMITS)
    return args, command


def forward(i: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"[{i}] {line}" if line.endswith("\n") else f"[{i}] {line}\n")
            sys.stdout.flush()
    stream.close()


def stop(procs, grace: float) -> None:
    """SIGTERM every live process group, SIGKILL whatever is left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
    for p in procs:
        p.wait()


def _signal_group(p, sig) -> None:
    try:
        os.killpg(p.pid, sig)  # each child leads its own group: its helpers go too
    except (ProcessLookupError, PermissionError):
        pass


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def main(argv=None) -> int:
    args, command = parse_args(argv)
    n, port = args.processes, args.port or free_port()
    if command[0].endswith(".py"):
        command = [sys.executable, *command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lock = threading.Lock()
    procs, threads = [], []

    def on_signal(signum, _frame):
        print(f"{TAG} got {signal.Signals(signum).name}: stopping all processes", file=sys.stderr,
              flush=True)
        stop(procs, args.grace)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(n):
        cmd = [*command, "--cpu-devices", str(args.cpu_devices_per_process),
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
               "--process-id", str(i)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, start_new_session=True, bufsize=1)
        procs.append(p)
        with lock:
            print(f"{TAG} process {i}: pid {p.pid}", flush=True)
        t = threading.Thread(target=forward, args=(i, p.stdout, lock), daemon=True)
        t.start()
        threads.append(t)

    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0):
                failed = i
                break
        time.sleep(0.05)
    if failed is None:  # all ended: one may have failed in the last interval
        failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
        code = procs[failed].returncode
        others = [i for i, p in enumerate(procs) if p.poll() is None]
        with lock:
            print(f"{TAG} error: process {failed} {describe(code)}"
                  + (f"; stopping processes {others}" if others else ""), file=sys.stderr,
                  flush=True)
        stop(procs, args.grace)
    for t in threads:
        t.join(timeout=5)
    if failed is None:
        return 0
    code = procs[failed].returncode
    return code if code > 0 else 128 + (-code)


if __name__ == "__main__":
    sys.exit(main())
