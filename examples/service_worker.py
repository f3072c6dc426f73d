"""A job worker around ``recon.reconstruct``: what a Celery / RQ task or a Kubernetes job runs for one request.

    python examples/service_worker.py OUT_DIR [SOURCE]

processes one job (the built-in scene with the small ``cpu_small`` settings unless SOURCE is given) in a worker
thread, as a service would: progress goes to a job store (here a dict guarded by a lock, in a service a database
row or Redis hash), Ctrl-C cancels the job after the current step (``threading.Event``), and the result is the
``result.json`` recon writes into the job's directory. Exit status 0 when the job succeeded.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from recon import ReconResult, reconstruct


class JobStore:
    """Job id -> {state, progress, stage, message, result}: the status a service's API would answer with."""

    def __init__(self):
        self._jobs: dict[str, dict] = {}
        self._lock = threading.Lock()

    def update(self, job_id: str, **fields) -> None:
        with self._lock:
            self._jobs.setdefault(job_id, {}).update(fields)

    def get(self, job_id: str) -> dict:
        with self._lock:
            return dict(self._jobs.get(job_id, {}))


def process_job(job: dict, store: JobStore, cancel: threading.Event) -> ReconResult:
    """Run one job: ``{"id", "source", "out_dir", "overrides"}``; progress and the final state go to ``store``."""
    job_id = job["id"]
    store.update(job_id, state="running", progress=0.0)

    def on_progress(fraction: float, stage: str, message: str) -> None:
        store.update(job_id, progress=round(fraction, 3), stage=stage, message=message)

    result = reconstruct(job.get("source"), job["out_dir"], job.get("overrides"), on_progress=on_progress, cancel=cancel)
    store.update(job_id, state=result.status, result=str(Path(result.out_dir) / "result.json"),
                 error_kind=result.error_kind, message=result.message)
    return result


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    job = {"id": "job-1", "out_dir": argv[0], "source": argv[1] if len(argv) > 1 else None,
           "overrides": {"experiment": "cpu_small", "callbacks": {"progress": {"refresh_rate": 0}}}}
    store, cancel, results = JobStore(), threading.Event(), []
    worker = threading.Thread(target=lambda: results.append(process_job(job, store, cancel)), name="recon-worker")
    worker.start()
    last = None
    try:
        while worker.is_alive():  # what a status endpoint would serve
            status = store.get(job["id"])
            line = f"{status.get('progress', 0):6.1%}  {status.get('stage', '')}: {status.get('message', '')}"
            if line != last:
                print(line, flush=True)
                last = line
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("cancelling after the current step ...", flush=True)
        cancel.set()
        worker.join()
    status = store.get(job["id"])
    print(f"job {job['id']}: {status['state']}" + (f" ({status['error_kind']}: {status['message']})"
                                                   if status.get("error_kind") else "") + f"; {status['result']}")
    if results and results[0].succeeded:
        print(f"mesh: {results[0].paths['mesh.glb']}  PSNR {results[0].metrics.get('psnr')}")
    return 0 if results and results[0].succeeded else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
