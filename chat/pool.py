"""One pool of generation slots for every front door of the app (the chat page and /v1): at most
`slots` generations at once (CONCURRENCY) and at most `queue_size` requests waiting (QUEUE_SIZE),
first come first served; a request beyond that is refused at once (PoolFull).

    ticket = pool.join()           # raises PoolFull
    try:
        ticket.wait(timeout)       # True once it holds a slot; wait(0) polls (async code)
        ...generate...
    finally:
        ticket.leave()             # frees the slot, or the place in the line

Thread-safe: the page waits in Gradio's worker threads, /v1 on the event loop.
"""
import threading
from collections import deque


class PoolFull(RuntimeError):
    pass


class Ticket:
    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.granted = threading.Event()
        self.left = False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this ticket holds a slot (True) or `timeout` passes (False)."""
        return self.granted.wait(timeout)

    def place(self) -> int:
        """This request's place in the line (1 = next), 0 once it holds a slot."""
        return self.pool.place(self)

    def leave(self) -> None:
        """Give back the slot, or the place in the line; safe to call twice."""
        self.pool.leave(self)


class Pool:
    def __init__(self, slots: int, queue_size: int):
        self.slots = slots
        self.queue_size = queue_size
        self.running = 0
        self._waiting: deque[Ticket] = deque()
        self._lock = threading.Lock()

    def join(self) -> Ticket:
        """A ticket that holds a slot now or waits in line; PoolFull when the line is full."""
        ticket = Ticket(self)
        with self._lock:
            if self.running < self.slots and not self._waiting:
                self.running += 1
                ticket.granted.set()
            elif len(self._waiting) >= self.queue_size:
                raise PoolFull(f"The server is busy: {self.running} answer(s) running and "
                               f"{len(self._waiting)} waiting (CONCURRENCY={self.slots}, "
                               f"QUEUE_SIZE={self.queue_size}). Try again in a moment.")
            else:
                self._waiting.append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.left:
                return
            ticket.left = True
            if not ticket.granted.is_set():
                self._waiting.remove(ticket)
            elif self._waiting:  # hand the slot straight to the next in line
                self._waiting.popleft().granted.set()
            else:
                self.running -= 1

    def place(self, ticket: Ticket) -> int:
        with self._lock:
            return 0 if ticket.granted.is_set() else self._waiting.index(ticket) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"running": self.running, "waiting": len(self._waiting)}
