"""`make bench`: ServeML's prediction path and deploy pipeline against the servers a user would pick
instead. `run.py` is the command; `serveml.py` and `peers.py` start and measure each server,
`load.py` drives wrk, `memory.py` reads /proc, `report.py` writes results.md and results.png."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
LOGS = OUT / "logs"
LOCKS = BENCH / "locks"  # each peer's pinned packages, compiled from its .in file
APPS = BENCH / "apps"  # the small servers the peers run: FastAPI, BentoML, the transport floor
PYTHON = ROOT / ".venv" / "bin" / "python"
UV = ROOT / ".venv" / "bin" / "uv"
ROW = [5.1, 3.5, 1.4, 0.2]
