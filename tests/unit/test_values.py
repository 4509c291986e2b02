"""Tests for L{dcrouter.config.values}: one configuration value at a time."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcrouter.config import values
from dcrouter.config.model import HostPort


class TestSplitList:
    def test_commasAndNewlines(self) -> None:
        assert values.splitList(" a, b\n c ,,\n\n d ") == ["a", "b", "c", "d"]

    def test_empty(self) -> None:
        assert values.splitList("  \n , ") == []


class TestPorts:
    def test_single(self) -> None:
        assert values.parsePort(" 443 ") == 443

    @pytest.mark.parametrize("text", ["eighty", "0", "70000", "65536", "-1", "", "8 0", "١٢"])
    def test_badPort(self, text: str) -> None:
        with pytest.raises(ValueError, match="is not a port"):
            values.parsePort(text)

    def test_listAndRange(self) -> None:
        assert values.parsePorts("80, 443\n8000-8002") == (80, 443, 8000, 8001, 8002)

    def test_repeatsDropped(self) -> None:
        assert values.parsePorts("443, 440-444, 80") == (443, 440, 441, 442, 444, 80)

    def test_bounds(self) -> None:
        assert values.parsePorts("1, 65535") == (1, 65535)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("eighty", "'eighty' is not a port or range"),
            ("0", "'0' is not a port or range"),
            ("70000", "'70000' is not a port or range"),
            ("80-", "'80-' is not a port or range"),
            ("-80", "'-80' is not a port or range"),
            ("9000-8000", "range '9000-8000' runs backwards"),
            ("", "no port given"),
            ("1-2000", "2000 ports is more than 1024 listeners"),
        ],
    )
    def test_badPorts(self, text: str, message: str) -> None:
        with pytest.raises(ValueError) as caught:
            values.parsePorts(text)
        assert str(caught.value) == message

    @given(st.lists(st.integers(1, 65535), min_size=1, max_size=50))
    def test_roundTrip(self, ports: list[int]) -> None:
        text = ", ".join(str(port) for port in ports)
        assert values.parsePorts(text) == tuple(dict.fromkeys(ports))


class TestNetworks:
    def test_addressAndBlock(self) -> None:
        assert values.parseNetworks("10.0.0.0/8, 192.0.2.1\n2001:db8::/32") == (
            ip_network("10.0.0.0/8"),
            ip_network("192.0.2.1/32"),
            ip_network("2001:db8::/32"),
        )

    def test_hostBitsAllowed(self) -> None:
        assert values.parseNetwork("10.1.2.3/8") == ip_network("10.0.0.0/8")

    @pytest.mark.parametrize("text", ["10.0.0.300/8", "10.0.0.0/33", "2001:db8::/129", "x", ""])
    def test_bad(self, text: str) -> None:
        with pytest.raises(ValueError, match="is not an IP address or CIDR block"):
            values.parseNetwork(text)

    def test_badInList(self) -> None:
        with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
            values.parseNetworks("10.0.0.0/8, 10.0.0.0/33")


class TestDomains:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("*.Example.com.", "*.example.com"),
            ("_dmarc.example.com", "_dmarc.example.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("*.bücher.example", "*.xn--bcher-kva.example"),
            # IDNA 2008, as browsers send it in SNI; IDNA 2003 made it "strasse".
            ("straße.de", "xn--strae-oqa.de"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("localhost", "localhost"),
        ],
    )
    def test_good(self, text: str, expected: str) -> None:
        assert values.parseDomain(text) == expected

    @pytest.mark.parametrize(
        "text",
        ["a..b", "-a.example", "a-.example", "a.*.example", "a b.example", "a" * 64 + ".x", ""],
    )
    def test_bad(self, text: str) -> None:
        with pytest.raises(ValueError, match="is not a domain name"):
            values.parseDomain(text)

    def test_wildcardWithoutSuffix(self) -> None:
        with pytest.raises(ValueError, match="wildcard without a suffix"):
            values.parseDomain("*")

    def test_tooLong(self) -> None:
        with pytest.raises(ValueError, match="longer than 253"):
            values.parseDomain(".".join(["a" * 60] * 5))

    def test_listDropsRepeats(self) -> None:
        assert values.parseDomains("a.example, A.example.\n*.b.example") == (
            "a.example",
            "*.b.example",
        )


class TestHostPort:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("backend:8080", HostPort("backend", 8080)),
            ("Backend.Example.:443", HostPort("backend.example", 443)),
            ("192.0.2.1:25", HostPort("192.0.2.1", 25)),
            ("[2001:db8::1]:443", HostPort("2001:db8::1", 443)),
            ("[::1]:80", HostPort("::1", 80)),
            ("bücher.example:80", HostPort("xn--bcher-kva.example", 80)),
        ],
    )
    def test_good(self, text: str, expected: HostPort) -> None:
        assert values.parseHostPort(text) == expected

    def test_defaultPort(self) -> None:
        assert values.parseHostPort("backend", 25) == HostPort("backend", 25)
        assert values.parseHostPort("[::1]", 25) == HostPort("::1", 25)

    def test_str(self) -> None:
        assert str(values.parseHostPort("[::1]:80")) == "[::1]:80"
        assert str(values.parseHostPort("a:80")) == "a:80"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("backend", "has no port"),
            ("[::1]", "has no port"),
            ("::1:443", "write IPv6 targets as [address]:port"),
            ("[zz]:80", "is not a host name or IP address"),
            ("[1::2::3]:80", "has a bad IPv6 address"),
            ("bad host:80", "is not a host name or IP address"),
            ("a..b:80", "is not a host name or IP address"),
            (":80", "has no host"),
            ("backend:0", "is not a port"),
            ("backend:http", "is not a port"),
        ],
    )
    def test_bad(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            values.parseHostPort(text)

    def test_list(self) -> None:
        assert values.parseHostPorts("a:1,\n[::1]:2") == (HostPort("a", 1), HostPort("::1", 2))

    def test_emptyList(self) -> None:
        with pytest.raises(ValueError, match="no target given"):
            values.parseHostPorts(" , ")


class TestBindAddresses:
    def test_good(self) -> None:
        assert values.parseBindAddresses("0.0.0.0, [::], 127.0.0.1, 0.0.0.0") == (
            "0.0.0.0",
            "::",
            "127.0.0.1",
        )

    @pytest.mark.parametrize("text", ["localhost", "10.0.0.0/8", "300.0.0.1"])
    def test_bad(self, text: str) -> None:
        with pytest.raises(ValueError, match="is not an IP address to listen on"):
            values.parseBindAddress(text)

    def test_empty(self) -> None:
        with pytest.raises(ValueError, match="no address given"):
            values.parseBindAddresses(",")


class TestDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("30", 30.0),
            ("30s", 30.0),
            ("1.5s", 1.5),
            ("500ms", 0.5),
            ("10m", 600.0),
            ("1h", 3600.0),
            ("2d", 172800.0),
            (" 5 S ", 5.0),
            ("0", 0.0),
        ],
    )
    def test_good(self, text: str, seconds: float) -> None:
        assert values.parseDuration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["-1s", "10 minutes", "s", "1e3", "", "1w"])
    def test_bad(self, text: str) -> None:
        with pytest.raises(ValueError, match="is not a duration"):
            values.parseDuration(text)

    @given(st.integers(0, 10**6), st.sampled_from(["", "s", "m", "h", "d", "ms"]))
    def test_units(self, number: int, unit: str) -> None:
        factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "ms": 0.001}[unit]
        if number * factor > values.MAX_DURATION:
            with pytest.raises(ValueError, match="is longer than 10 years"):
                values.parseDuration(f"{number}{unit}")
        else:
            assert values.parseDuration(f"{number}{unit}") == pytest.approx(number * factor)

    @pytest.mark.parametrize("text", ["9" * 400, "9" * 400 + "ms", "3651d", "87601h"])
    def test_tooLong(self, text: str) -> None:
        """400 digits were inf seconds, and accepted: a drain that waits for ever."""
        with pytest.raises(ValueError, match="is longer than 10 years"):
            values.parseDuration(text)

    def test_tenYearsIsTheMost(self) -> None:
        assert values.parseDuration("3650d") == values.MAX_DURATION

    @pytest.mark.parametrize("text", ["\u0663\u0660s", "\uff13\uff10", "1_000"])
    def test_onlyASCIIDigits(self, text: str) -> None:
        """Other scripts' digits matched \\d."""
        with pytest.raises(ValueError, match="is not a duration"):
            values.parseDuration(text)


class TestBool:
    @pytest.mark.parametrize("text", ["yes", "True", "ON", "1", " yes "])
    def test_true(self, text: str) -> None:
        assert values.parseBool(text) is True

    @pytest.mark.parametrize("text", ["no", "False", "off", "0"])
    def test_false(self, text: str) -> None:
        assert values.parseBool(text) is False

    @pytest.mark.parametrize("text", ["maybe", "", "2"])
    def test_bad(self, text: str) -> None:
        with pytest.raises(ValueError, match="is not yes or no"):
            values.parseBool(text)


class TestIntAndChoice:
    def test_int(self) -> None:
        assert values.parseInt(" 42 ") == 42
        assert values.parseInt("-5", minimum=-10) == -5

    @pytest.mark.parametrize("text", ["1_000", "\u0663\u0660", "\uff14\uff12", "9" * 5000, "+-1"])
    def test_intOnlyASCIIDigits(self, text: str) -> None:
        """int() takes other scripts' digits and 1_000; 5,000 digits it refuses itself."""
        with pytest.raises(ValueError, match="is not a whole number"):
            values.parseInt(text)

    def test_sizeOnlyASCIIDigits(self) -> None:
        with pytest.raises(ValueError, match="is not a size"):
            values.parseSize("\u0661\u0660k")

    def test_intNotANumber(self) -> None:
        with pytest.raises(ValueError, match="'many' is not a whole number"):
            values.parseInt("many")

    def test_intBelowMinimum(self) -> None:
        with pytest.raises(ValueError, match=r"0 is out of range \(>= 1\)"):
            values.parseInt("0", minimum=1)

    def test_intAboveMaximum(self) -> None:
        with pytest.raises(ValueError, match=r"11 is out of range \(1..10\)"):
            values.parseInt("11", 1, 10)

    def test_choice(self) -> None:
        assert values.parseChoice(" JSON ", ("text", "json")) == "json"

    def test_badChoice(self) -> None:
        with pytest.raises(ValueError, match="'xml' is not one of text, json"):
            values.parseChoice("xml", ("text", "json"))
