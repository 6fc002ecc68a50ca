"""The job API (issue 39) on a real server with its SQLite store: submit (202, Location), status, images, events,
idempotency, cancel of a queued and of a running job, ownership under API keys, time to live, and webhooks (signed,
retried after a 500, refused for a host not allowed). A job's images are the images /generate gives for the same
seeds, PNG byte for byte."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from service.jobs.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

SECRET = "whsec-test"


def wait_for(url: str, job_id: str, states: set[str], timeout: float = 60.0, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job.get("status") in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {states} after {timeout} s: {job}")


class Receiver:
    """A webhook receiver on loopback: answers 500 to the first `fail_first` deliveries, then 200."""

    def __init__(self, fail_first: int = 0) -> None:
        self.got: list[tuple[dict, bytes, int]] = []  # (headers, body, status answered)
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(rx.got) < fail_first else 200
                rx.got.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def jobs(start_server):
    return start_server(max_active_images=4, max_images_per_request=4, queue_size=16, max_steps=128, threads=1,
                        job_lease_s=3, job_checkpoint_s=0.2, webhook_allow="127.0.0.1", webhook_secret=SECRET,
                        webhook_attempts=3, job_ttl_s=600)


def test_a_job_runs_to_the_images_generate_gives_for_the_same_seeds(jobs):
    body = {"class_label": 4, "num_images": 3, "steps": 16, "encoder_interval": 4, "seed": 77}
    r = httpx.post(f"{jobs.url}/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["status_url"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["num_images"] == 3
    done = wait_for(jobs.url, job["id"], {"succeeded"})
    assert [im["seed"] for im in done["images"]] == [77, 78, 79] and done["images_done"] == 3
    assert done["step"] == 16 and done["expires_at"] > done["finished_at"]
    plain = httpx.post(f"{jobs.url}/generate", json={**body, "priority": "batch"}, timeout=60).json()
    for im, ref in zip(done["images"], plain["images"], strict=True):
        png = httpx.get(f"{jobs.url}{im['url']}", timeout=10)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content == base64.b64decode(ref["png_base64"])  # byte for byte
    assert httpx.get(f"{jobs.url}/v1/jobs/{job['id']}/images/3.png").status_code == 404
    listed = httpx.get(f"{jobs.url}/v1/jobs", params={"limit": 100}).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]


def test_the_events_stream_follows_a_job_to_done(jobs):
    r = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 1, "num_images": 2, "steps": 64, "seed": 1}, timeout=30)
    job_id = r.json()["id"]
    with httpx.stream("GET", f"{jobs.url}/v1/jobs/{job_id}/events", timeout=60) as s:
        events = []
        name = None
        for line in s.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[5:])))
    names = [n for n, _ in events]
    assert names[-1] == "done" and set(names) <= {"queued", "progress", "done"}
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["id"] == job_id
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == sorted(steps)  # progress only goes forward


def test_an_idempotency_key_gives_the_same_job_and_another_body_409(jobs):
    body = {"class_label": 2, "steps": 8, "seed": 3}
    key = {"Idempotency-Key": "order-42"}
    a = httpx.post(f"{jobs.url}/v1/jobs", json=body, headers=key, timeout=30)
    b = httpx.post(f"{jobs.url}/v1/jobs", json=body, headers=key, timeout=30)
    assert a.status_code == 202 and b.status_code == 200 and a.json()["id"] == b.json()["id"]
    c = httpx.post(f"{jobs.url}/v1/jobs", json={**body, "seed": 4}, headers=key, timeout=30)
    assert c.status_code == 409 and a.json()["id"] in c.json()["message"]
    # Without a seed, the same request twice is still one job (the seed drawn for it is not part of the request).
    key2 = {"Idempotency-Key": "order-43"}
    d = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 2, "steps": 8}, headers=key2, timeout=30)
    e = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 2, "steps": 8}, headers=key2, timeout=30)
    assert d.json()["id"] == e.json()["id"]


def test_cancel_a_queued_and_a_running_job(jobs):
    # Four images of 128 steps fill the four slots; the job after them waits in the queue.
    running = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 5, "num_images": 4, "steps": 128, "seed": 9},
                         timeout=30).json()
    wait_for(jobs.url, running["id"], {"running"})
    queued = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 6, "steps": 128, "seed": 9}, timeout=30).json()
    time.sleep(0.3)
    assert httpx.get(f"{jobs.url}/v1/jobs/{queued['id']}").json()["status"] == "queued"
    r = httpx.delete(f"{jobs.url}/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = httpx.delete(f"{jobs.url}/v1/jobs/{running['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    time.sleep(2.0)  # a lease renewal (every 0.6 s here) stops its images
    after = httpx.get(f"{jobs.url}/v1/jobs/{running['id']}").json()
    assert after["status"] == "cancelled" and after["images_done"] < 4
    assert "no longer held here" in jobs.log()
    assert httpx.delete(f"{jobs.url}/v1/jobs/{running['id']}").status_code == 409  # already ended
    assert httpx.get(f"{jobs.url}/v1/jobs/not-a-job").status_code == 404


def test_webhook_is_signed_and_retried_after_a_500(jobs):
    rx = Receiver(fail_first=1)
    try:
        r = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 3, "steps": 8, "seed": 5, "webhook": rx.url},
                       timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(rx.got) < 2:
            time.sleep(0.1)
        assert [status for _, _, status in rx.got] == [500, 200]  # retried after the 500, then delivered once
        headers, body, _ = rx.got[-1]
        sent = json.loads(body)
        assert sent["id"] == job_id and sent["status"] == "succeeded"
        assert verify(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        assert not verify("another-secret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        assert not verify(SECRET, headers[TIMESTAMP_HEADER], body + b" ", headers[SIGNATURE_HEADER])
    finally:
        rx.close()
    m = httpx.get(f"{jobs.url}/metrics").text
    assert 'dualrate_job_webhooks_total{outcome="delivered"} 1.0' in m
    assert 'dualrate_job_webhooks_total{outcome="failed"} 1.0' in m


def test_a_webhook_to_a_host_not_allowed_is_refused(jobs):
    r = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 3, "webhook": "http://169.254.169.254/latest"},
                   timeout=30)
    assert r.status_code == 422 and r.json()["details"][0]["field"] == "webhook"
    r = httpx.post(f"{jobs.url}/v1/jobs", json={"class_label": 3, "timeout_s": 5}, timeout=30)
    assert r.status_code == 422 and r.json()["details"][0]["field"] == "timeout_s"


def test_jobs_belong_to_their_key_and_are_deleted_after_their_ttl(start_server):
    srv = start_server(api_keys="key-a,key-b", max_active_images=2, max_images_per_request=2, threads=1,
                       job_ttl_s=2, job_lease_s=3)
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    r = httpx.post(f"{srv.url}/v1/jobs", json={"class_label": 1, "steps": 8}, headers=a, timeout=30)
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert httpx.post(f"{srv.url}/v1/jobs", json={"class_label": 1}, timeout=30).status_code == 401
    done = wait_for(srv.url, job_id, {"succeeded"}, headers=a)
    assert httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=b).status_code == 404  # another key: not found
    assert httpx.get(f"{srv.url}{done['images'][0]['url']}", headers=b).status_code == 404
    assert httpx.delete(f"{srv.url}/v1/jobs/{job_id}", headers=b).status_code == 404
    assert httpx.get(f"{srv.url}/v1/jobs", headers=b).json()["jobs"] == []
    assert [j["id"] for j in httpx.get(f"{srv.url}/v1/jobs", headers=a).json()["jobs"]] == [job_id]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # kept 2 s after it ended, then deleted with its images
        if httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=a).status_code == 404:
            break
        time.sleep(0.25)
    else:
        raise AssertionError("the job outlived its time to live")
    assert httpx.get(f"{srv.url}{done['images'][0]['url']}", headers=a).status_code == 404
