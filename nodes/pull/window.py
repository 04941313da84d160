"""The recipient's pull protocol decisions, without sockets: request window, resends, resume, liveness.

A download talks to one owner in three phases: one `open` request, many `chunk` requests, one
`done` request. The I/O driver (recipient.py) feeds what happened in as typed events and carries
the answers out; nothing here touches a socket, a thread, a clock or a file:

1. `Liveness` is shared by the whole download. It remembers whether the owner ever answered and
   since when the broker has reported it absent: an owner never reached fails the download after
   `Policy.first_contact` seconds, one that answered before and then vanished gets
   `Policy.grace` seconds to come back (a restart of the owner's connection or of the broker).
   Requests already delivered to an owner that then vanished get no answer at all, so after
   `Policy.probe_interval` seconds without an answer the driver sends a probe (a cheap `open`):
   the broker's "not connected" answer to it starts the grace; any answer ends the absence.
   A probe's answer proves presence only: it never counts as an answer to the waiting requests.
   When an absence ends, the requests sent before it are sent again at once: they went to a
   connection that is gone, and their answers (if any) with it.
2. `Call` is one request (`open`, `done`) with the resend rules below.
3. `PullWindow(size, start, ...)` asks for chunks [offset, offset + length) from `start` (the
   length of a `.part` file kept by an earlier attempt: resume) to `size`, keeping up to `window`
   requests in flight. `due(now)` says which requests to send now; `handle(event, now)` returns
   the offsets whose data may be written now, always in offset order, so the `.part` file stays
   a prefix of the source. `complete` once every byte was handed out for writing.
4. `WindowGrowth` decides how far the window grows on a long link: it measures throughput per
   round (a window's worth of data written) and asks for more requests in flight while the
   last growth made throughput grow, up to a bound in bytes the driver grants.

Resend rules (all requests): a request the owner left unanswered for `Policy.timeout` seconds
(counted from the later of its sending and the last answer of any request) is sent again,
together with every other unanswered one; after `Policy.max_attempts` such rounds the download
fails. A request the broker could not deliver, or that the owner asked to repeat later (digest
pending, too many bytes in flight), is sent again after `Policy.retry_delay` without counting as
an attempt. A reply from anyone but the owner is ignored and the request sent again at once.
A request unanswered for `Policy.lost_after` seconds although the owner has answered a request
or probe sent after it was lost on the way (a broker that could not queue a reply drops it):
it is sent again without counting as an attempt, so a lost reply costs seconds, not the
whole `Policy.timeout`.
Every method takes the clock reading `now` (seconds, monotonic) from its caller.
"""

from dataclasses import dataclass, field
from typing import Optional, Union

from fedstream.nodes.pull import wire


@dataclass(frozen=True)
class Policy:
    """How long the owner may stay silent or absent, and how often a request is tried."""

    timeout: float  # seconds the owner may leave requests unanswered before they are resent
    max_attempts: int = 3  # silent rounds before the download fails
    retry_delay: float = 0.1  # seconds before resending an undeliverable or deferred request
    first_contact: float = 2.0  # seconds an owner that never answered may be absent
    grace: float = 5.0  # seconds an owner that answered before may be absent
    probe_interval: float = 1.0  # seconds without an answer before the owner's presence is probed
    lost_after: float = 2.0  # seconds after which a request older than an answered one counts as lost


@dataclass(frozen=True)
class Failure:
    """Why the download cannot go on; `remove_part` when the partial data is worthless."""

    message: str
    remove_part: bool = False


# -- events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replied:
    """The owner answered request `key` (a chunk's offset; 0 for a call) with `nbytes` of data."""

    key: int
    nbytes: int = 0


@dataclass(frozen=True)
class RetryLater:
    """The owner answered request `key` but asked for it again later (digest pending, busy)."""

    key: int


@dataclass(frozen=True)
class Undeliverable:
    """The broker could not deliver request `key`: the owner (or our broker link) is absent."""

    key: int
    reason: str


@dataclass(frozen=True)
class Rejected:
    """Request `key` got an error reply without a pull error code (e.g. no handler)."""

    key: int
    reason: str


@dataclass(frozen=True)
class Foreign:
    """A reply to request `key` came from a node other than the owner: it is ignored."""

    key: int


Event = Union[Replied, RetryLater, Undeliverable, Rejected, Foreign]


@dataclass(frozen=True)
class ChunkRequest:
    """Action: ask the owner for bytes [offset, offset + length)."""

    offset: int
    length: int


def error_outcome(code: str, message: str) -> Optional[Failure]:
    """What a pull error reply means for the download: a Failure, or None to ask again later."""
    if code in (wire.ERR_PENDING, wire.ERR_BUSY):
        return None
    if code == wire.ERR_UNKNOWN_REF:
        return Failure(f"the owner answered: {wire.UNKNOWN_REF_MESSAGE}", remove_part=True)
    return Failure(f"the owner answered: {message}", remove_part=code == wire.ERR_CHANGED)


class Liveness:
    """Whether the owner of one download is answering, silent, or absent."""

    def __init__(self, policy: Policy, now: float) -> None:
        self.policy = policy
        self.started = now
        self.last_heard: Optional[float] = None
        self.reached = False  # the owner answered something (a request or a probe)
        self.comebacks = 0  # absences that ended: requests sent before the last one are lost
        self._absent_since: Optional[float] = None
        self._absent_reason = ""
        self._probed_at: Optional[float] = None
        self.answered_up_to: Optional[float] = None  # when the latest-sent answered request or probe was sent

    def answered_sent_at(self, sent_at: float) -> None:
        """A request (or probe) sent at `sent_at` was answered: what was sent before it may be lost."""
        if self.answered_up_to is None or sent_at > self.answered_up_to:
            self.answered_up_to = sent_at

    def heard(self, now: float) -> None:
        """The owner answered a request."""
        self.last_heard = now
        self.present()

    def present(self) -> None:
        """The owner answered a probe: it is there (its silence on requests is another matter)."""
        self.reached = True
        if self._absent_since is not None:
            self.comebacks += 1
            self._absent_since = None

    def absent(self, now: float, reason: str) -> None:
        """The broker reported the owner (or our own link) absent."""
        if self._absent_since is None:
            self._absent_since = now
        self._absent_reason = reason

    def deadline(self) -> Optional[float]:
        """When the current absence becomes a failure (None while the owner is not absent)."""
        if self._absent_since is None:
            return None
        limit = self.policy.grace if self.reached else self.policy.first_contact
        return self._absent_since + limit

    def next_probe(self) -> float:
        """When a probe is due if nothing is heard meanwhile."""
        quiet_since = max(t for t in (self.started, self.last_heard, self._probed_at) if t is not None)
        return quiet_since + self.policy.probe_interval

    def probe_due(self, now: float) -> bool:
        """True (once per interval) when a probe is to be sent now; the caller has requests waiting."""
        if now < self.next_probe():
            return False
        self._probed_at = now
        return True

    def handle_probe(self, event: "Event", now: float) -> None:
        """What a probe's outcome says: present (any answer), absent (undeliverable), or nothing."""
        if isinstance(event, (Replied, RetryLater)):
            self.present()
            if self._probed_at is not None:
                self.answered_sent_at(self._probed_at)
        elif isinstance(event, Undeliverable):
            self.absent(now, event.reason)

    def failure(self, now: float) -> Optional[Failure]:
        deadline = self.deadline()
        if deadline is not None and now >= deadline:
            return Failure(self._absent_reason.rstrip("."))
        return None


@dataclass
class _Slot:
    sent_at: Optional[float] = None  # None: waiting to be sent at `send_at`
    send_at: float = 0.0
    rounds: int = 0  # silent rounds and rejections so far
    comebacks: int = 0  # the owner's comebacks counted when it was sent


@dataclass
class _Requests:
    """Requests to one owner that are not answered yet, and the resend rules."""

    policy: Policy
    liveness: Liveness
    slots: dict[int, _Slot] = field(default_factory=dict)
    failure: Optional[Failure] = None

    def add(self, key: int, now: float) -> None:
        self.slots[key] = _Slot(send_at=now)

    def waiting(self, key: int) -> bool:
        return key in self.slots

    def due(self, now: float) -> list[int]:
        """Keys to send now (they count as sent from `now`)."""
        self._check(now)
        if self.failure is not None:
            return []
        keys = []
        for key, slot in self.slots.items():
            if slot.sent_at is not None and slot.comebacks < self.liveness.comebacks:
                self._resend(slot, now)  # sent to a connection that is gone since
            elif self._lost(slot, now):
                self._resend(slot, now)  # overtaken: its request or its answer was dropped on the way
            if slot.sent_at is None and slot.send_at <= now:
                slot.sent_at = now
                slot.comebacks = self.liveness.comebacks
                keys.append(key)
        return keys

    def answered(self, key: int, now: float) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None and slot.sent_at is not None:
            self.liveness.answered_sent_at(slot.sent_at)
        self.liveness.heard(now)

    def _lost(self, slot: _Slot, now: float) -> bool:
        """Sent a while ago, and the owner has answered something sent after it since."""
        overtaken = self.liveness.answered_up_to
        return slot.sent_at is not None and overtaken is not None and slot.sent_at < overtaken \
            and now - slot.sent_at >= self.policy.lost_after

    def handle(self, event: Event, now: float) -> None:
        """Everything but an answer: decide when the request goes out again."""
        slot = self.slots.get(event.key)
        if slot is None or slot.sent_at is None:
            return  # already answered, or already waiting to be resent: a late duplicate
        if isinstance(event, RetryLater):
            self.liveness.heard(now)
            self._resend(slot, now + self.policy.retry_delay)
        elif isinstance(event, Undeliverable):
            self.liveness.absent(now, event.reason)
            self._resend(slot, now + self.policy.retry_delay)
        elif isinstance(event, Rejected):
            slot.rounds += 1
            if slot.rounds >= self.policy.max_attempts:
                self.failure = Failure(event.reason.rstrip("."))
            self._resend(slot, now)
        elif isinstance(event, Foreign):
            self._resend(slot, now)
        self._check(now)

    def probe_due(self, now: float) -> bool:
        """True when the owner's presence is to be probed now (requests are waiting for it)."""
        return self.failure is None and self._sent() and self.liveness.probe_due(now)

    def deadline(self) -> Optional[float]:
        """The next moment `due`, `probe_due` or `failure` may change by itself."""
        times = [slot.send_at for slot in self.slots.values() if slot.sent_at is None]
        overtaken = self.liveness.answered_up_to
        if overtaken is not None:
            times += [slot.sent_at + self.policy.lost_after for slot in self.slots.values()
                      if slot.sent_at is not None and slot.sent_at < overtaken]
        silence = self._silence_deadline()
        if silence is not None:
            times += [silence, self.liveness.next_probe()]
        absence = self.liveness.deadline()
        if absence is not None:
            times.append(absence)
        return min(times) if times else None

    def _sent(self) -> bool:
        return any(slot.sent_at is not None for slot in self.slots.values())

    @staticmethod
    def _resend(slot: _Slot, at: float) -> None:
        slot.sent_at = None
        slot.send_at = at

    def _silence_deadline(self) -> Optional[float]:
        sent = [slot.sent_at for slot in self.slots.values() if slot.sent_at is not None]
        if not sent:
            return None
        since = min(sent)
        if self.liveness.last_heard is not None:
            since = max(since, self.liveness.last_heard)
        return since + self.policy.timeout

    def _check(self, now: float) -> None:
        if self.failure is not None:
            return
        self.failure = self.liveness.failure(now)
        if self.failure is not None:
            return
        silence = self._silence_deadline()
        if silence is None or now < silence:
            return
        silent = [slot for slot in self.slots.values() if slot.sent_at is not None]
        for slot in silent:
            slot.rounds += 1
        rounds = max(slot.rounds for slot in silent)
        if rounds >= self.policy.max_attempts:
            self.failure = Failure(f"no reply from the owner within {self.policy.timeout:g} s "
                                   f"({rounds} attempts)")
            return
        for slot in silent:
            self._resend(slot, now)


class WindowGrowth:
    """Grow the request window while throughput grows (a long link needs more data in flight).

    Throughput is measured per round: the time to write one window's worth of data. A round
    faster by at least `GAIN` than the previous one earns a window half as large again (at
    least one more request), up to `max_window`; a round that gained less ends the growth.
    """

    GAIN = 1.1

    def __init__(self, window: int, max_window: int, chunk_size: int, written: int, now: float) -> None:
        self.window = window
        self.max_window = max(window, max_window)
        self.chunk_size = chunk_size
        self.growing = self.window < self.max_window
        self._round_start = (written, now)
        self._last_rate: Optional[float] = None

    def wanted(self, written: int, now: float) -> int:
        """The window wanted after `written` bytes were handed out for writing by `now`."""
        start, since = self._round_start
        if not self.growing or written - start < self.window * self.chunk_size:
            return self.window
        rate = (written - start) / max(now - since, 1e-6)
        self._round_start = (written, now)
        if self._last_rate is not None and rate < self._last_rate * self.GAIN:
            self.growing = False
            return self.window
        self._last_rate = rate
        return min(self.max_window, self.window + max(1, self.window // 2))

    def granted(self, window: int) -> None:
        """The driver could grant `window` requests (less than wanted ends the growth)."""
        if window <= self.window:
            self.growing = False
        self.window = max(self.window, window)
        self.growing = self.growing and self.window < self.max_window


class Call:
    """One request to the owner (`open` or `done`), resent by the rules of the module docstring."""

    def __init__(self, liveness: Liveness, now: float) -> None:
        self._requests = _Requests(liveness.policy, liveness)
        self._requests.add(0, now)
        self.answered = False

    @property
    def failure(self) -> Optional[Failure]:
        return self._requests.failure

    def due(self, now: float) -> bool:
        """True when the request is to be sent (again) now."""
        return not self.answered and bool(self._requests.due(now))

    def probe_due(self, now: float) -> bool:
        """True when a probe of the owner's presence is to be sent now."""
        return not self.answered and self._requests.probe_due(now)

    def handle(self, event: Event, now: float) -> bool:
        """Take an event; True when it is the answer to keep."""
        if self.answered or not self._requests.waiting(event.key):
            return False
        if isinstance(event, Replied):
            self._requests.answered(event.key, now)
            self.answered = True
            return True
        self._requests.handle(event, now)
        return False

    def deadline(self) -> Optional[float]:
        return None if self.answered else self._requests.deadline()


class PullWindow:
    """The chunk requests of one download: which to send, which data to write, when it is done."""

    def __init__(self, size: int, start: int, chunk_size: int, window: int, liveness: Liveness) -> None:
        if not 0 <= start <= size:
            raise ValueError(f"start {start} is outside the file (0..{size})")
        if chunk_size < 1 or window < 1:
            raise ValueError("chunk_size and window must be positive")
        self.size = size
        self.chunk_size = chunk_size
        self.window = window
        self.written = start  # bytes handed out for writing, in order
        self._next = start  # first offset not requested yet
        self._lengths: dict[int, int] = {}  # requested, not handed out: offset -> length
        self._arrived: set[int] = set()  # answered, waiting for an earlier offset
        self._requests = _Requests(liveness.policy, liveness)
        self._failure: Optional[Failure] = None

    @property
    def complete(self) -> bool:
        return self.written >= self.size and self._failure is None

    @property
    def failure(self) -> Optional[Failure]:
        return self._failure or self._requests.failure

    def in_flight(self) -> int:
        """Chunks requested but not handed out for writing yet."""
        return len(self._lengths)

    def wants(self, offset: int) -> bool:
        """True if data for `offset` would be taken now (not a duplicate, not a stranger)."""
        return self._requests.waiting(offset)

    def due(self, now: float) -> list[ChunkRequest]:
        """Requests to send now: new ones filling the window, then resends, in offset order."""
        if self.failure is not None:
            return []
        while len(self._lengths) < self.window and self._next < self.size:
            length = min(self.chunk_size, self.size - self._next)
            self._lengths[self._next] = length
            self._requests.add(self._next, now)
            self._next += length
        return [ChunkRequest(offset, self._lengths[offset]) for offset in sorted(self._requests.due(now))]

    def probe_due(self, now: float) -> bool:
        """True when a probe of the owner's presence is to be sent now."""
        return self.failure is None and self._requests.probe_due(now)

    def handle(self, event: Event, now: float) -> list[int]:
        """Take an event; return the offsets whose data is to be written now, in order."""
        if self.failure is not None or not self._requests.waiting(event.key):
            return []
        if not isinstance(event, Replied):
            self._requests.handle(event, now)
            return []
        offset, expected = event.key, self._lengths[event.key]
        if event.nbytes != expected:
            self._failure = Failure(f"the owner sent {event.nbytes} bytes at offset {offset} instead of "
                                    f"{expected}: the file changed on the owner", remove_part=True)
            return []
        self._requests.answered(offset, now)
        self._arrived.add(offset)
        ready = []
        while self.written in self._arrived:
            self._arrived.discard(self.written)
            ready.append(self.written)
            self.written += self._lengths.pop(ready[-1])
        return ready

    def deadline(self) -> Optional[float]:
        return None if self.failure is not None or self.complete else self._requests.deadline()
