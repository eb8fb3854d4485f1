"""A local stand-in for RunPod's serverless job queue, for running the real worker loop end to end.

`RunpodQueue` is a real HTTP server on 127.0.0.1 speaking the protocol of the runpod SDK's worker loop, as
read in runpod-python 1.12.0 (`.venv/lib/python3.11/site-packages/runpod/`, lines as of that version):

- Configuration is environment variables the SDK reads at import time; `RunpodQueue.env()` returns them.
  `RUNPOD_WEBHOOK_GET_JOB` is `.../job-take/$ID?gpu=...`: the SDK replaces `$ID` with the worker id
  (`serverless/modules/rp_job.py:23`), which is `RUNPOD_POD_ID`, else a random uuid (`worker_state.py:18`).
  `RUNPOD_WEBHOOK_POST_OUTPUT` and `RUNPOD_WEBHOOK_POST_STREAM` carry `$RUNPOD_POD_ID` (replaced at import,
  `rp_http.py:16-24`) and `$ID` (replaced by the job id per request, `rp_http.py:63`);
  `RUNPOD_WEBHOOK_PING` carries `$RUNPOD_POD_ID` (`rp_ping.py:29-31`). Every URL already has a query
  string: the SDK appends its own parameters with `&`.
- Every request carries `Authorization: <RUNPOD_AI_API_KEY>` (`http_client.py:18-46` for the job loop,
  `rp_ping.py:37-40` for the heartbeat); note that a `~/.runpod/config.toml` API key takes precedence
  (`http_client.py:23-26`). A request without the queue's key gets 401 and is a protocol error here.
- Taking jobs (`rp_job.py:104-192`): GET `job-take/<worker>?<query>&job_in_progress=0|1`; for a batch size
  above 1 the path is `job-take-batch/<worker>` and the query adds `&batch_size=N`. The answer is one job
  `{"id", "input"}` (a list for the batch path) as `application/json`; 204 means "no job" (400 is also
  taken as "no job", 429 as "back off 5 s", any other error status is logged and retried; a single job
  without `id` or `input` is dropped with an error, `rp_job.py:185-187`). Like RunPod, this server holds
  a take request open (long poll) for up to `poll_s` seconds waiting for a job. Concurrency is 1 unless the
  handler passes a `concurrency_modifier` (`rp_scale.py:45-68`): the worker takes one job at a time and,
  while it holds one, checks again once a second (`rp_scale.py:173-208`), so short jobs cost about 1 s each.
- Results (`rp_job.py:195-304`, `rp_http.py:29-98`): POST `job-done/<worker>/<job id>?<query>&isStream=
  false`, the body a JSON object sent as `application/x-www-form-urlencoded`: `{"output": ...}` for a
  success, `{"error": "<str>"}` for a failure (`output` is left out when it is `{}`, `rp_job.py:264-283`).
  A failed POST is retried 3 times (Fibonacci back-off, `rp_http.py:33`). Progress updates go to the same
  URL with the body `{"status": "IN_PROGRESS", "output": <progress>}`, each from its own thread
  (`rp_progress.py:17-53`), so one may arrive after the job's final result; RunPod keeps the final result,
  and so does this server (`ProgressUpdate.after_result` says which arrived late).
- Generator handlers stream partial outputs to `job-stream/<worker>/<job id>?...&isStream=true`
  (`rp_job.py:195-216`); they are recorded as they come.
- Stopping single jobs (`rp_job.py:29-101`, `rp_scale.py:275-318`): the worker long-polls `job-stop/
  <worker>?...` (the take URL with `/job-take/` replaced); this server answers 204 (nothing to stop) after
  `poll_s`.
- Heartbeat (`rp_ping.py:67-115`): only when both `RUNPOD_AI_API_KEY` and `RUNPOD_POD_ID` are set, a
  separate process GETs the ping URL with `job_id` (comma-separated ids in progress, absent when idle) and
  `runpod_version` every `RUNPOD_PING_INTERVAL` ms. A failed start-up fitness check first sends one ping
  with `status=unhealthy`, `check` and `reason` (`rp_fitness.py:117-155`), then exits with status 1.
- The worker stops on SIGTERM or SIGINT (`rp_scale.py:104-136`): it finishes the jobs it holds, then exits 0.

Anything the worker sends outside this protocol (unknown path, wrong worker id, a result for a job it
never took, a second final result, a body that is not JSON) gets an error status and is listed in
`protocol_errors()`, so a test can assert that the whole conversation was clean.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProgressUpdate", "QueueRequest", "RunpodQueue"]

LOCALHOST = "127.0.0.1"
# (method, first path part after /v2/<endpoint>/) -> number of path parts: kind/worker[/job id].
_ROUTES = {
    ("GET", "job-take"): 2,
    ("GET", "job-take-batch"): 2,
    ("GET", "job-stop"): 2,
    ("GET", "ping"): 2,
    ("POST", "job-done"): 3,
    ("POST", "job-stream"): 3,
}


@dataclass(frozen=True)
class QueueRequest:
    """One HTTP request the queue received, as it arrived."""

    method: str
    path: str
    query: dict[str, str]
    authorized: bool
    at: float


@dataclass(frozen=True)
class ProgressUpdate:
    """One `progress_update` the worker sent for a job; `after_result`: it arrived after the final result."""

    job_id: str
    output: Any
    after_result: bool


@dataclass
class _State:
    waiting: deque[dict[str, Any]] = field(default_factory=deque)
    taken: dict[str, float] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: list[ProgressUpdate] = field(default_factory=list)
    streams: dict[str, list[Any]] = field(default_factory=dict)
    pings: list[dict[str, str]] = field(default_factory=list)
    requests: list[QueueRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class RunpodQueue:
    """RunPod's job queue for one endpoint and one worker, on a free port of 127.0.0.1.

    Use as a context manager; thread-safe. `put(job_input)` queues a job and returns its id; the worker
    started with `env()` takes it; `wait(ids)` blocks until each has a final result; `results()` maps a
    job id to the final body the worker posted (`{"output": ...}` or `{"error": "..."}`).
    """

    def __init__(
        self,
        *,
        endpoint_id: str = "fuseline-test",
        worker_id: str = "fuseline-test-worker",
        api_key: str | None = None,
        gpu: str = "CPU",
        poll_s: float = 0.5,
    ):
        self.endpoint_id = endpoint_id
        self.worker_id = worker_id
        self.api_key = api_key or f"rpa_test_{uuid.uuid4().hex}"
        self.gpu = gpu
        self.poll_s = poll_s
        self._state = _State()
        self._changed = threading.Condition()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Kept after stop() so that a test can still match what it recorded against the address.
        self._port: int | None = None

    # ------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> RunpodQueue:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("RunpodQueue already started")
        queue = self

        class Handler(_QueueHandler):
            owner = queue

        # Port 0: the kernel picks a free port at bind time, so two queues can never race for one.
        self._server = http.server.ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="runpod-queue", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RunpodQueue was never started; use it as a context manager")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}/v2/{self.endpoint_id}"

    def env(self) -> dict[str, str]:
        """The variables RunPod sets on a serverless worker, pointing at this queue.

        The URLs keep the placeholders the SDK substitutes itself (`$ID`, `$RUNPOD_POD_ID`); the ping
        interval is 1 s instead of RunPod's 10 s so that a short test sees heartbeats."""
        query = f"?gpu={self.gpu}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base_url}/job-take/$ID{query}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base_url}/job-done/$RUNPOD_POD_ID/$ID{query}",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base_url}/job-stream/$RUNPOD_POD_ID/$ID{query}",
            "RUNPOD_WEBHOOK_PING": f"{self.base_url}/ping/$RUNPOD_POD_ID{query}",
            "RUNPOD_AI_API_KEY": self.api_key,
            "RUNPOD_POD_ID": self.worker_id,
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,
            "RUNPOD_PING_INTERVAL": "1000",
        }

    # ------------------------------------------------------------------------------------------- jobs

    def put(self, job_input: Any, job_id: str | None = None) -> str:
        """Queue a job with this `input` (any JSON value, as a caller's request body may hold); its id."""
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        json.dumps(job_input)  # fail here, in the test, on a value that is not JSON
        with self._changed:
            known = job_id in self._state.taken or any(j["id"] == job_id for j in self._state.waiting)
            if known:
                raise ValueError(f"job id {job_id!r} is already queued or taken")
            self._state.waiting.append({"id": job_id, "input": job_input})
            self._changed.notify_all()
        return job_id

    def results(self) -> dict[str, dict[str, Any]]:
        """Job id -> the final body the worker posted: `{"output": ...}`, `{"error": "..."}` (or both)."""
        with self._changed:
            return {job_id: dict(body) for job_id, body in self._state.results.items()}

    def wait(self, job_ids: list[str], timeout: float, alive=lambda: True) -> dict[str, dict[str, Any]]:
        """Block until every job in `job_ids` has a final result, or raise TimeoutError naming the missing.

        `alive()` is polled as well, so that a dead worker fails the wait at once instead of at the timeout.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                missing = [j for j in job_ids if j not in self._state.results]
                if not missing:
                    return {j: dict(self._state.results[j]) for j in job_ids}
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    taken = sum(j in self._state.taken for j in missing)
                    raise TimeoutError(
                        f"{len(missing)} of {len(job_ids)} jobs have no result after {timeout:.0f} s "
                        f"({taken} of them taken by the worker; worker alive: {alive()}): {missing[:5]}"
                    )
                self._changed.wait(min(left, 0.5))

    def waiting(self) -> list[str]:
        """Ids of the jobs not taken yet."""
        with self._changed:
            return [job["id"] for job in self._state.waiting]

    def taken(self) -> list[str]:
        """Ids of the jobs the worker took, in order."""
        with self._changed:
            return list(self._state.taken)

    def progress(self) -> list[ProgressUpdate]:
        with self._changed:
            return list(self._state.progress)

    def streams(self) -> dict[str, list[Any]]:
        with self._changed:
            return {job_id: list(parts) for job_id, parts in self._state.streams.items()}

    def pings(self) -> list[dict[str, str]]:
        """The query of each heartbeat (`job_id`, `runpod_version`, `gpu`)."""
        with self._changed:
            return list(self._state.pings)

    def requests(self) -> list[QueueRequest]:
        with self._changed:
            return list(self._state.requests)

    def protocol_errors(self) -> list[str]:
        """Every request that broke the protocol, described; empty for a clean conversation."""
        with self._changed:
            return list(self._state.errors)

    # --------------------------------------------------------------------------- request handling

    def _record(self, request: QueueRequest) -> None:
        with self._changed:
            self._state.requests.append(request)

    def _error(self, message: str) -> None:
        with self._changed:
            self._state.errors.append(message)
            self._changed.notify_all()

    def _take(self, count: int) -> list[dict[str, Any]]:
        """Up to `count` jobs, waiting up to `poll_s` for the first (RunPod's long poll)."""
        deadline = time.monotonic() + self.poll_s
        with self._changed:
            while not self._state.waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._changed.wait(left)
            jobs = []
            while self._state.waiting and len(jobs) < count:
                job = self._state.waiting.popleft()
                self._state.taken[job["id"]] = time.monotonic()
                jobs.append(job)
            self._changed.notify_all()
            return jobs

    def _post(self, job_id: str, body: Any, stream: bool) -> int:
        """Store a result, progress update or stream part; the HTTP status to answer."""
        with self._changed:
            if job_id not in self._state.taken:
                self._state.errors.append(f"POST for job {job_id!r}, which the worker never took")
                return 404
            if not isinstance(body, dict):
                self._state.errors.append(f"job {job_id}: body is {type(body).__name__}, not a JSON object")
                return 400
            if stream:
                self._state.streams.setdefault(job_id, []).append(body)
            elif body.get("status") == "IN_PROGRESS":
                done = job_id in self._state.results
                self._state.progress.append(ProgressUpdate(job_id, body.get("output"), done))
            elif job_id in self._state.results:
                self._state.errors.append(f"job {job_id}: a second final result {str(body)[:200]}")
                return 409
            else:
                self._state.results[job_id] = body
            self._changed.notify_all()
            return 200

    def _ping(self, query: dict[str, str]) -> None:
        with self._changed:
            self._state.pings.append(query)


class _QueueHandler(http.server.BaseHTTPRequestHandler):
    owner: RunpodQueue
    # HTTP/1.0: one request per connection, so no idle keep-alive connection outlives the queue.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request record replaces the access log

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _reply(self, status: int, payload: Any = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        queue = self.owner
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        authorized = self.headers.get("Authorization") == queue.api_key
        queue._record(QueueRequest(method, url.path, query, authorized, time.time()))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        if not authorized:
            queue._error(f"{method} {url.path}: missing or wrong Authorization header")
            return self._reply(401, {"error": "unauthorized"})

        prefix = f"/v2/{queue.endpoint_id}/"
        parts = url.path.removeprefix(prefix).split("/") if url.path.startswith(prefix) else []
        kind = parts[0] if parts else ""
        if _ROUTES.get((method, kind)) != len(parts):
            queue._error(f"{method} {self.path}: not a RunPod queue route")
            return self._reply(404, {"error": "no such route"})
        if parts[1] != queue.worker_id:
            queue._error(f"{method} {self.path}: worker id {parts[1]!r}, expected {queue.worker_id!r}")
        if query.get("gpu") != queue.gpu:
            queue._error(f"{method} {self.path}: the query lost the URL's own parameters (gpu)")

        if kind in ("job-take", "job-take-batch"):
            return self._take(kind, query)
        if kind == "job-stop":
            time.sleep(queue.poll_s)  # a long poll with nothing to stop
            return self._reply(204)
        if kind == "ping":
            queue._ping(query)
            return self._reply(200, {})
        return self._post(kind, parts[2], query, body)

    def _take(self, kind: str, query: dict[str, str]) -> None:
        queue = self.owner
        if query.get("job_in_progress") not in ("0", "1"):
            queue._error(f"{kind}: job_in_progress is {query.get('job_in_progress')!r}, expected 0 or 1")
        batch = kind == "job-take-batch"
        try:
            count = int(query["batch_size"]) if batch else 1
        except (KeyError, ValueError):
            queue._error(f"{kind}: batch_size missing or not an integer: {query.get('batch_size')!r}")
            return self._reply(400, {"error": "batch_size"})
        jobs = queue._take(count)
        if not jobs:
            return self._reply(204)
        return self._reply(200, jobs if batch else jobs[0])

    def _post(self, kind: str, job_id: str, query: dict[str, str], raw: bytes) -> None:
        queue = self.owner
        stream = kind == "job-stream"
        expected = "true" if stream else "false"
        if query.get("isStream") != expected:
            queue._error(f"{kind} {job_id}: isStream={query.get('isStream')!r}, expected {expected!r}")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            queue._error(f"{kind} {job_id}: body is not JSON ({exc}): {raw[:200]!r}")
            return self._reply(400, {"error": "body is not JSON"})
        status = queue._post(job_id, body, stream)
        return self._reply(status, {} if status == 200 else {"error": "refused"})
