"""Optional: this node's pods from the API server, for priorities (and to name containers where the runtime's
state cannot be read). Runs only where a service account token is mounted (in the cluster, as the DaemonSet runs)
and NODE_NAME is set; without it priorities stay the default. One node-scoped list, then a watch from its
resourceVersion (fieldSelector spec.nodeName), listed again when the watch's version is too old (410); the RBAC
it needs is `get`, `list` and `watch` on pods (deploy/rbac.yaml).

A pod's priority: from its priority class (spec.priority, which admission sets from priorityClassName and the
pod cannot choose beyond what its namespace allows): above 0 high, below 0 low, 0 normal. The annotation
`gpuwatch.io/priority` (high, normal, low) may lower that, never raise it: the pod writes its annotations itself."""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from ..core import threads
from ..core.vocabulary import PRIORITY_NAMES, Priority
from .cgroups import KubeCgroup
from .runtime import Identity

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
ANNOTATION = "gpuwatch.io/priority"
WATCH_S = 300  # a watch is made again this often (the token is read again with it: bound tokens rotate)


@dataclass(frozen=True)
class Pod:
    uid: str
    namespace: str
    name: str
    priority: int | None = None              # spec.priority
    annotation: str | None = None            # gpuwatch.io/priority
    containers: dict[str, str] = field(default_factory=dict)  # container ID -> container name


def level(pod: Pod) -> str | None:
    """The pod's priority: from its class, lowered (never raised) by the annotation; None: the default."""
    base = None if pod.priority is None else "high" if pod.priority > 0 else "low" if pod.priority < 0 else "normal"
    if pod.annotation not in PRIORITY_NAMES:
        return base
    return min(base or "normal", pod.annotation, key=lambda name: Priority.parse(name))


def parse_pod(obj: Any) -> Pod | None:
    if not isinstance(obj, dict):
        return None
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    if not meta.get("uid"):
        return None
    containers = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for c in status.get(key) or []:
            cid = str(c.get("containerID") or "").rpartition("://")[2]
            if cid and c.get("name"):
                containers[cid] = str(c["name"])
    priority = spec.get("priority")
    annotation = (meta.get("annotations") or {}).get(ANNOTATION)
    return Pod(str(meta["uid"]), str(meta.get("namespace", "")), str(meta.get("name", "")),
               priority if isinstance(priority, int) else None,
               annotation.strip().lower() if isinstance(annotation, str) else None, containers)


class PodWatch:
    def __init__(self, url: str, node: str, token_file: str | None = None, ca_file: str | None = None) -> None:
        self.url, self.node, self.token_file, self.ca_file = urllib.parse.urlsplit(url), node, token_file, ca_file
        self._pods: dict[str, Pod] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self.synced = threading.Event()  # set once the first list is in
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-pods", self._loop, self._stop),
                                        name="gpuwatch-pods", daemon=True)

    @classmethod
    def in_cluster(cls, node: str | None = None) -> PodWatch | None:
        """The API server of the cluster this runs in; None outside one (no service account token, no node)."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        node = node or os.environ.get("NODE_NAME")
        token = os.path.join(SERVICE_ACCOUNT, "token")
        if not host or not node or not os.path.exists(token):
            return None
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", node, token, os.path.join(SERVICE_ACCOUNT, "ca.crt"))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # ends a watch that is waiting for the next event
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def pod(self, uid: str) -> Pod | None:
        with self._lock:
            return self._pods.get(uid)

    def priority_of(self, uid: str) -> str | None:
        pod = self.pod(uid)
        return level(pod) if pod is not None else None

    def identity(self, cgroup: KubeCgroup) -> Identity | None:
        pod = self.pod(cgroup.pod_uid)
        name = pod.containers.get(cgroup.container_id) if pod is not None else None
        return Identity(pod.namespace, pod.name, name, pod.uid) if pod is not None and name else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            version = self._list()
            while version and not self._stop.is_set():
                version = self._watch(version)

    def _list(self) -> str:
        try:
            body = json.load(self._get(""))
        finally:
            self._close()
        pods = {p.uid: p for item in body.get("items") or [] if (p := parse_pod(item)) is not None}
        with self._lock:
            self._pods = pods
        if not self.synced.is_set():
            log.info("API server: %d pods on node %s; priorities from their classes", len(pods), self.node)
        self.synced.set()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, version: str) -> str:
        """Follows the watch until it ends: the version to watch from next; empty: list again."""
        query = f"&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_S}&resourceVersion={version}"
        try:
            return self._follow(self._get(query), version)
        finally:
            self._close()

    def _follow(self, response: http.client.HTTPResponse, version: str) -> str:
        for line in response:
            event = json.loads(line)
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                return ""  # 410 Gone (or another): list again
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            pod = parse_pod(obj) if kind in ("ADDED", "MODIFIED", "DELETED") else None
            if pod is not None:
                with self._lock:
                    if kind == "DELETED":
                        self._pods.pop(pod.uid, None)
                    else:
                        self._pods[pod.uid] = pod
        return version

    def _get(self, query: str) -> http.client.HTTPResponse:
        selector = urllib.parse.quote(f"spec.nodeName={self.node}")
        path = f"/api/v1/pods?fieldSelector={selector}{query}"
        host, port = self.url.hostname or "", self.url.port
        if self.url.scheme == "https":
            context = ssl.create_default_context(cafile=self.ca_file)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=WATCH_S + 30,
                                                                           context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=WATCH_S + 30)
        headers = {"Accept": "application/json"}
        if self.token_file:
            with open(self.token_file) as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        self._conn = conn
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise OSError(f"API server: GET {path}: {response.status} {response.reason}")
        return response

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
