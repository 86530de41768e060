"""What the node holds for each key: decoded requests, queued answers,
mailbox messages, channels (issue 11: bound work, not just bytes).

Sizes are cost units (``sshrpc._etf.TERM_COST``: an estimate of the bytes
of Python objects a received term became, from the decoder's own counter)
for decoded terms, and bytes for encoded answers waiting to be written.
No I/O; the node (``sshrpc.node``) calls these from its event loop only.
"""

from __future__ import annotations

from typing import Any

from .policy import KeyIdentity

__all__ = [
    "DEFAULT_MAX_CHANNELS_PER_KEY",
    "DEFAULT_MAX_HELD_PER_KEY",
    "FLUSH_EARLY",
    "HEAVY_COST",
    "Held",
    "KeyAccount",
    "KeyAccounts",
]

#: Channels one key may have open at once; one more is refused with
#: ``{bye, {too_many_channels, Limit}}``.  Each channel costs a relay
#: process, two tasks and its buffers.
DEFAULT_MAX_CHANNELS_PER_KEY = 32
#: Cost units (about bytes) one key's requests may hold at once: arguments
#: of its running calls, casts and spawned processes, its messages waiting
#: in mailboxes, and its answers waiting to be written.  A request that
#: would go past it is refused (``overload``; a cast or send is dropped and
#: logged).  Four times the decode budget of a 1 MiB frame.
DEFAULT_MAX_HELD_PER_KEY = 64 * 1024 * 1024
#: A frame whose decode may cost more than this (``Connection.next_cost_bound``)
#: is decoded only in its turn: the node decodes one such frame at a time,
#: first come first served, and lets every other task run in between.  About
#: a millisecond of decoding.
HEAVY_COST = 1024 * 1024
#: ``Node(flush_early=...)``'s default: answers of one read leave once this
#: many are ready and nothing else waits for the loop (see there).
FLUSH_EARLY = 16


class KeyAccount:
    """One key's channels and held cost units."""

    __slots__ = ("_accounts", "channels", "held", "key", "limit")

    def __init__(self, accounts: KeyAccounts, key: KeyIdentity, limit: int) -> None:
        self._accounts = accounts
        self.key = key
        self.limit = limit
        self.channels = 0
        self.held = 0

    def charge(self, cost: int) -> bool:
        """Hold ``cost`` more units; False (nothing held) if that would pass
        the limit."""
        if cost > 0 and self.held + cost > self.limit:
            return False
        self.held += cost
        return True

    def add(self, n: int) -> None:
        """Hold ``n`` more units unconditionally (answer bytes being queued:
        the queue has its own bound, ``max_queued``)."""
        self.held += n

    def release(self, cost: int) -> None:
        """Give back what ``charge`` or ``add`` took."""
        self.held -= cost
        if not self.held and not self.channels:
            self._accounts.drop(self)


class KeyAccounts:
    """The node's accounts, by key; an account lives while the key has a
    channel or holds anything."""

    def __init__(self, max_held: int, max_channels: int) -> None:
        if type(max_held) is not int or max_held < 1:
            raise ValueError(f"max_held_per_key must be a positive integer, not {max_held!r}")
        if type(max_channels) is not int or max_channels < 1:
            raise ValueError(
                f"max_channels_per_key must be a positive integer, not {max_channels!r}"
            )
        self.max_held = max_held
        self.max_channels = max_channels
        self._by_key: dict[KeyIdentity, KeyAccount] = {}

    def open_channel(self, key: KeyIdentity) -> KeyAccount | None:
        """The key's account with one more channel, or None when the key
        has ``max_channels`` already."""
        account = self._by_key.get(key)
        if account is None:
            account = self._by_key[key] = KeyAccount(self, key, self.max_held)
        if account.channels >= self.max_channels:
            return None
        account.channels += 1
        return account

    def close_channel(self, account: KeyAccount) -> None:
        account.channels -= 1
        account.release(0)

    def drop(self, account: KeyAccount) -> None:
        if self._by_key.get(account.key) is account:
            del self._by_key[account.key]

    def held(self) -> int:
        """Units held by every key."""
        return sum(a.held for a in self._by_key.values())

    def __getitem__(self, key: KeyIdentity) -> KeyAccount:
        return self._by_key[key]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key


class Held:
    """A mailbox message from a client, holding its sender's units until it
    is received or its process ends."""

    __slots__ = ("account", "cost", "message")

    def __init__(self, message: Any, cost: int, account: KeyAccount) -> None:
        self.message = message
        self.cost = cost
        self.account = account

    def take(self) -> Any:
        """The message; the units go back (once)."""
        if self.cost:
            self.account.release(self.cost)
            self.cost = 0
        return self.message


#: After decoding a frame that took longer than this (seconds), the node
#: decodes the next such frame (of any key) only ``HEAVY_PACE`` times as
#: long later: large terms take at most about a fifth of the event loop, and
#: calls of other keys run in between.  The pause delays the next heavy
#: frame, not the request just decoded (``Node.heavy_pace``).
HEAVY_PACE_MIN = 0.001
HEAVY_PACE = 4.0
#: Full (oldest generation) garbage collections run this often in ``serve``
#: and ``node`` (see ``tune_gc``).
FULL_GC_INTERVAL = 60.0


def tune_gc() -> None:
    """Garbage collection for a long-running node (``sshrpc serve`` and
    ``sshrpc node`` call it; a program embedding ``Node`` may).

    CPython collects its oldest generation whenever it grew by a quarter,
    and that pass visits every live container: with a client's large terms
    alive it took 50 to 150 ms, on the event loop, again and again (issue
    11).  Decoded terms are trees, which reference counting frees; so the
    oldest generation is collected only every ``FULL_GC_INTERVAL`` seconds
    (``collect_periodically``), the young ones as usual, and what was alive
    at start is frozen out of every collection.
    """
    import gc

    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1 << 30)


async def collect_periodically(interval: float = FULL_GC_INTERVAL) -> None:
    """Run a full collection every ``interval`` seconds, until cancelled."""
    import gc

    import trio

    while True:
        await trio.sleep(interval)
        gc.collect()
