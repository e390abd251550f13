"""What keeps a public link from being stalled or slipped past, for both front doors (the page's
Gradio routes and /v1), before any route runs (docs/security.md):

- BodyLimit: a request body over the limit is refused with 413 by its Content-Length, or as soon
  as that many bytes have arrived, before anything parses it;
- Lockout: a client that failed to log in (page), sent a wrong key (/v1) or an oversized body
  too often is refused with 429 for a while (everywhere but /health), so keys cannot be guessed
  at line speed and a flood of huge requests costs the server next to nothing;
- Keys: the one rule for keys, shared by the page's login and /v1's Bearer check.

Clients are told apart by address; behind a proxy (a Space) uvicorn takes the address from
X-Forwarded-For only for proxies named in FORWARDED_ALLOW_IPS.
"""
import hmac
import json
import threading
import time
from collections import deque

import anyio

MIN_BODY_BYTES = 2 * 2**20  # room for a long chat's history, which the page sends on every turn
BYTES_PER_CHAR = 24         # JSON escapes (\uXXXX: 6 bytes), history and message, both doors
MAX_FAILURES = 20           # wrong passwords or keys, oversized bodies per client ...
FAILURE_WINDOW_S = 60.0     # ... within this many seconds, then refused until the window passes
MAX_CLIENTS = 10_000        # addresses with recent failures kept; the oldest are forgotten first
TARPIT_S = 1.0              # a locked-out client's refusal waits this long (one per second per connection) ...
MAX_TARPITTED = 64          # ... for this many connections at once; beyond, refused at once


def body_limit(char_limit: int) -> int:
    """The largest request body worth reading when a message may have `char_limit` characters."""
    return max(MIN_BODY_BYTES, BYTES_PER_CHAR * char_limit)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, for /v1 (api.py) and for what these guards refuse on both doors
    (gradio_client and browsers read it as well)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_error(send, status: int, message: str, kind: str, code: str, headers=()) -> None:
    """A refusal that also closes the connection: kept alive, the server would go on reading
    (and paying for) whatever body the client is still sending, to find its next request."""
    body = json.dumps(error_body(message, kind, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: bodies over `limit` bytes get 413 before any route reads them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self.refuse(send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise TooLarge
            return message

        async def watched(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except TooLarge:
            if not started:
                await self.refuse(send)

    async def refuse(self, send) -> None:
        await send_error(send, 413, f"The request is larger than {self.limit:,} bytes, the most "
                                    "this server reads: shorten the message or the history.",
                         "invalid_request_error", "request_too_large")


class Lockout:
    """Failed logins and wrong keys per client address, in a sliding window."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S,
                 max_clients: int = MAX_CLIENTS):
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self.failures: dict[str, deque] = {}
        self.lock = threading.Lock()

    def recent(self, times: deque, now: float) -> deque:
        """`times` without the failures older than the window."""
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        now = time.monotonic()
        with self.lock:
            times = self.recent(self.failures.get(client, deque()), now)
            if not times:
                self.failures.pop(client, None)
            return self.window_s - (now - times[0]) if len(times) >= self.max_failures else 0.0

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self.lock:
            # Re-inserted, so the dict runs from the longest-quiet client to the latest one.
            times = self.failures[client] = self.recent(self.failures.pop(client, deque()), now)
            times.append(now)
            while len(self.failures) > self.max_clients:  # many addresses (a botnet): bounded memory
                del self.failures[next(iter(self.failures))]


class GuardAuth:
    """ASGI middleware, outside BodyLimit: refuses a locked-out client with 429 before reading
    anything, and counts as failures a wrong key (401), a failed login (400 from /login) and an
    oversized body (413). The 429 comes after TARPIT_S: a client looping requests from one
    address then costs the server one cheap refusal per second per connection, not thousands."""

    def __init__(self, app, lockout: Lockout):
        self.app, self.lockout = app, lockout
        self.tarpitted = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":  # a HEALTHCHECK is never locked out
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.lockout.retry_after(client)
        if wait:
            if self.tarpitted < MAX_TARPITTED:
                self.tarpitted += 1
                try:
                    await anyio.sleep(TARPIT_S)
                finally:
                    self.tarpitted -= 1
            return await send_error(
                send, 429, f"Too many failed logins, wrong keys or oversized requests from your "
                           f"address: try again in {wait:.0f} s.", "rate_limit_error", "too_many_failures",
                [(b"retry-after", str(int(wait) + 1).encode())])

        async def watched(message):
            if message["type"] == "http.response.start" and (
                    message["status"] in (401, 413)
                    or (message["status"] == 400 and scope["path"].rstrip("/").endswith("/login"))):
                self.lockout.failed(client)
            await send(message)

        await self.app(scope, receive, watched)


class Keys:
    """The one rule for keys: every door that generates takes the same secrets. The page's login
    takes APP_AUTH's user:password, or any user name with API_KEY as the password; /v1 takes
    either password as its Bearer key. With neither set, both doors are open."""

    def __init__(self, api_key: str | None, app_auth: tuple[str, str] | None):
        self.api_key, self.app_auth = api_key, app_auth
        self.secrets = [key for key in (api_key, app_auth and app_auth[1]) if key]

    @property
    def required(self) -> bool:
        return bool(self.secrets)

    def key_ok(self, given: str) -> bool:
        """A /v1 Bearer key: compared in constant time with each secret, never logged."""
        return any([same(given, key) for key in self.secrets])

    def login_ok(self, user: str, password: str) -> bool:
        """The page's login (Gradio calls it with the typed user name and password)."""
        if self.app_auth and same(user, self.app_auth[0]) and same(password, self.app_auth[1]):
            return True
        return self.api_key is not None and same(password, self.api_key)


def same(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), secret.encode("utf-8"))
