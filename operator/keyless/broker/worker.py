"""Entry point of broker workers 1..N-1 (started by worker 0 with `--workers N`; see workers.py)."""
import argparse
import os
import sys

from .main import run_worker
from .workers import WORKER_ENV, WorkerRole

role, values = WorkerRole.from_env(os.environ.pop(WORKER_ENV))
sys.exit(run_worker(argparse.Namespace(**values), role))
