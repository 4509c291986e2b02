"""Tests for L{dcrouter.auth.passwords}."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from dcrouter.auth.passwords import (
    AuthUnavailable,
    BlockingCalls,
    StaticPasswordChecker,
    SuccessCache,
    hashPassword,
    parseHash,
    parseUsers,
)

# htpasswd -nbB -C 5 alice wonderland (Apache's own bcrypt, $2y$)
HTPASSWD_ALICE = "$2y$05$SHE8qrqeooGEDKHQXR7F4uZJ6stGbb7jYPXLjDoZtpOUAWPa3SPyK"
# passlib: pbkdf2_sha256.using(rounds=1000, salt=b"dcrouter-salt!!!").hash("correct horse")
PASSLIB_1000 = "$pbkdf2-sha256$1000$ZGNyb3V0ZXItc2FsdCEhIQ$DT3Z2.XWytHa8rfCy7s6am12gHznlEBAsulIgj0q7IA"
# passlib: pbkdf2_sha256.using(rounds=29000).hash("pässword") (salt and hash use '.' and '/')
PASSLIB_29000 = "$pbkdf2-sha256$29000$ZAxh7N1bi/H.3/t/T.k9hw$VsWs8YaiYQzc/3rIUFKWy9gQhoNmMbhB2idMpaDWnbw"


class SyncReactor(Clock):
    """A clock whose callFromThread runs at once (the pool below has no threads)."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class SyncPool:
    """Runs each call at once, recording it; or holds them all if C{hold}."""

    def __init__(self, hold=False):
        self.hold = hold
        self.calls = []
        self.held = []

    def callInThreadWithCallback(self, onResult, f, *args):
        self.calls.append((f, args))
        if self.hold:
            self.held.append((onResult, f, args))
        else:
            self.runOne(onResult, f, args)

    @staticmethod
    def runOne(onResult, f, args):
        try:
            result = f(*args)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def release(self):
        held, self.held = self.held, []
        for onResult, f, args in held:
            self.runOne(onResult, f, args)


def makeChecker(users=None, pool=None, clock=None, **kw):
    clock = clock or SyncReactor()
    pool = pool or SyncPool()
    users = users if users is not None else {"alice": HTPASSWD_ALICE, "carol": PASSLIB_1000}
    return StaticPasswordChecker(users, clock, pool, clock, **kw), pool, clock


def login(checker, user, password):
    """The checker's result, synchronously: the avatar ID or the Failure."""
    results = []
    checker.requestAvatarId(UsernamePassword(user, password)).addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def assertRefused(result, kind=UnauthorizedLogin):
    assert isinstance(result, Failure), result
    assert result.check(kind), result


# parseUsers / parseHash


def test_users_comma_separated():
    users = parseUsers(f"alice:{HTPASSWD_ALICE}, carol:{PASSLIB_1000}")
    assert users == {"alice": HTPASSWD_ALICE, "carol": PASSLIB_1000}


def test_users_one_per_line_and_mixed():
    text = f"\n  alice:{HTPASSWD_ALICE},\n  carol:{PASSLIB_1000}\n  dave@example.test:{PASSLIB_29000}\n"
    assert list(parseUsers(text)) == ["alice", "carol", "dave@example.test"]


@pytest.mark.parametrize(
    "hashed, words",
    [
        ("s3cret-password", "plain-text passwords are not accepted"),
        ("{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", "{SHA}"),
        ("$apr1$xFJJbbSt$.0AG5JunxlCYz2h8kfErG/", "$apr1$"),
        ("$1$saltsalt$2vnaRpHa6Jxjz5n83ok8Z0", "MD5-crypt"),
        ("$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/", "SHA-512-crypt"),
        ("abJnggxhB/yWI", "not a bcrypt"),  # DES crypt
        ("$2y$05$tooshort", "malformed $2y$"),
        ("$2b$03$" + "a" * 53, "cost 3"),
        ("$pbkdf2-sha256$999$ZGNyb3V0ZXItc2FsdCEhIQ$DT3Z2.XWytHa8rfCy7s6am12gHznlEBAsulIgj0q7IA", "at least 1000 rounds"),
        ("$pbkdf2-sha256$1000$Z$DT3Z2.XWytHa8rfCy7s6am12gHznlEBAsulIgj0q7IA", "malformed"),
        ("$pbkdf2-sha512$1000$ZGNy$DT3Z", "PBKDF2-SHA512"),
    ],
)
def test_refused_formats_name_the_user_not_the_value(hashed, words):
    with pytest.raises(ValueError) as e:
        parseUsers(f"mallory:{hashed}")
    message = str(e.value)
    assert "'mallory'" in message
    assert words in message
    assert hashed not in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as e:
        parseUsers(f"a:plain, b:{HTPASSWD_ALICE}, c:{{SHA}}xyz, b:{HTPASSWD_ALICE}, junk")
    message = str(e.value)
    assert "'a'" in message and "'c'" in message
    assert "'b' is given twice" in message
    assert "not name:hash" in message
    assert "plain" not in message.replace("plain-text", "")


def test_no_users_is_an_error():
    with pytest.raises(ValueError, match="no users"):
        parseUsers("  \n ")


def test_checker_checks_hashes_given_from_python():
    with pytest.raises(ValueError, match=r"'bob'.*plain-text"):
        makeChecker({"bob": "hunter2"})


def test_bcrypt_prefixes_all_accepted():
    for prefix in ("$2a$", "$2b$", "$2y$"):
        assert parseHash("u", prefix + HTPASSWD_ALICE[4:]).verify(b"wonderland")


# Verification


def test_checker_provides_the_interface():
    checker, _, _ = makeChecker()
    assert verifyObject(ICredentialsChecker, checker)


def test_htpasswd_bcrypt_hash():
    checker, pool, _ = makeChecker()
    assert login(checker, b"alice", b"wonderland") == b"alice"
    assert len(pool.calls) == 1


def test_passlib_pbkdf2_hashes():
    checker, _, _ = makeChecker({"carol": PASSLIB_1000, "dave": PASSLIB_29000})
    assert login(checker, b"carol", b"correct horse") == b"carol"
    assert login(checker, b"dave", "pässword".encode()) == b"dave"
    assertRefused(login(checker, b"dave", b"password"))


def test_text_credentials_are_accepted_too():
    checker, _, _ = makeChecker()
    assert login(checker, "alice", "wonderland") == b"alice"


def test_wrong_password():
    checker, pool, _ = makeChecker()
    assertRefused(login(checker, b"alice", b"Wonderland"))
    assertRefused(login(checker, b"carol", b"correct horse "))
    assert len(pool.calls) == 2


def test_user_names_are_case_sensitive():
    checker, _, _ = makeChecker()
    assertRefused(login(checker, b"Alice", b"wonderland"))


def test_unknown_user_costs_a_hash_of_the_same_kind_and_cost():
    checker, pool, _ = makeChecker({"alice": HTPASSWD_ALICE, "bob": HTPASSWD_ALICE})
    assertRefused(login(checker, b"nobody", b"wonderland"))
    [(f, args)] = pool.calls
    dummy = f.__self__
    assert dummy.cost == 5
    assert dummy.hashed != HTPASSWD_ALICE.encode()
    assert args == (b"wonderland",)


def test_unknown_user_dummy_follows_pbkdf2_rounds():
    checker, pool, _ = makeChecker({"carol": PASSLIB_1000})
    assertRefused(login(checker, b"nobody", b"correct horse"))
    [(f, _)] = pool.calls
    assert f.__self__.rounds == 1000
    assert f.__self__.checksum != parseHash("carol", PASSLIB_1000).checksum


def test_unknown_user_refused_even_if_the_dummy_matched(monkeypatch):
    checker, _, _ = makeChecker()
    monkeypatch.setattr(type(checker._dummy), "verify", lambda self, password: True)
    assertRefused(login(checker, b"nobody", b"x"))


@pytest.mark.parametrize(
    "user, password",
    [(b"alice", b""), (b"alice", b"wonder\x00land"), (b"\xff\xfe", b"wonderland"), (b"", b"x")],
)
def test_refused_without_hashing(user, password):
    checker, pool, _ = makeChecker()
    assertRefused(login(checker, user, password))
    assert pool.calls == []


def test_long_passwords_are_cut_at_72_bytes_like_htpasswd():
    hashed = hashPassword(b"x" * 72, cost=4)
    checker, _, _ = makeChecker({"u": hashed})
    assert login(checker, b"u", b"x" * 72) == b"u"
    assert login(checker, b"u", b"x" * 100) == b"u"
    assertRefused(login(checker, b"u", b"x" * 71))


def test_dummy_bcrypt_hash_is_usable_and_matches_nothing():
    checker, _, _ = makeChecker()
    assert checker._dummy.verify(b"wonderland") is False


# The success cache


def test_success_is_cached_for_the_ttl():
    checker, pool, clock = makeChecker(cacheTTL=300)
    assert login(checker, b"alice", b"wonderland") == b"alice"
    clock.advance(299)
    assert login(checker, b"alice", b"wonderland") == b"alice"
    assert len(pool.calls) == 1
    clock.advance(1)
    assert login(checker, b"alice", b"wonderland") == b"alice"
    assert len(pool.calls) == 2


def test_a_cached_success_does_not_open_other_passwords_or_users():
    checker, pool, _ = makeChecker({"alice": HTPASSWD_ALICE, "bob": HTPASSWD_ALICE})
    login(checker, b"alice", b"wonderland")
    assertRefused(login(checker, b"alice", b"wonderland!"))
    assert login(checker, b"bob", b"wonderland") == b"bob"
    assert len(pool.calls) == 3


def test_failures_are_not_cached():
    checker, pool, _ = makeChecker()
    for _ in range(3):
        assertRefused(login(checker, b"alice", b"nope"))
    assert len(pool.calls) == 3


def test_cache_off():
    checker, pool, _ = makeChecker(cacheSize=0)
    login(checker, b"alice", b"wonderland")
    login(checker, b"alice", b"wonderland")
    assert len(pool.calls) == 2


def test_cache_is_bounded_least_recently_used_first():
    clock = Clock()
    cache = SuccessCache(clock, maxSize=2, ttl=60)
    a, b, c = (cache.key(name, b"pw") for name in "abc")
    cache.add(a)
    cache.add(b)
    assert cache.hit(a)  # a is now the most recently used
    cache.add(c)
    assert len(cache) == 2
    assert cache.hit(a) and cache.hit(c) and not cache.hit(b)


def test_cache_keys_keep_user_and_password_apart():
    cache = SuccessCache(Clock())
    assert cache.key("ab", b"c") != cache.key("a", b"bc")
    assert cache.key("a", b"pw") != SuccessCache(Clock()).key("a", b"pw")  # per-cache secret
    assert b"pw" not in cache.key("a", b"pw")


# Load shedding and timeouts


def test_too_many_pending_checks_fail_fast_as_unavailable():
    pool = SyncPool(hold=True)
    checker, _, _ = makeChecker(pool=pool, maxPending=2)
    results = []
    for _ in range(3):
        checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")).addBoth(results.append)
    assert len(results) == 1
    assertRefused(results[0], AuthUnavailable)
    assert checker.pending == 2
    pool.release()
    assert results[1:] == [b"alice", b"alice"]
    assert checker.pending == 0


def test_a_check_stuck_in_the_pool_times_out():
    pool = SyncPool(hold=True)
    checker, _, clock = makeChecker(pool=pool, timeout=30)
    d = checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.1)
    assertRefused(_now(d), AuthUnavailable)


def test_blocking_call_timeout_is_unavailable_and_the_late_result_ignored():
    clock = SyncReactor()
    pool = SyncPool(hold=True)
    calls = BlockingCalls(clock, pool, clock, maxPending=1, timeout=5)
    results = []
    calls.run(lambda: "late").addBoth(results.append)
    clock.advance(5)
    assertRefused(results[0], AuthUnavailable)
    assert "5 s" in results[0].getErrorMessage()
    # The thread is still busy: it still counts.
    assertRefused(_now(calls.run(lambda: "x")), AuthUnavailable)
    pool.release()
    assert len(results) == 1
    assert calls.pending == 0


def test_blocking_call_errors_pass_through():
    clock = SyncReactor()
    calls = BlockingCalls(clock, SyncPool(), clock, timeout=5)
    result = _now(calls.run(lambda: 1 / 0))
    assert result.check(ZeroDivisionError)
    assert clock.getDelayedCalls() == []


def _now(d):
    results = []
    d.addBoth(results.append)
    return results[0]


# hashPassword


def test_hash_password_default_is_bcrypt_cost_12():
    hashed = hashPassword("wonderland")
    assert hashed.startswith("$2b$12$")
    assert parseHash("u", hashed).verify(b"wonderland")


@pytest.mark.parametrize("plain", ["", "a\x00b", "x" * 73, "é" * 37])
def test_hash_password_refuses(plain):
    with pytest.raises(ValueError):
        hashPassword(plain, cost=4)


# On a real thread pool


@pytest_twisted.ensureDeferred
async def test_real_thread_pool_does_not_block_the_reactor():
    pool = ThreadPool(1, 2, name="test-passwords")
    pool.start()
    try:
        checker = StaticPasswordChecker({"alice": hashPassword("wonderland", cost=10)}, reactor, pool, reactor)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
        assert not d.called  # hashing is in the pool; the reactor goes on
        assert await d == b"alice"
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
    finally:
        pool.stop()
