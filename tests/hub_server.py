"""A local Hugging Face Hub: a real HTTP server on 127.0.0.1 speaking the endpoints `huggingface_hub` uses.

Enough of the Hub's protocol for `hf_hub_download` (HEAD/GET `/<repo>/resolve/<revision>/<file>` with the
`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size` and `Location` headers), timm's `hf-hub:` config
resolution, `model_info` (`/api/models/<repo>[/revision/<rev>]`), `list_repo_refs` (`/api/models/<repo>/refs`) and
an upload through `HfApi.upload_folder` (`/api/repos/create`, `/api/validate-yaml`, `/preupload/`, `/commit/`).
Read from huggingface_hub 2.4 (`file_download.get_hf_file_metadata`, `_get_metadata_or_catch_error`,
`utils/_http.py` `hf_raise_for_status`, `hf_api.model_info` / `list_repo_refs` / `create_repo`, `_commit_api`).

Like the real Hub, weight files (`*.safetensors`, `*.bin`, `*.pth`) are "LFS" files: a HEAD or GET on `resolve`
answers 302 with the file's sha256 as `X-Linked-Etag` and a `Location` on another host (`localhost` instead of
`127.0.0.1`, the same server), so huggingface_hub takes its CDN path and does not forward credentials. Small files
are answered directly with a git-style `ETag`.

Every request is recorded in `LocalHub.requests` as (method, path) so tests can count what touched the server.
Select the server with `HF_ENDPOINT=<LocalHub.url>`; see `use_endpoint` for processes that imported
huggingface_hub already (it reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import).
"""
import base64
import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

__all__ = ['LocalHub', 'use_endpoint', 'hub_env']

_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt')


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _Repo:
    def __init__(self):
        self.commits: Dict[str, Dict[str, bytes]] = {}  # commit sha -> {path: content}
        self.branches: Dict[str, str] = {}
        self.tags: Dict[str, str] = {}

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.commits:
            return revision
        return self.branches.get(revision) or self.tags.get(revision)


class LocalHub:
    """A Hub on 127.0.0.1 serving repos the test builds with `add_commit`.

    Use as a context manager, or call `start()` / `stop()`.
    """

    def __init__(self):
        self.repos: Dict[str, _Repo] = {}
        self.requests: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- repository content -------------------------------------------------------------------------------------
    def add_commit(
            self,
            repo_id: str,
            files: Union[Dict[str, bytes], str, Path],
            branch: str = 'main',
            tag: Optional[str] = None,
            keep_existing: bool = True,
    ) -> str:
        """Commit `files` (a {path: bytes} dict or a folder) to `branch`; returns the 40-hex commit id."""
        if not isinstance(files, dict):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo())
            parent = repo.branches.get(branch)
            content = dict(repo.commits[parent]) if (parent and keep_existing) else {}
            content.update(files)
            digest = hashlib.sha1(f'{repo_id}\n{parent}\n'.encode())
            for path in sorted(content):
                digest.update(path.encode() + b'\0' + hashlib.sha256(content[path]).digest())
            commit = digest.hexdigest()
            repo.commits[commit] = content
            repo.branches[branch] = commit
            if tag:
                repo.tags[tag] = commit
            return commit

    def count(self, method: Optional[str] = None, contains: str = '') -> int:
        """Requests recorded so far, optionally only those of one method whose path contains `contains`."""
        with self._lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)

    # --- server -------------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, 'LocalHub is not started'
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    @property
    def cdn_url(self) -> str:
        # Another host name for the same server, as the Hub's CDN is another host. Fall back to the Hub's own
        # address where `localhost` does not resolve to 127.0.0.1 first (huggingface_hub then follows the
        # redirect itself, which the real Hub also does for same-host redirects).
        try:
            family, _, _, _, address = socket.getaddrinfo('localhost', self.port, type=socket.SOCK_STREAM)[0]
            if family == socket.AF_INET and address[0] == '127.0.0.1':
                return f'http://localhost:{self.port}'
        except OSError:
            pass
        return self.url

    def start(self) -> 'LocalHub':
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name='local-hub', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> 'LocalHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = 'HTTP/1.1'

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # --- plumbing -----------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              content_type: str = 'application/octet-stream') -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers, content_type='application/json')

    def _error(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        headers = dict(headers or {}, **{'X-Error-Code': code, 'X-Error-Message': message})
        self._json(status, {'error': message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _record(self) -> List[str]:
        path = urlsplit(self.path).path
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
        return path.lstrip('/').split('/')

    def do_HEAD(self):
        self._route(self._record())

    def do_GET(self):
        self._route(self._record())

    def do_POST(self):
        self._route_post(self._record())

    # --- reads --------------------------------------------------------------------------------------------------
    def _route(self, parts: List[str]) -> None:
        if parts[0] == '_lfs' and len(parts) == 2:
            return self._lfs(parts[1])
        if len(parts) >= 5 and parts[2] == 'resolve':
            return self._resolve(f'{parts[0]}/{parts[1]}', unquote(parts[3]), unquote('/'.join(parts[4:])))
        if parts[:2] == ['api', 'models'] and len(parts) >= 4:
            repo_id, rest = f'{parts[2]}/{parts[3]}', parts[4:]
            if not rest:
                return self._model_info(repo_id, 'main')
            if rest[0] == 'revision' and len(rest) == 2:
                return self._model_info(repo_id, unquote(rest[1]))
            if rest == ['refs']:
                return self._refs(repo_id)
        self._error(404, 'NotFound', f'No such endpoint on the local Hub: {self.path}')

    def _repo(self, repo_id: str) -> Optional[_Repo]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, 'RepoNotFound', f'Repository not found: {repo_id}')
        return repo

    def _commit(self, repo_id: str, revision: str) -> Optional[Tuple[str, Dict[str, bytes]]]:
        """(commit, files) of a repo at a revision, or None after answering 404 for an unknown repo or revision."""
        with self.hub._lock:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            commit = repo.resolve(revision)
            if commit is None:
                self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
                return None
            return commit, dict(repo.commits[commit])

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        commit, files = found
        data = files.get(filename)
        if data is None:
            return self._error(404, 'EntryNotFound', f'{filename} does not exist on "{revision}"',
                               {'X-Repo-Commit': commit})
        headers = {'X-Repo-Commit': commit, 'ETag': f'"{_git_blob_oid(data)}"'}
        if filename.endswith(_LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({
                'X-Linked-Etag': f'"{sha256}"',
                'X-Linked-Size': str(len(data)),
                'Location': f'{self.hub.cdn_url}/_lfs/{sha256}',
            })
            return self._send(302, b'', headers)
        self._send(200, data, headers)

    def _lfs(self, sha256: str) -> None:
        with self.hub._lock:
            data = next((d for r in self.hub.repos.values() for c in r.commits.values() for d in c.values()
                         if hashlib.sha256(d).hexdigest() == sha256), None)
        if data is None:
            return self._error(404, 'EntryNotFound', f'No LFS object {sha256}')
        range_header = self.headers.get('Range', '')
        if range_header.startswith('bytes=') and range_header.endswith('-'):
            start = int(range_header[len('bytes='):-1])
            return self._send(206, data[start:], {
                'ETag': f'"{sha256}"', 'Content-Range': f'bytes {start}-{len(data) - 1}/{len(data)}'})
        self._send(200, data, {'ETag': f'"{sha256}"'})

    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        commit, files = found
        siblings = [{'rfilename': name, 'size': len(data)} for name, data in sorted(files.items())]
        self._json(200, {
            'id': repo_id, 'modelId': repo_id, 'sha': commit, 'private': False, 'disabled': False,
            'library_name': 'timm', 'tags': ['timm'], 'siblings': siblings,
        })

    def _refs(self, repo_id: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_id)
            if repo is None:
                return
            ref = lambda kind, name, sha: {'name': name, 'ref': f'refs/{kind}/{name}', 'targetCommit': sha}
            payload = {
                'branches': [ref('heads', n, s) for n, s in repo.branches.items()],
                'tags': [ref('tags', n, s) for n, s in repo.tags.items()],
                'converts': [], 'pullRequests': [],
            }
        self._json(200, payload)

    # --- writes (HfApi.create_repo / upload_folder) -------------------------------------------------------------
    def _route_post(self, parts: List[str]) -> None:
        body = self._body()
        if parts == ['api', 'repos', 'create']:
            request = json.loads(body)
            repo_id = f'{request.get("organization")}/{request["name"]}'
            with self.hub._lock:
                exists = repo_id in self.hub.repos
                self.hub.repos.setdefault(repo_id, _Repo())
            if exists:
                return self._error(409, 'RepoExists', 'You already created this model repo')
            return self._json(200, {'url': f'{self.hub.url}/{repo_id}', 'name': repo_id})
        if parts == ['api', 'validate-yaml']:
            # the Hub checks a model card's metadata (README front matter, or bare YAML) before a commit
            import yaml
            content = json.loads(body)['content']
            if content.startswith('---'):
                content = content.split('---', 2)[1]
            try:
                ok = isinstance(yaml.safe_load(content), dict)
            except yaml.YAMLError:
                ok = False
            if not ok:
                return self._error(400, 'BadRequest', 'README.md metadata is not a YAML mapping')
            return self._json(200, {'errors': [], 'warnings': []})
        if parts[:2] == ['api', 'models'] and len(parts) == 6 and parts[4] == 'preupload':
            files = json.loads(body)['files']
            # every file goes inline in the commit ("regular"): no LFS batch/xet transfer to emulate
            return self._json(200, {'files': [
                {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
        if parts[:2] == ['api', 'models'] and len(parts) == 6 and parts[4] == 'commit':
            repo_id, branch = f'{parts[2]}/{parts[3]}', unquote(parts[5])
            if repo_id not in self.hub.repos:
                return self._error(404, 'RepoNotFound', f'Repository not found: {repo_id}')
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item['key'] == 'file':
                    files[item['value']['path']] = base64.b64decode(item['value']['content'])
                elif item['key'] != 'header':
                    return self._error(400, 'BadRequest', f'The local Hub only accepts inline files, got {item["key"]}')
            commit = self.hub.add_commit(repo_id, files, branch=branch)
            return self._json(200, {
                'commitUrl': f'{self.hub.url}/{repo_id}/commit/{commit}', 'commitOid': commit, 'success': True})
        self._error(404, 'NotFound', f'No such endpoint on the local Hub: {self.path}')


def use_endpoint(monkeypatch, endpoint: str, cache_dir: Union[str, Path], offline: bool = False) -> None:
    """Point this process's huggingface_hub at `endpoint`, with its own cache, as HF_ENDPOINT etc. would.

    huggingface_hub copies HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE into `huggingface_hub.constants` when it
    is first imported, so a test in a process that imported it already patches those constants (and sets the
    variables too, for anything started from the test). Subprocess tests set only the variables.
    """
    from huggingface_hub import constants
    endpoint = endpoint.rstrip('/')
    for key, value in (('HF_ENDPOINT', endpoint), ('HF_HUB_CACHE', str(cache_dir)),
                       ('HF_HUB_OFFLINE', '1' if offline else '0'), ('HF_HUB_DISABLE_TELEMETRY', '1')):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache_dir))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', offline)


def hub_env(endpoint: str, cache_dir: Union[str, Path], offline: bool = False) -> Dict[str, str]:
    """Environment for a subprocess that should use `endpoint` and `cache_dir`."""
    env = dict(os.environ)
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache_dir), HF_HUB_OFFLINE='1' if offline else '0',
               HF_HUB_DISABLE_TELEMETRY='1')
    return env


